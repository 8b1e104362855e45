"""Benchmarks (`make bench`): each module writes bench/results/<name>.json; run_all runs them all."""

from runtime.threads import sleep_idle_threads

sleep_idle_threads()  # as the commands do, before any benchmark loads torch
