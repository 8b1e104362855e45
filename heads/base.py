"""The one head API: per-video features once, then support set, then query scores, then a loss.

Every head follows easyfsl's two calls plus a third, episode-independent one:

    feats = head.video_features(inputs)                     # per video, reusable across episodes
    head.process_support_set(support, support_labels, class_ids)
    scores = head(query)                                    # (Q, N): argmax is the prediction
    loss = head.loss(query_labels)                          # uses what the two calls above kept

Training draws its episodes from `head.train_sampler(...)` and takes `head.episode_loss(episode,
inputs)`: the calls above by default; a head that trains otherwise (e.g. on batches) overrides both.
`inputs` maps the roles a head declares in `head.inputs(spec)` to store tensors of one view,
shape (B, T, ...). Feature dicts hold tensors with the video on axis 0. All episode calls also
accept a leading episode axis (support (E, S, ...), labels (E, S), class_ids (E, N), query
(E, Q, ...) -> (E, Q, N)) so evaluation can score many episodes in one call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from store.layout import TEXT_DEFAULT

from .episodes import Episode, EpisodeSampler

if TYPE_CHECKING:
    import pandas as pd

    from .config import TrainConfig

Features = dict[str, torch.Tensor]


def last_layer(spec: dict[str, Any]) -> int:
    """The deepest cached layer number (1-based), from the store spec: a `ts` store without `emp`
    caches `cls/layerDD` of its last block (DD = depth) and no `tokens/` layers."""
    return int(spec["layers"][-1]) if spec.get("layers") else int(spec["depth"])


def cosine_similarity(x: torch.Tensor, y: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """Cosine between the last axes of x (..., n, D) and y (..., m, D) -> (..., n, m).

    As in the released EMP-Net/CLIP-FSAR code: `eps` is added to the product of norms.
    """
    numerator = x @ y.transpose(-1, -2)
    denominator = x.norm(dim=-1).unsqueeze(-1) * y.norm(dim=-1).unsqueeze(-2) + eps
    return numerator / denominator


def cosine_matrix(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`F.cosine_similarity` of every x (..., n, D) with every y (..., m, D) -> (..., n, m).

    Normalised as torch's (each norm clamped at `eps`), then one batched product instead of the
    broadcast (..., n, m, D) elementwise product (equal up to float rounding)."""
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(eps)
    return x @ y.transpose(-1, -2)


def frame_cosine(
    query: torch.Tensor,
    support: torch.Tensor,
    eps: float = 0.01,
    query_norms: torch.Tensor | None = None,
    support_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Frame-to-frame cosine of every query against every support of each episode.

    query (..., Q, Tq, D), support (..., N, Ts, D) -> (..., Q, N, Tq, Ts); equal to
    `cosine_similarity(query.unsqueeze(-3), support.unsqueeze(-4), eps)`, but computed as one
    (Q*Tq, D) x (D, N*Ts) product per episode: the broadcast form runs Q*N tiny matmuls and is
    most of the cost of OTAM evaluation on CPU. Frame norms (..., Q, Tq) and (..., N, Ts) may be
    passed in when they were computed once per video.
    """
    *lead, n_q, t_q, dim = query.shape
    n_s, t_s = support.shape[-3], support.shape[-2]
    q = query.reshape(-1, n_q * t_q, dim)
    s = support.reshape(-1, n_s * t_s, dim)
    numerator = torch.bmm(q, s.transpose(1, 2)).reshape(*lead, n_q, t_q, n_s, t_s)
    q_norm = query.norm(dim=-1) if query_norms is None else query_norms
    s_norm = support.norm(dim=-1) if support_norms is None else support_norms
    denominator = q_norm[..., :, None, :, None] * s_norm[..., None, :, None, :] + eps
    return numerator.transpose(-3, -2) / denominator  # (..., Q, N, Tq, Ts)


def one_video_per_class(labels: torch.Tensor, n_way: int) -> bool:
    """Whether support labels (E, S) give every class exactly one video (a 1-shot support set)."""
    if labels.shape[-1] != n_way:
        return False
    arange = torch.arange(n_way, device=labels.device)
    return bool((labels.sort(-1).values == arange).all())


def table_class_means(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Means of rows of `table` (V, ...) over the last axis of `index` (E, N, K) -> (E, N, ...).

    One `embedding_bag` (each row read once, none copied out): evaluation forms K-shot prototypes
    from its per-video feature table with it, and `class_means` uses the same kernel on gathered
    supports, so both give the same bits."""
    flat = table.reshape(table.shape[0], -1)
    means = torch.nn.functional.embedding_bag(index.reshape(-1, index.shape[-1]), flat, mode="mean")
    return means.reshape(*index.shape[:-1], *table.shape[1:])


def class_means(values: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Per-class mean over the support axis: values (E, S, ...), labels (E, S) -> (E, N, ...)."""
    n_support = values.shape[1]
    if n_support % n_way == 0:  # the sampler's class-major order: a reshape instead of a product
        shot = n_support // n_way
        ordered = torch.arange(n_way, device=labels.device).repeat_interleave(shot)
        if torch.equal(labels, ordered.expand_as(labels)):
            if shot == 1:
                return values.reshape(values.shape[0], n_way, *values.shape[2:])
            index = torch.arange(values.shape[0] * n_support, device=values.device)
            means = table_class_means(values.flatten(0, 1), index.view(-1, n_way, shot))
            return means.reshape(values.shape[0], n_way, *values.shape[2:])
    one_hot = torch.nn.functional.one_hot(labels, n_way).to(values.dtype)  # (E, S, N)
    counts = one_hot.sum(1).clamp_min(1.0)  # (E, N)
    flat = values.reshape(values.shape[0], values.shape[1], -1)
    means = torch.einsum("esn,esf->enf", one_hot, flat) / counts.unsqueeze(-1)
    return means.reshape(values.shape[0], n_way, *values.shape[2:])


class FewShotHead(nn.Module, ABC):
    """Base class: subclasses fill in `inputs`, `video_features`, `_support`, `_query`, `_loss`."""

    name = "base"
    trainable = True
    uses_text = False

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("class_text", torch.zeros(0, 0, 0), persistent=False)
        self._batched = True

    # ---------------------------------------------------------------- set-up
    @abstractmethod
    def inputs(self, spec: dict[str, Any]) -> dict[str, str]:
        """Roles this head reads -> store tensor names (e.g. {"cls": "cls/layer12"})."""

    def set_class_text(self, text: torch.Tensor) -> None:
        """Text embeddings of every store class, (C, M templates, D); indexed by class_ids."""
        self.class_text = text.to(self.class_text.device, torch.float32)

    def prepare(self, store: Any) -> None:
        """Load what the head needs from an open store besides row tensors (class texts, weights)."""
        if self.uses_text:
            text, _ = store.text(TEXT_DEFAULT)
            self.set_class_text(torch.from_numpy(text))

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this head (saved in checkpoints)."""
        return dict(self._config)

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]] | None:
        """Named optimiser groups of (name, parameter), each with its own learning rate
        (`TrainConfig.group_lr`); None (default): one group of every parameter."""
        return None

    # ---------------------------------------------------------------- per video
    @abstractmethod
    def video_features(self, inputs: Features) -> Features:
        """Episode-independent features of a batch of videos (B, ...)."""

    def cache_features(self, features: Features, class_ids: torch.Tensor, shot: int) -> Features:
        """Evaluation only: precompute what does not depend on the episode (default: nothing).

        `class_ids` (B,) are the videos' own classes; `shot` tells whether a prototype is a
        single video (shot 1), which lets support-side work be done per video.
        """
        return features

    def support_means(self, shot: int) -> tuple[str, ...] | None:
        """Evaluation only: the features this head reads from K-shot supports, if it reads them
        only through `class_means` (default None: it needs every support as it is).

        For such heads evaluation forms the per-class means from its per-video feature table
        (`table_class_means`, no copy of each support) and passes them as a support set of one
        video per class, labels 0..N-1; that gives the same result as the supports themselves."""
        return None

    # ---------------------------------------------------------------- per episode
    def process_support_set(
        self, support: Features, support_labels: torch.Tensor, class_ids: torch.Tensor
    ) -> None:
        """Keep what the queries need. support_labels in [0, N); class_ids (N,) store labels."""
        self._batched = support_labels.dim() == 2
        if not self._batched:
            support = {k: v.unsqueeze(0) for k, v in support.items()}
            support_labels = support_labels.unsqueeze(0)
            class_ids = class_ids.unsqueeze(0)
        self._support(support, support_labels, class_ids)

    def forward(self, query: Features) -> torch.Tensor:
        """Scores (Q, N) or (E, Q, N) for the last support set; higher is more likely."""
        if not self._batched:
            query = {k: v.unsqueeze(0) for k, v in query.items()}
        scores = self._query(query)
        return scores if self._batched else scores.squeeze(0)

    def loss(self, query_labels: torch.Tensor) -> torch.Tensor:
        """Training loss of the last forward (mean over episodes)."""
        if query_labels.dim() == 1:
            query_labels = query_labels.unsqueeze(0)
        return self._loss(query_labels)

    # ---------------------------------------------------------------- training
    def train_sampler(self, manifest: pd.DataFrame, cfg: TrainConfig) -> EpisodeSampler:
        """The training episodes over the train split's `manifest`: `cfg`'s way, shot and query."""
        return EpisodeSampler(
            manifest, cfg.way, cfg.shot, cfg.query, cfg.seed, cfg.episodes, "train"
        )

    def episode_loss(self, episode: Episode, inputs: Features) -> torch.Tensor:
        """Training loss of one episode; `inputs` hold its support rows, then its query rows."""
        device = next(iter(inputs.values())).device
        features = self.video_features(inputs)
        n_support = len(episode.support_rows)
        self.process_support_set(
            {k: v[:n_support] for k, v in features.items()},
            torch.as_tensor(episode.support_labels, device=device),
            torch.as_tensor(episode.class_ids, device=device),
        )
        self({k: v[n_support:] for k, v in features.items()})
        return self.loss(torch.as_tensor(episode.query_labels, device=device))

    @abstractmethod
    def _support(self, support: Features, labels: torch.Tensor, class_ids: torch.Tensor) -> None:
        """Build this episode batch's class representations from the support features."""

    @abstractmethod
    def _query(self, query: Features) -> torch.Tensor:
        """Logits (E, Q, N) of the queries against the representations `_support` built."""

    @abstractmethod
    def _loss(self, query_labels: torch.Tensor) -> torch.Tensor:
        """Training loss of the last `_query` call, given labels (E, Q)."""

    # ---------------------------------------------------------------- text helpers
    def episode_text(self, class_ids: torch.Tensor) -> torch.Tensor:
        """(E, N, D) class texts: one random template per episode in training, the mean at test."""
        if self.class_text.numel() == 0:
            raise RuntimeError(f"head {self.name!r} needs class texts: call set_class_text first")
        if self.training:
            n_templates = self.class_text.shape[1]
            template = torch.randint(n_templates, (class_ids.shape[0],))
            picked = self.class_text[:, template.to(self.class_text.device)]  # (C, E, D)
            return picked.permute(1, 0, 2)[
                torch.arange(class_ids.shape[0], device=class_ids.device).unsqueeze(1), class_ids
            ]
        return self.class_text.mean(1)[class_ids]
