"""OTAM (Cao et al. 2020) exactly as the released CLIP-FSAR / EMP-Net code computes it.

The released recursion, for a frame-distance matrix d (query frames x support frames):
the support axis is padded with a zero column on both sides; the top row is a plain
cumulative sum; every later row uses a soft minimum (lambda 0.5)
    softmin(a, b, ...) = -lambda * log(sum exp(-x / lambda))
over three predecessors for the first real column and for the last (pad) column
(up-left, up, left) and over two for the middle columns (up-left, left). Column 0 stays 0.
The score is the bottom-right cell; the bidirectional score adds OTAM of the transposed matrix.

The recursion runs cell by cell, each cell one vector op over every (episode, query, class) pair
at once, with the frames moved to the front so each cell is a contiguous slice. It runs on
W = exp(-cost / lambda), where a soft minimum is a plain sum and adding a distance is a product
(two cheap ops per cell instead of a `logaddexp`), whenever the inputs bound every W inside the
dtype's normal range (always at evaluation shapes: 1 - cosine in [0, 2], 8 frames, lambda 0.5);
otherwise it runs the same recursion in log space. On CPU, cells of up to NUMPY_MAX_CELL values
run the linear recursion on numpy views of the same float32/64 values (the same arithmetic): a
training episode's cell holds a few hundred values, where numpy's per-op cost is a fifth of
torch's. Tests compare both with the plain recursion and with brute force over all paths.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_LAMBDA = 0.5


def _frames_first(dists: torch.Tensor, lbda: float, directions: int) -> torch.Tensor:
    """-dists / lbda laid out (Lq, Ls, [2,] ...) contiguously: one slice per recursion cell.

    With `directions` 2 (square input) the transposed matrix is stacked on axis 2, so one
    recursion scores both OTAM directions. One copy into a fresh tensor, then an in-place scale
    (the caller's tensor is never written)."""
    first = dists.movedim((-2, -1), (0, 1))
    parts = [first] if directions == 1 else [first, dists.movedim((-1, -2), (0, 1))]
    out = torch.stack(parts, 2).mul_(-1.0 / lbda)
    return out if directions == 2 else out[:, :, 0]


def _linear_space_is_safe(dists: torch.Tensor, lbda: float) -> bool:
    """Whether every cell of exp(-cost / lbda) stays normal. A path has at most L = Lq + Ls cells
    and there are at most 3^L paths, so W lies in
    [exp(-max d * L / lbda), 3^L * exp(-min d * L / lbda)]."""
    if dists.numel() == 0:
        return False
    length = dists.shape[-2] + dists.shape[-1]
    low, high = (v.item() for v in torch.aminmax(dists.detach()))
    limit = 0.9 * -math.log(torch.finfo(dists.dtype).tiny)  # 78 for float32, 637 for float64
    if not (math.isfinite(low) and math.isfinite(high)):
        return False
    return (
        max(high, 0.0) * length / lbda <= limit
        and length * math.log(3) + max(-low, 0.0) * length / lbda <= limit
    )


Cells = Any  # (Lq, Ls, B) values of the recursion: a numpy view on CPU, else a torch tensor
NUMPY_MAX_CELL = 2048  # values per cell up to which numpy beats torch's vectorised ops on CPU


def _cells(t: torch.Tensor) -> Cells:
    """`t` (Lq, Ls, B) as the recursion's array: numpy (a view, no copy) for CPU float32/64
    with small cells, else the tensor."""
    small = t.shape[-1] <= NUMPY_MAX_CELL and t.dtype in (torch.float32, torch.float64)
    return t.detach().numpy() if small and t.device.type == "cpu" else t


def _tensor(values: Cells) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values)) if isinstance(values, np.ndarray) else values


def _cells_linear(weights: Cells) -> list[list[Cells]]:
    """Every cell of the recursion on W (Lq, Ls, B): rows of columns 0 .. Ls + 1."""
    n_rows, n_cols = weights.shape[0], weights.shape[1]
    if isinstance(weights, np.ndarray):
        one, top = np.ones_like(weights[0, 0]), list(np.cumprod(weights[0], axis=0))
    else:
        one, top = torch.ones_like(weights[0, 0]), list(torch.cumprod(weights[0], 0).unbind(0))
    rows = [[one, *top, top[-1]]]  # columns 0 .. n_cols + 1
    for row in range(1, n_rows):
        previous, w = rows[-1], weights[row]
        cell = (previous[0] + previous[1] + one) * w[0]
        current = [one, cell]
        for col in range(2, n_cols + 1):
            cell = (previous[col - 1] + cell) * w[col - 1]
            current.append(cell)
        current.append(previous[n_cols] + previous[-1] + cell)
        rows.append(current)
    return rows


class _RecursionLinear(torch.autograd.Function):
    """log of the bottom-right cell of the recursion on W = exp(scaled) (Lq, Ls, B), with the
    adjoint recursion as backward: autograd through hundreds of per-cell ops on small tensors
    (each select allocating a full-size gradient) costs several times the forward."""

    @staticmethod
    def forward(ctx: Any, scaled: torch.Tensor) -> torch.Tensor:
        weights = scaled.exp()
        rows = _cells_linear(_cells(weights))
        ctx.save_for_backward(weights)
        ctx.rows = rows
        return _tensor(rows[-1][-1]).log()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (saved,) = ctx.saved_tensors
        rows, weights = ctx.rows, _cells(saved)
        n_rows, n_cols = weights.shape[0], weights.shape[1]
        grad_w = weights * 0.0  # every cell is written below
        # adjoint of each cell of the current row (None: zero); columns 0 .. n_cols + 1
        adj: list[Cells | None] = [None] * (n_cols + 2)
        adj[-1] = _cells(grad.contiguous()) / rows[-1][-1]
        for row in range(n_rows - 1, 0, -1):
            cells, previous, w = rows[row], rows[row - 1], weights[row]
            above: list[Cells | None] = [None] * (n_cols + 2)
            a = adj[-1]  # last (pad) column: up-left + up + left
            if a is not None:
                above[n_cols] = above[-1] = a
                adj[n_cols] = a if adj[n_cols] is None else adj[n_cols] + a
            for col in range(n_cols, 1, -1):  # middle columns: (up-left + left) * w
                a = adj[col]
                if a is None:
                    grad_w[row, col - 1] = 0.0
                    continue
                grad_w[row, col - 1] = a * (previous[col - 1] + cells[col - 1])
                t = a * w[col - 1]
                above[col - 1] = t if above[col - 1] is None else above[col - 1] + t
                adj[col - 1] = t if adj[col - 1] is None else adj[col - 1] + t
            a = adj[1]  # first real column: (up-left + up + left) * w, up-left and left are 1
            if a is None:
                grad_w[row, 0] = 0.0
            else:
                grad_w[row, 0] = a * (previous[1] + 2.0)
                t = a * w[0]
                above[1] = t if above[1] is None else above[1] + t
            adj = above
        top = rows[0]  # top row: a cumulative product; its pad column copies the last one
        if adj[-1] is not None:
            adj[n_cols] = adj[-1] if adj[n_cols] is None else adj[n_cols] + adj[-1]
        for col in range(n_cols, 0, -1):
            a = adj[col]
            if a is None:
                grad_w[0, col - 1] = 0.0
                continue
            grad_w[0, col - 1] = a * top[col - 1]
            if col > 1:
                t = a * weights[0, col - 1]
                adj[col - 1] = t if adj[col - 1] is None else adj[col - 1] + t
        grad_w *= weights  # d W / d scaled = W
        return _tensor(grad_w)


def _recursion_linear(scaled: torch.Tensor) -> torch.Tensor:
    """The recursion on W = exp(scaled) (Lq, Ls, ...): soft minimum = sum, distance = product."""
    cells = scaled.reshape(*scaled.shape[:2], -1)  # (Lq, Ls, B): no 0-d cells
    if torch.is_grad_enabled() and scaled.requires_grad:
        out = _RecursionLinear.apply(cells)
    else:
        weights = cells.exp()
        out = _tensor(_cells_linear(_cells(weights))[-1][-1]).log()
    return out.reshape(scaled.shape[2:])


def _recursion_log(scaled: torch.Tensor) -> torch.Tensor:
    """The same recursion in log space (C = -cost / lambda): soft minimum = logaddexp."""
    n_rows, n_cols = scaled.shape[0], scaled.shape[1]
    zero = torch.zeros_like(scaled[0, 0])
    top = list(torch.cumsum(scaled[0], dim=0).unbind(0))
    previous = [zero, *top, top[-1]]
    for row in range(1, n_rows):
        # first real column: up-left, up and left (column 0, which holds 0)
        cell = torch.logaddexp(torch.logaddexp(previous[0], previous[1]), zero) + scaled[row, 0]
        current = [zero, cell]
        for col in range(2, n_cols + 1):  # middle columns: up-left and left
            cell = torch.logaddexp(previous[col - 1], cell) + scaled[row, col - 1]
            current.append(cell)
        # last (pad) column: up-left, up and left; its distance is 0
        current.append(torch.logaddexp(torch.logaddexp(previous[n_cols], previous[-1]), cell))
        previous = current
    return previous[-1]


def _otam(dists: torch.Tensor, lbda: float, directions: int, space: str) -> torch.Tensor:
    if space == "auto":
        space = "linear" if _linear_space_is_safe(dists, lbda) else "log"
    if space not in ("linear", "log"):
        raise ValueError(f"space must be 'auto', 'linear' or 'log' (got {space!r})")
    scaled = _frames_first(dists, lbda, directions)
    recursion = _recursion_linear if space == "linear" else _recursion_log
    return recursion(scaled) * -lbda


def otam_distance(
    dists: torch.Tensor, lbda: float = DEFAULT_LAMBDA, space: str = "auto"
) -> torch.Tensor:
    """One-direction OTAM cost. dists (..., Lq, Ls) -> (...,).

    `space` picks the recursion: "linear" (fast), "log" (any range) or "auto" (linear when safe)."""
    return _otam(dists, lbda, 1, space)


def otam_bidirectional(
    dists: torch.Tensor, lbda: float = DEFAULT_LAMBDA, space: str = "auto"
) -> torch.Tensor:
    """OTAM(query -> support) + OTAM(support -> query). dists (..., Lq, Ls) -> (...,)."""
    if dists.shape[-1] == dists.shape[-2]:  # both directions in one recursion: half the Python ops
        both = _otam(dists, lbda, 2, space)
        return both[0] + both[1]
    return otam_distance(dists, lbda, space) + otam_distance(dists.transpose(-1, -2), lbda, space)


def otam_distance_loop(dists: torch.Tensor, lbda: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """The released recursion cell by cell (slow; the reference `otam_distance` is checked on)."""
    padded = F.pad(dists, (1, 1))
    n_rows, n_cols = padded.shape[-2], padded.shape[-1]
    cum = [[torch.zeros_like(padded[..., 0, 0]) for _ in range(n_cols)] for _ in range(n_rows)]

    def softmin(*values: torch.Tensor) -> torch.Tensor:
        return -lbda * torch.logsumexp(torch.stack([-v / lbda for v in values]), dim=0)

    for m in range(1, n_cols):
        cum[0][m] = padded[..., 0, m] + cum[0][m - 1]
    for r in range(1, n_rows):
        cum[r][1] = padded[..., r, 1] + softmin(cum[r - 1][0], cum[r - 1][1], cum[r][0])
        for m in range(2, n_cols - 1):
            cum[r][m] = padded[..., r, m] + softmin(cum[r - 1][m - 1], cum[r][m - 1])
        cum[r][-1] = padded[..., r, -1] + softmin(cum[r - 1][-2], cum[r - 1][-1], cum[r][-2])
    return cum[-1][-1]


class OTAMDistance(torch.nn.Module):
    """Module wrapper: frame distances (..., Lq, Ls) -> bidirectional OTAM cost (...,)."""

    def __init__(self, lbda: float = DEFAULT_LAMBDA, bidirectional: bool = True) -> None:
        super().__init__()
        self.lbda = lbda
        self.bidirectional = bidirectional

    def forward(self, dists: torch.Tensor) -> torch.Tensor:
        if self.bidirectional:
            return otam_bidirectional(dists, self.lbda)
        return otam_distance(dists, self.lbda)
