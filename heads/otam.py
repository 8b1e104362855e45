"""OTAM (Cao et al. 2020) exactly as the released CLIP-FSAR / EMP-Net code computes it.

The released recursion, for a frame-distance matrix d (query frames x support frames):
the support axis is padded with a zero column on both sides; the top row is a plain
cumulative sum; every later row uses a soft minimum with smoothing lambda (0.5 as released)
    softmin(a, b, ...) = -lambda * log(sum exp(-x / lambda))
over three predecessors for the first real column and for the last (pad) column
(up-left, up, left) and over two for the middle columns (up-left, left). Column 0 stays 0.
The score is the bottom-right cell; the bidirectional score adds OTAM of the transposed matrix.

The recursion runs cell by cell in log space (C = -cost / lambda, soft minimum = logaddexp), each
cell one vector op over every (episode, query, class) pair at once, with the frames moved to the
front so each cell is a contiguous slice; torch autograd gives the gradients. Tests compare it with
the released loop and with brute force over all paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_LAMBDA = 0.5


def _frames_first(dists: torch.Tensor, smoothing: float, directions: int) -> torch.Tensor:
    """-dists / smoothing laid out (Lq, Ls, [2,] ...) contiguously: one slice per recursion cell.

    With `directions` 2 (square input) the transposed matrix is stacked on axis 2, so one
    recursion scores both OTAM directions. One copy into a fresh tensor, then an in-place scale
    (the caller's tensor is never written)."""
    first = dists.movedim((-2, -1), (0, 1))
    parts = [first] if directions == 1 else [first, dists.movedim((-1, -2), (0, 1))]
    out = torch.stack(parts, 2).mul_(-1.0 / smoothing)
    return out if directions == 2 else out[:, :, 0]


def _recursion(scaled: torch.Tensor) -> torch.Tensor:
    """The recursion on C = -cost / lambda (Lq, Ls, ...): soft minimum = logaddexp."""
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


def _otam(dists: torch.Tensor, smoothing: float, directions: int) -> torch.Tensor:
    return _recursion(_frames_first(dists, smoothing, directions)) * -smoothing


def otam_distance(dists: torch.Tensor, smoothing: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """One-direction OTAM cost. dists (..., Lq, Ls) -> (...,)."""
    return _otam(dists, smoothing, 1)


def otam_bidirectional(dists: torch.Tensor, smoothing: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """OTAM(query -> support) + OTAM(support -> query). dists (..., Lq, Ls) -> (...,)."""
    if dists.shape[-1] == dists.shape[-2]:  # both directions in one recursion: half the Python ops
        both = _otam(dists, smoothing, 2)
        return both[0] + both[1]
    return otam_distance(dists, smoothing) + otam_distance(dists.transpose(-1, -2), smoothing)


def otam_distance_loop(dists: torch.Tensor, smoothing: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """The released recursion cell by cell (slow; the reference `otam_distance` is checked on)."""
    padded = F.pad(dists, (1, 1))
    n_rows, n_cols = padded.shape[-2], padded.shape[-1]
    cum = [[torch.zeros_like(padded[..., 0, 0]) for _ in range(n_cols)] for _ in range(n_rows)]

    def softmin(*values: torch.Tensor) -> torch.Tensor:
        return -smoothing * torch.logsumexp(torch.stack([-v / smoothing for v in values]), dim=0)

    for m in range(1, n_cols):
        cum[0][m] = padded[..., 0, m] + cum[0][m - 1]
    for r in range(1, n_rows):
        cum[r][1] = padded[..., r, 1] + softmin(cum[r - 1][0], cum[r - 1][1], cum[r][0])
        for m in range(2, n_cols - 1):
            cum[r][m] = padded[..., r, m] + softmin(cum[r - 1][m - 1], cum[r][m - 1])
        cum[r][-1] = padded[..., r, -1] + softmin(cum[r - 1][-2], cum[r - 1][-1], cum[r][-2])
    return cum[-1][-1]
