"""OTAM (Cao et al. 2020) exactly as the released CLIP-FSAR / EMP-Net code computes it.

The released recursion, for a frame-distance matrix d (query frames x support frames):
the support axis is padded with a zero column on both sides; the top row is a plain
cumulative sum; every later row uses a soft minimum (lambda 0.5)
    softmin(a, b, ...) = -lambda * log(sum exp(-x / lambda))
over three predecessors for the first real column and for the last (pad) column
(up-left, up, left) and over two for the middle columns (up-left, left). Column 0 stays 0.
The score is the bottom-right cell; the bidirectional score adds OTAM of the transposed matrix.

The recursion runs cell by cell in log space (C = -cost / lambda, so a soft minimum is a
`logaddexp`), each cell one vector op over every (episode, query, class) pair at once, with the
frames moved to the front so each cell is a contiguous slice. On CPU at evaluation shapes this is
about twice as fast as a row-wise `logcumsumexp` formulation; tests compare it with the plain
recursion and with brute force over all paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_LAMBDA = 0.5


def otam_distance(dists: torch.Tensor, lbda: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """One-direction OTAM cost. dists (..., Lq, Ls) -> (...,)."""
    n_rows, n_cols = dists.shape[-2], dists.shape[-1]
    scaled = (dists / -lbda).movedim((-2, -1), (0, 1)).contiguous()  # (Lq, Ls, ...)
    zero = torch.zeros_like(scaled[0, 0])
    # top row: plain cumulative sum; column 0 and the last (pad) column add nothing
    top = list(torch.cumsum(scaled[0], dim=0).unbind(0))
    previous = [zero, *top, top[-1]]  # columns 0 .. n_cols + 1
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
    return previous[-1] * -lbda


def otam_bidirectional(dists: torch.Tensor, lbda: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """OTAM(query -> support) + OTAM(support -> query). dists (..., Lq, Ls) -> (...,)."""
    if dists.shape[-1] == dists.shape[-2]:  # both directions in one call: half the Python ops
        both = otam_distance(torch.stack([dists, dists.transpose(-1, -2)]), lbda)
        return both[0] + both[1]
    return otam_distance(dists, lbda) + otam_distance(dists.transpose(-1, -2), lbda)


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
