"""The testbed: a tiny Stable Diffusion trained here on a world of coloured shapes. The world and its renderer
(shapes.py), its judge (judge.py), the tiny CLIP (tinyclip.py), training (train.py) and the gates (diagnose.py)."""
