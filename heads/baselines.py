"""Training-free baselines on `cls/layer{last}`: zero-shot text, cosine prototypes, OTAM."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from store.layout import cls_name

from .base import (
    Features,
    FewShotHead,
    class_means,
    cosine_matrix,
    frame_cosine,
    last_layer,
    one_video_per_class,
)
from .otam import DEFAULT_LAMBDA, otam_bidirectional


class _ClsHead(FewShotHead):
    trainable = False

    def __init__(self) -> None:
        super().__init__()
        self._config: dict[str, Any] = {}

    def inputs(self, spec: dict[str, Any]) -> dict[str, str]:
        return {"cls": cls_name(last_layer(spec))}

    def _loss(self, query_labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits.flatten(0, 1), query_labels.flatten())


class ZeroShot(_ClsHead):
    """Cosine between the time-mean CLS and the class text (template mean); ignores the support."""

    name = "zeroshot"
    uses_text = True

    def video_features(self, inputs: Features) -> Features:
        return {"video": inputs["cls"].float().mean(1)}  # (B, D)

    def support_means(self, shot: int) -> tuple[str, ...]:
        return ()  # the support is not read

    def _support(self, support: Features, labels: torch.Tensor, class_ids: torch.Tensor) -> None:
        self._text = self.class_text.mean(1)[class_ids]  # (E, N, D)

    def _query(self, query: Features) -> torch.Tensor:
        self._logits = cosine_matrix(query["video"], self._text)
        return self._logits


class Prototypes(_ClsHead):
    """Cosine to class prototypes (support means) of the time-mean CLS."""

    name = "proto"

    def video_features(self, inputs: Features) -> Features:
        return {"video": inputs["cls"].float().mean(1)}

    def support_means(self, shot: int) -> tuple[str, ...]:
        return ("video",)

    def _support(self, support: Features, labels: torch.Tensor, class_ids: torch.Tensor) -> None:
        self._prototypes = class_means(support["video"], labels, class_ids.shape[1])  # (E, N, D)

    def _query(self, query: Features) -> torch.Tensor:
        self._logits = cosine_matrix(query["video"], self._prototypes)
        return self._logits


class OTAM(_ClsHead):
    """Bidirectional OTAM on per-frame CLS, distance 1 - cosine; K-shot prototypes are frame means."""

    name = "otam"

    def __init__(self, otam_lambda: float = DEFAULT_LAMBDA, cosine_eps: float = 0.01) -> None:
        super().__init__()
        self.otam_lambda = otam_lambda
        self.cosine_eps = cosine_eps
        self._config = {"otam_lambda": otam_lambda, "cosine_eps": cosine_eps}

    def video_features(self, inputs: Features) -> Features:
        return {"frames": inputs["cls"].float()}  # (B, T, D)

    def cache_features(self, features: Features, class_ids: torch.Tensor, shot: int) -> Features:
        return {**features, "norms": features["frames"].norm(dim=-1)}  # (B, T), once per video

    def support_means(self, shot: int) -> tuple[str, ...]:
        return ("frames",)  # a prototype's frame norms are its own, not the supports' "norms"

    def _support(self, support: Features, labels: torch.Tensor, class_ids: torch.Tensor) -> None:
        n_way = class_ids.shape[1]
        self._prototypes = class_means(support["frames"], labels, n_way)  # (E, N, T, D)
        self._prototype_norms = None  # a mean of several videos has a norm of its own
        if "norms" in support and one_video_per_class(labels, n_way):
            self._prototype_norms = class_means(support["norms"], labels, n_way)

    def _query(self, query: Features) -> torch.Tensor:
        cosine = frame_cosine(
            query["frames"],
            self._prototypes,
            self.cosine_eps,
            query.get("norms"),
            self._prototype_norms,
        )
        self._logits = -otam_bidirectional(1 - cosine, self.otam_lambda)  # from (E, Q, N, T, T)
        return self._logits
