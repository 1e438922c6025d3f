"""Benchmarks: speed against the references, the cost of each method, one timing helper (timing.py).
Run `python -m tools.bench SUBCOMMAND --help`."""
