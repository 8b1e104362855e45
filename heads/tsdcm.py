"""TS-DCM, TS-FSAR's matcher (released `trainers/ts_fsar.py`): alpha-distance covariance of CLS-weighted
patches per frame, and a frame-to-frame matrix weighted by a task-specific T x T matrix.

Per frame: the side network's patches, each scaled by its cosine with the frame's CLS, form a
(C channels x P patches) matrix; the alpha-distance covariance of its channels is the doubly
centred matrix of `(|x_i - x_j|^2 / 2P + 1e-5) ** alpha`, kept as its upper triangle (C (C + 1) / 2
values, row-major). Per episode: a query's frames are compared with each class prototype's frames
(the mean of its supports' per-frame representations) by cosine (eps 0.01), and the T x T cosines
are summed with weights a Linear generates from the query's mean CLS plus the mean CLS of all supports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import frame_cosine

DCOV_EPS = 1e-5  # released `torch.pow(dcov + 1e-5, self.alpha)`
MATCH_EPS = 0.01  # released `cos_sim(..., epsilon=0.01)`


def cls_weighted_patches(tokens: torch.Tensor) -> torch.Tensor:
    """tokens (..., 1 + P, C), CLS first -> patches (..., P, C) times their cosine with the CLS."""
    cls, patches = tokens[..., :1, :], tokens[..., 1:, :]
    weight = F.cosine_similarity(cls, patches, dim=-1)
    return weight.unsqueeze(-1) * patches


def alpha_distance_covariance(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """x (B, C, M): C channels of M values -> (B, C, C) doubly centred `(d_ij + 1e-5) ** alpha`,
    d_ij = |x_i - x_j|^2 / 2M (released `Alpha_DC._alpha_dcov`, the same terms in one pass)."""
    gram = x @ (x.transpose(1, 2) / (2 * x.shape[-1]))
    square = gram.diagonal(dim1=1, dim2=2)
    dcov = (square.unsqueeze(1) + square.unsqueeze(2) - 2 * gram).clamp_min(0.0)
    dcov = torch.pow(dcov + DCOV_EPS, alpha)
    row = dcov.mean(2, keepdim=True)
    column = dcov.mean(1, keepdim=True)
    return dcov - row - column + dcov.mean((1, 2), keepdim=True)


def upper_triangle(matrix: torch.Tensor) -> torch.Tensor:
    """(B, C, C) -> (B, C (C + 1) / 2): entries i <= j in row-major order."""
    c = matrix.shape[-1]
    rows, cols = torch.triu_indices(c, c, device=matrix.device)
    return matrix[:, rows, cols]


def frame_representations(side: torch.Tensor, alpha: float) -> torch.Tensor:
    """Side-network tokens (B, T, 1 + P, C) -> per-frame alpha-D representations (B, T, C (C + 1) / 2)."""
    b, t = side.shape[:2]
    weighted = cls_weighted_patches(side.flatten(0, 1))  # (B*T, P, C)
    adc = alpha_distance_covariance(weighted.transpose(1, 2), alpha)
    return upper_triangle(adc).view(b, t, -1)


def task_matching(
    query: torch.Tensor, prototypes: torch.Tensor, frame_weights: torch.Tensor
) -> torch.Tensor:
    """Scores (E, Q, N) of queries (E, Q, T, R) against prototypes (E, N, T, R): the T x T frame
    cosines weighted by `frame_weights` (E, Q, T*T) (index tq * T + ts) and summed."""
    cosines = frame_cosine(query, prototypes, MATCH_EPS)  # (E, Q, N, Tq, Ts)
    return (cosines.flatten(-2) * frame_weights.unsqueeze(2)).sum(-1)
