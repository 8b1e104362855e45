"""A linear probe on the deepest cached patch tokens, matched with OTAM: the simplest trained head.

It projects every patch token with one learned D x D matrix, averages the patches of each frame and
scores queries against class prototypes by bidirectional OTAM on frame cosines, like `otam`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from store.layout import token_name

from .base import Features, last_layer
from .baselines import OTAM
from .otam import DEFAULT_LAMBDA


class LinearProbe(OTAM):
    """`heads.create("probe", dim=D)`: D*D + 1 trainable parameters (projection, logit scale)."""

    name = "probe"
    trainable = True

    def __init__(
        self, dim: int = 512, otam_lambda: float = DEFAULT_LAMBDA, cosine_eps: float = 0.01
    ) -> None:
        super().__init__(otam_lambda, cosine_eps)
        self.projection = nn.Linear(dim, dim, bias=False)
        self.log_scale = nn.Parameter(torch.zeros(()))
        self._config = {"dim": dim, "otam_lambda": otam_lambda, "cosine_eps": cosine_eps}

    def inputs(self, spec: dict[str, Any]) -> dict[str, str]:
        return {"tokens": token_name(last_layer(spec))}

    def video_features(self, inputs: Features) -> Features:
        patches = inputs["tokens"][:, :, 1:].float()  # (B, T, P, D)
        return {"frames": self.projection(patches).mean(2)}  # (B, T, D)

    def _loss(self, query_labels: torch.Tensor) -> torch.Tensor:
        logits = self._logits * self.log_scale.exp()
        return F.cross_entropy(logits.flatten(0, 1), query_labels.flatten())
