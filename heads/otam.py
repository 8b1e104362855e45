"""OTAM (Cao et al. 2020) exactly as the released CLIP-FSAR / EMP-Net code computes it.

The released recursion, for a frame-distance matrix d (query frames x support frames):
the support axis is padded with a zero column on both sides; the top row is a plain
cumulative sum; every later row uses a soft minimum (lambda 0.5)
    softmin(a, b, ...) = -lambda * log(sum exp(-x / lambda))
over three predecessors for the first real column and for the last (pad) column
(up-left, up, left) and over two for the middle columns (up-left, left). Column 0 stays 0.
The score is the bottom-right cell; the bidirectional score adds OTAM of the transposed matrix.

Each row's left-to-right recursion is linear in exp space, e[m] = a[m] * (b[m] + e[m-1]),
so it is solved with one `logcumsumexp` per row instead of a loop over columns; the result is
the same recursion (tests compare it with brute force over all paths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_LAMBDA = 0.5


def otam_distance(dists: torch.Tensor, lbda: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """One-direction OTAM cost. dists (..., Lq, Ls) -> (...,)."""
    n_rows, n_cols = dists.shape[-2], dists.shape[-1]
    padded = F.pad(dists, (1, 1))  # (..., Lq, Ls + 2)
    previous = torch.cumsum(padded[..., 0, :], dim=-1)  # top row: plain cumulative sum
    zero = torch.zeros_like(padded[..., 0, :1])
    for row in range(1, n_rows):
        d = padded[..., row, :]
        up = -previous / lbda  # exp-space log of the row above
        log_b = torch.cat(
            [
                zero,  # column 0 holds 0: its "left" contribution to column 1
                torch.logaddexp(up[..., 0:1], up[..., 1:2]),  # first real column: up-left, up
                up[..., 1:n_cols],  # middle columns: up-left only
                torch.logaddexp(up[..., n_cols : n_cols + 1], up[..., n_cols + 1 :]),  # last
            ],
            dim=-1,
        )
        log_a = torch.cumsum(torch.cat([zero, -d[..., 1:] / lbda], dim=-1), dim=-1)
        log_a_before = torch.cat([zero, log_a[..., :-1]], dim=-1)
        log_e = log_a + torch.logcumsumexp(log_b - log_a_before, dim=-1)
        previous = -lbda * log_e
    return previous[..., -1]


def otam_bidirectional(dists: torch.Tensor, lbda: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """OTAM(query -> support) + OTAM(support -> query). dists (..., Lq, Ls) -> (...,)."""
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
