"""Evaluation: the semantic-fidelity benchmark (evaluate.py, `python -m tools.eval`), judges for real images
(real_judges.py) and prompt sets (data/)."""
