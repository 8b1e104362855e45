"""Temporal-attention pooling over the last layer's per-frame CLS, matched to class prototypes.

An fsar head from outside fsar (examples/my_head/README.md): registered as `my-head` through the
`fsar.heads` entry point in pyproject.toml, trained with `fsar-train --head my-head`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from heads import Features, FewShotHead
from heads.base import class_means, cosine_matrix, last_layer
from store.layout import cls_name


class TemporalAttentionHead(FewShotHead):
    """Frames projected (D x D) plus a learned position embedding, pooled over time by `queries`
    learned attention queries into one vector per video; cosine to the class means scores it."""

    def __init__(self, dim: int = 512, queries: int = 4) -> None:
        super().__init__()
        self.projection = nn.Linear(dim, dim)
        self.queries = nn.Parameter(torch.zeros(queries, dim))  # content part of the attention
        self.centres = nn.Parameter(torch.linspace(0, 1, queries))  # where each query looks in time
        self.width = 0.5 / queries  # of each query's window, in units of the clip's length
        self.log_scale = nn.Parameter(torch.tensor(2.3))  # cosine x 10 at the start
        self._config = {"dim": dim, "queries": queries}

    def inputs(self, spec: dict[str, Any]) -> dict[str, str]:
        return {"cls": cls_name(last_layer(spec))}  # the one declaration of what this head reads

    def video_features(self, inputs: Features) -> Features:
        x = self.projection(inputs["cls"].float())  # (B, T, D)
        time = torch.linspace(0, 1, x.shape[1], device=x.device)[:, None]  # (T, 1)
        where = -((time - self.centres) ** 2) / (2 * self.width**2)  # (T, H): order-aware
        attention = torch.softmax(x @ self.queries.T / x.shape[-1] ** 0.5 + where, dim=1)
        return {"video": (attention.transpose(1, 2) @ x).flatten(1)}  # (B, H * D)

    def support_means(self, shot: int) -> tuple[str, ...]:
        return ("video",)  # evaluation may form K-shot prototypes from its feature table

    def _support(self, support: Features, labels: torch.Tensor, class_ids: torch.Tensor) -> None:
        self._prototypes = class_means(support["video"], labels, class_ids.shape[1])  # (E, N, F)

    def _query(self, query: Features) -> torch.Tensor:
        self._logits = cosine_matrix(query["video"], self._prototypes)  # (E, Q, N)
        return self._logits

    def _loss(self, query_labels: torch.Tensor) -> torch.Tensor:
        logits = self._logits * self.log_scale.exp()
        return F.cross_entropy(logits.flatten(0, 1), query_labels.flatten())
