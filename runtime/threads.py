"""Threads of this process and of the worker processes fsar starts: cores, counts, OpenMP's wait policy.

`sleep_idle_threads()` runs first in every entry point (cli, bench, tests), before torch loads.
"""

from __future__ import annotations

import os

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

# Idle OpenMP threads sleep instead of spinning between parallel regions: on 2 cores shared with
# other jobs (load 5), 60 emp episodes with 2 torch threads took 189 s spinning, 28 s passive
# (docs/performance.md). OpenMP reads it when torch loads.
OMP_WAIT_ENVIRON = {"OMP_WAIT_POLICY": "PASSIVE"}


def sleep_idle_threads() -> None:
    """This process's OpenMP threads sleep when idle (unless the user set OMP_WAIT_POLICY)."""
    for name, value in OMP_WAIT_ENVIRON.items():
        os.environ.setdefault(name, value)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_environ(threads: int) -> dict[str, str]:
    """Environment of a worker process whose math libraries use `threads` threads, sleeping when idle."""
    return {**{name: str(threads) for name in THREAD_VARIABLES}, **OMP_WAIT_ENVIRON}
