"""Benchmarks (`make bench`): each module writes bench/results/<name>.json; run_all runs them all."""

import os

# as cli.py: torch's OpenMP threads sleep rather than spin between parallel regions (read when
# torch loads, so before any benchmark imports it)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
