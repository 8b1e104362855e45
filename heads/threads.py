"""How many torch threads a training step uses: one for small heads, all of them for large ones.

A step of `emp` at store dim 64 runs thousands of ops on tensors of a few hundred thousand
elements; split across threads, each op waits for the slowest thread, and on a busy machine for a
thread to be scheduled at all. On the 2-core benchmark machine one thread trains such a head
faster than two, and many times faster when the machine is loaded (`python -m bench.training`
reports the small head's episode time; docs/performance.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

SMALL_STEP_ELEMENTS = 1 << 19  # largest input tensor of a step below this: one thread

F = TypeVar("F", bound=Callable[..., Any])


def step_threads(spec: dict[str, Any], names: list[str], videos: int) -> int:
    """Threads for a step over `videos` videos of the store tensors `names` (one view each)."""
    largest = 0
    for entry in spec["tensors"]:
        if entry["name"] in names:
            largest = max(largest, int(np.prod(entry["shape_per_row"][1:])) * videos)
    return 1 if largest < SMALL_STEP_ELEMENTS else torch.get_num_threads()


def restores_threads(fn: F) -> F:
    """Decorator: `fn` may change torch's thread count; it is restored when `fn` returns."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper  # type: ignore[return-value]
