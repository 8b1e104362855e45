"""Dropout whose random mask is drawn cheaply on CPU (and on every core for large tensors).

torch's CPU dropout draws one random float per element from a single generator, on one core:
for EMP-Net at ViT-B/16 shapes (47,280 tokens x 512 per block) that is 2.4 s of a 15 s training
episode on 2 cores, while the other core idles, and at store dim 64 it is a third of an episode
(`python -m bench.training` measures both). `ParallelDropout` draws 16 random bits per element from
64-bit words (8 torch generators run on the torch threads for tensors of a million elements or
more; below, one numpy SFC64 generator, twice as fast), then keeps an element when its bits clear a
threshold. The drop probability is thus `p` rounded to a multiple of 1/65,536, and kept elements
are scaled by 1 / (1 - that). The mask is applied as a product with a float mask built from the
16-bit draws (backward keeps that mask, or for a million elements or more the draws, 2 bytes per
element, and rebuilds it): a boolean `where` is several times slower on CPU.

Masks are reproducible: each call draws its generators' seeds from torch's global generator, so
`torch.manual_seed` fixes them as it fixes `nn.Dropout`'s, whatever the number of threads (the
masks themselves differ from `nn.Dropout`'s). On CUDA tensors, and for tiny ones, this is plain
`F.dropout`.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PARALLEL_MIN_ELEMENTS = 1 << 20  # below this a pool round trip costs more than it saves
MIN_ELEMENTS = 1 << 13  # below this torch's own dropout is as fast (the draws' fixed cost)
MASK_PARTS = 8  # generators per large mask: fixed, so masks do not depend on the number of threads
_BITS = 16
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="fsar-dropout")
        return _pool


def quantised_drop_probability(p: float) -> float:
    """The drop probability `ParallelDropout` applies for `p`: a multiple of 1/65,536."""
    return round(p * (1 << _BITS)) / (1 << _BITS)


def random_int16(n: int, threads: int, parts: int = MASK_PARTS) -> torch.Tensor:
    """`n` uniform int16 values, drawn as 64-bit words by `parts` generators on `threads`."""
    seeds = torch.randint(0, 1 << 62, (parts,)).tolist()  # from the global generator
    if parts == 1:  # numpy's SFC64 fills words about twice as fast as torch's CPU generator
        words = np.random.SFC64(seeds[0]).random_raw((n + 3) // 4)
        return torch.from_numpy(words.view(np.int16)[:n])
    words = torch.empty((n + 3) // 4, dtype=torch.int64)
    chunks = words.chunk(parts)

    def fill(i: int) -> None:
        generator = torch.Generator().manual_seed(seeds[i])
        chunks[i].random_(-(1 << 63), (1 << 63) - 1, generator=generator)  # all 64 bits

    if threads <= 1:
        for i in range(len(chunks)):
            fill(i)
    else:
        list(_thread_pool().map(fill, range(len(chunks))))
    return words.view(torch.int16)[:n]


class _MaskedScale(torch.autograd.Function):
    """x * mask, the float mask built from int16 draws: kept where draws >= threshold. Backward
    keeps the float mask below PARALLEL_MIN_ELEMENTS, else the draws (half the memory), from
    which it rebuilds the mask."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, draws: torch.Tensor, threshold: int, scale: float):
        mask = _float_mask(draws, threshold, scale, x.dtype)
        ctx.keeps_mask = x.numel() < PARALLEL_MIN_ELEMENTS
        ctx.save_for_backward(mask if ctx.keeps_mask else draws)
        ctx.threshold, ctx.scale = threshold, scale
        return x * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (saved,) = ctx.saved_tensors
        if ctx.keeps_mask:
            return grad * saved, None, None, None
        return grad * _float_mask(saved, ctx.threshold, ctx.scale, grad.dtype), None, None, None


def _float_mask(
    draws: torch.Tensor, threshold: int, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """`scale` where draws >= threshold, else 0 (exact: draws - threshold + 1 is an integer)."""
    return draws.to(dtype).sub_(threshold - 1).clamp_(0.0, 1.0).mul_(scale)


def parallel_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Functional form of `ParallelDropout`."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if x.device.type != "cpu" or x.numel() < MIN_ELEMENTS:
        return F.dropout(x, p, True)
    p_drop = quantised_drop_probability(p)
    if p_drop == 1.0:
        return x * 0.0
    threshold = -(1 << (_BITS - 1)) + round(p * (1 << _BITS))  # int16 >= threshold: kept
    if x.numel() >= PARALLEL_MIN_ELEMENTS:
        draws = random_int16(x.numel(), min(torch.get_num_threads(), os.cpu_count() or 1))
    else:  # one generator on this thread: a pool round trip would cost more than the draws
        draws = random_int16(x.numel(), 1, parts=1)
    return _MaskedScale.apply(x, draws.view(x.shape), threshold, 1.0 / (1.0 - p_drop))


class ParallelDropout(nn.Dropout):
    """`nn.Dropout` with the mask drawn on every core (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return parallel_dropout(x, self.p, self.training)
