"""EMP-Net (Wu et al. 2024) on cached CLIP tokens, as the authors' released code behaves.

Dimensions follow the store dim D (nothing assumes 512 channels, 8 frames or 196 patches):
attention has 4 heads of size D/8, the FFN hidden size is D/4.

Per video (episode-independent, `video_features`):
  x4 = ST1(layer04); x8 = ST2(x4 + layer08); x = ST3(x8 + layer12)       (skip fusion)
  token = TL_token(per-frame CLS over time)
  patch = TL_patch([refined CLS; patches] per frame)[1:]
  frame = TL_frame(mean over patches of refined patches + mean over unrefined patches)
Per episode: text-visual probabilities for supports and queries on these levels, then text
fusion (supports: q = feature + class text, k = v = [feature; text]; queries: self-attention)
on class prototypes, then bidirectional OTAM per level. Prediction = mean of the six
probability vectors; loss = sum of six cross-entropies. `loss="ce"` (default) applies them to the
scores times a learnable scale per score (init 1/temperature); `loss="released"` applies them to
the probabilities (the released double softmax, whose gradients are too small to escape the
plateau a strong shared component puts it on: docs/reproducing.md).

Dropout as released (nn.Dropout, 0.2 after attention, 0.05 in the FFN); attention is
F.scaled_dot_product_attention, the released softmax(q k^T / sqrt(d)) v.

Paper-text options (off by default, the released code has neither): `layer_weights` learns the
weights of the skip-fusion sums (starting from `layer_weight_init`), `score_weights` learns the
weights that combine the scores.
`released_5shot_text` reproduces a quirk of the released code (off by default): the class texts
of the text-visual scores come from the first five (shuffled) supports only, see `released_text_ids`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from store.layout import token_name

from .base import Features, FewShotHead, class_means, cosine_similarity, frame_cosine
from .config import ConfigError
from .episodes import draw_keys
from .otam import DEFAULT_LAMBDA, otam_bidirectional

LEVELS = ("token", "patch", "frame")
RELEASED_TEXT_SLOTS = 5  # models/base/few_shot.py:1369-1370: `for i in range(5): for j in range(5)`


def released_text_ids(
    labels: torch.Tensor, class_ids: torch.Tensor, fallback: torch.Tensor
) -> torch.Tensor:
    """The class ids whose texts the released code scores against (models/base/few_shot.py:1368-1379).

    It fills `real_unique_labels[i]` (zeros, i < 5) from supports j < 5 only, after shuffling the
    supports (datasets/base/ssv2_few_shot.py:262-264); a class with none of its supports among the
    first five keeps id 0, the first class of the split (`fallback`, (E,)). With 1-shot 5-way every
    class is there; with 5 shots 94% of episodes lose at least one. fsar's supports are class-major,
    so the first five are drawn here: the five slots with the smallest hash of the episode's class
    ids and the slot (deterministic, so evaluation stays reproducible). labels (E, S), class_ids (E, N).
    """
    n_way = class_ids.shape[1]
    slots = np.arange(labels.shape[1])
    episode = draw_keys(*class_ids.cpu().numpy().astype(np.uint64).T)  # (E,): one key per class set
    keys = draw_keys(episode[:, None], slots)  # (E, S)
    first = np.argsort(keys, axis=1, kind="stable")[:, :RELEASED_TEXT_SLOTS]
    chosen = torch.as_tensor(first, device=labels.device)
    present = F.one_hot(labels.gather(1, chosen), n_way).amax(1).bool()  # (E, N)
    present[:, RELEASED_TEXT_SLOTS:] = False  # labels i >= 5 are never filled
    return torch.where(present, class_ids, fallback.unsqueeze(1))


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections and a dropout-ed output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q is k and k is v:  # self-attention: one product with the three weights stacked
            w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
            return self.attend(*F.linear(q, w).chunk(3, dim=-1))
        return self.attend(self.to_q(q), self.to_k(k), self.to_v(v))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of projected q (B, n, h*d) over projected k, v (B, m, h*d), then to_out."""

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, n, h*d) -> (B, h, n, d)
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Sequential):
    """Linear D -> hidden, GELU, dropout, Linear hidden -> D, dropout (no norm)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )


class TransformerLayer(nn.Module):
    """Released `Transformer_v1`: one LayerNorm on q, k and v; residual on the un-normed q; FFN."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        hidden: int,
        attn_dropout: float,
        ffn_dropout: float,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim, attn_dropout)
        self.ffn = FeedForward(dim, hidden, ffn_dropout)

    def forward(self, q: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        q_normed = self.norm(q)
        kv_normed = q_normed if kv is None else self.norm(kv)
        x = self.attn(q_normed, kv_normed, kv_normed) + q
        return self.ffn(x) + x

    def fuse_text(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """`forward(x + t, [x; t])` with one text token t per sequence: x (S, T, D), text (G, D),
        each text shared by S / G consecutive sequences. The text's norm and key/value projections
        run once per text, not per sequence (EMP-Net's patch level has P sequences per text)."""
        s, length, d = x.shape
        groups = text.shape[0]
        q = (x.view(groups, s // groups, length, d) + text.view(groups, 1, 1, d)).view(s, length, d)
        x_normed, text_normed = self.norm(x), self.norm(text)

        def with_text(proj: nn.Linear) -> torch.Tensor:  # (S, T + 1, h*d): [x; t] projected
            t = proj(text_normed).unsqueeze(1).expand(groups, s // groups, -1)
            return torch.cat([proj(x_normed), t.reshape(s, 1, -1)], dim=1)

        attn = self.attn
        x = attn.attend(attn.to_q(self.norm(q)), with_text(attn.to_k), with_text(attn.to_v)) + q
        return self.ffn(x) + x


class SpatioTemporalBlock(nn.Module):
    """Released `Transformer_v3`: patch self-attention per frame, CLS self-attention over time, shared FFN."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        hidden: int,
        attn_dropout: float,
        ffn_dropout: float,
    ) -> None:
        super().__init__()
        self.norm_spatial = nn.LayerNorm(dim)
        self.attn_spatial = Attention(dim, heads, head_dim, attn_dropout)
        self.norm_temporal = nn.LayerNorm(dim)
        self.attn_temporal = Attention(dim, heads, head_dim, attn_dropout)
        self.ffn = FeedForward(dim, hidden, ffn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, L, D) with the CLS token first in L."""
        b, t, length, d = x.shape
        patches = x[:, :, 1:].reshape(b * t, length - 1, d)
        cls = x[:, :, 0]
        p = self.norm_spatial(patches)
        patches = self.attn_spatial(p, p, p) + patches
        c = self.norm_temporal(cls)
        cls = self.attn_temporal(c, c, c) + cls
        x = torch.cat([cls.unsqueeze(2), patches.reshape(b, t, length - 1, d)], dim=2)
        return self.ffn(x) + x


def parse_levels(levels: str | Sequence[str]) -> tuple[str, ...]:
    """'token,patch' -> ('token', 'patch'); must be token | token,patch | token,patch,frame."""
    names = (
        tuple(s.strip() for s in levels.split(",")) if isinstance(levels, str) else tuple(levels)
    )
    if names not in {LEVELS[:1], LEVELS[:2], LEVELS}:
        raise ConfigError(
            f"levels must be token, token,patch or token,patch,frame (got {','.join(names)})"
        )
    return names


class EMPNet(FewShotHead):
    """EMP-Net head. `heads.create("emp", dim=512)` has 7,495,296 trainable parameters."""

    name = "emp"
    uses_text = True

    def __init__(
        self,
        dim: int = 512,
        heads: int = 4,
        head_dim: int | None = None,
        ffn_dim: int | None = None,
        attn_dropout: float = 0.2,
        ffn_dropout: float = 0.05,
        levels: str | Sequence[str] = LEVELS,
        no_text: bool = False,
        no_skip_fusion: bool = False,
        otam_lambda: float = DEFAULT_LAMBDA,
        cosine_eps: float = 0.01,
        loss: str = "ce",
        temperature: float | None = None,
        text_temperature: float = 0.07,
        learn_temperature: bool = True,
        layer_weights: bool = False,
        layer_weight_init: float = 1.0,
        score_weights: bool = False,
        released_5shot_text: bool = False,
    ) -> None:
        super().__init__()
        self.released_5shot_text = released_5shot_text
        self.register_buffer("split_first", torch.zeros(0, dtype=torch.long), persistent=False)
        self.levels = parse_levels(levels)
        self.dim = dim
        self.use_text = self.uses_text = not no_text
        self.skip_fusion = not no_skip_fusion
        self.otam_lambda = otam_lambda
        self.cosine_eps = cosine_eps
        if loss not in ("ce", "released"):
            raise ConfigError(f"loss must be ce or released (got {loss!r})")
        self.loss_kind = loss
        self.temperature = temperature
        head_dim = head_dim or dim // 8
        ffn_dim = ffn_dim or dim // 4
        if min(heads, head_dim, ffn_dim) < 1:
            raise ConfigError(
                f"heads, head_dim and ffn_dim must be at least 1 (got {heads}, {head_dim}, {ffn_dim})"
            )
        self._config: dict[str, Any] = dict(
            dim=dim, heads=heads, head_dim=head_dim, ffn_dim=ffn_dim, attn_dropout=attn_dropout,
            ffn_dropout=ffn_dropout, levels=",".join(self.levels), no_text=no_text,
            no_skip_fusion=no_skip_fusion, otam_lambda=otam_lambda, cosine_eps=cosine_eps,
            loss=loss, temperature=temperature, text_temperature=text_temperature,
            learn_temperature=learn_temperature, layer_weights=layer_weights,
            score_weights=score_weights,
        )  # fmt: skip
        if layer_weight_init != 1.0:
            self._config["layer_weight_init"] = layer_weight_init
        if released_5shot_text:
            self._config["released_5shot_text"] = True
        block_args = (dim, heads, head_dim, ffn_dim, attn_dropout, ffn_dropout)
        n_blocks = 3 if self.skip_fusion else 1
        self.spatiotemporal = nn.ModuleList(
            SpatioTemporalBlock(*block_args) for _ in range(n_blocks)
        )
        self.refine = nn.ModuleDict({lv: TransformerLayer(*block_args) for lv in self.levels})
        self.fusion = nn.ModuleDict(
            {lv: TransformerLayer(*block_args) for lv in self.levels} if self.use_text else {}
        )
        self.layer_weights = (
            nn.Parameter(torch.full((2,), float(layer_weight_init)))
            if layer_weights and self.skip_fusion
            else None
        )
        n_scores = len(self.levels) * (2 if self.use_text else 1)
        self.score_weights = nn.Parameter(torch.zeros(n_scores)) if score_weights else None
        # log of the scale applied to each score (match scores first, then text scores)
        scale = [1.0 / (temperature or 1.0)] * len(self.levels)
        scale += [1.0 / text_temperature] * (n_scores - len(self.levels))
        log_scale = torch.tensor(scale).log()
        if loss == "ce" and learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            fixed = log_scale if loss == "ce" else torch.zeros(n_scores)
            self.register_buffer("log_scale", fixed, persistent=False)

    def prepare(self, store: Any) -> None:
        super().prepare(store)
        # the first class of each class's split: the released text index 0 (released_5shot_text)
        split_of = dict(zip(store.manifest["label"], store.manifest["split"], strict=True))
        first: dict[str, int] = {}
        for label in sorted(split_of):
            first.setdefault(split_of[label], int(label))
        table = [first.get(split_of.get(c, ""), 0) for c in range(len(store.classes))]
        self.split_first = torch.tensor(table, dtype=torch.long, device=self.class_text.device)

    # ---------------------------------------------------------------- per video
    def inputs(self, spec: dict[str, Any]) -> dict[str, str]:
        layers = [int(k) for k in spec["layers"]]
        if not layers:
            raise ConfigError(
                "head emp reads tokens/ layers: extract with --recipe emp (or emp+ts)"
            )
        if not self.skip_fusion:
            return {"deep": token_name(layers[-1])}
        return {
            "shallow": token_name(layers[0]),
            "middle": token_name(layers[1]),
            "deep": token_name(layers[-1]),
        }

    def video_features(self, inputs: Features) -> Features:
        if self.skip_fusion:
            w = self.layer_weights
            x = self.spatiotemporal[0](inputs["shallow"].float())
            x = self.spatiotemporal[1]((x if w is None else w[0] * x) + inputs["middle"].float())
            x = self.spatiotemporal[2]((x if w is None else w[1] * x) + inputs["deep"].float())
        else:
            x = self.spatiotemporal[0](inputs["deep"].float())
        b, t, length, d = x.shape
        token = self.refine["token"](x[:, :, 0])  # over time
        out: Features = {"token": token}
        if "patch" in self.levels:
            per_frame = torch.cat([token.unsqueeze(2), x[:, :, 1:]], dim=2).reshape(
                b * t, length, d
            )
            patch = self.refine["patch"](per_frame)[:, 1:].reshape(b, t, length - 1, d)
            out["patch"] = patch
            if "frame" in self.levels:
                out["frame"] = self.refine["frame"](patch.mean(2) + x[:, :, 1:].mean(2))
        return out

    def _text_scores(self, feats: Features, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cosine-based video-text scores per level before fusion. feats (..., T, [P,] D), text (..., C, D)."""
        eps = self.cosine_eps
        scores = {}
        if "token" in feats:
            scores["token"] = cosine_similarity(feats["token"], text, eps).mean(-2)
        if "patch" in feats:
            patch = feats["patch"]  # (..., T, P, D)
            cos = cosine_similarity(patch, text.unsqueeze(-3), eps).mean(-3)  # (..., P, C)
            top = max(1, patch.shape[-2] // 4)
            scores["patch"] = torch.topk(cos, top, dim=-2).values.mean(-2)
        if "frame" in feats:
            cos = cosine_similarity(feats["frame"], text, eps)  # (..., T, C)
            scores["frame"] = torch.topk(cos, min(2, cos.shape[-2]), dim=-2).values.mean(-2)
        return scores

    def _fuse(self, level: str, feature: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        """Text fusion of a (..., T, [P,] D) level; text (..., D) or None for plain self-attention.

        Returns the matching sequence (..., T, D) (patch level: spatial mean after fusion).
        """
        layer = self.fusion[level]
        # patch level: (..., P, T, D), attention over time per patch position, P sequences per text
        seq = feature.transpose(-2, -3) if level == "patch" else feature
        lead = seq.shape[:-2]
        flat = seq.reshape(-1, *seq.shape[-2:])
        if text is None:
            fused = layer(flat)
        else:
            fused = layer.fuse_text(flat, text.reshape(-1, text.shape[-1]))
        fused = fused.reshape(*lead, *fused.shape[-2:])
        return fused.mean(-3) if level == "patch" else fused

    def _plain(self, level: str, feature: torch.Tensor) -> torch.Tensor:
        """Matching sequence without text fusion (ablation --no-text)."""
        return feature.mean(-2) if level == "patch" else feature

    def cache_features(self, features: Features, class_ids: torch.Tensor, shot: int) -> Features:
        out = dict(features)
        if self.use_text:
            for lv in self.levels:
                out[f"query_{lv}"] = self._fuse(lv, features[lv], None)
            all_text = self.class_text.mean(1)  # (C, D), template mean (evaluation)
            for lv, s in self._text_scores(features, all_text).items():
                out[f"text_{lv}"] = s  # (B, C)
            if shot == 1:
                own = all_text[class_ids]
                for lv in self.levels:
                    out[f"support_{lv}"] = self._fuse(lv, features[lv], own)
                for lv in self.levels:
                    out.pop(lv)
        else:
            for lv in self.levels:
                out[f"query_{lv}"] = self._plain(lv, features[lv])
                out[f"support_{lv}"] = out[f"query_{lv}"]
            for lv in self.levels:
                out.pop(lv)
        return out

    def support_means(self, shot: int) -> tuple[str, ...] | None:
        if self.released_5shot_text:  # its text ids depend on which supports come first
            return None
        return tuple(lv if self.use_text else f"support_{lv}" for lv in self.levels)

    # ---------------------------------------------------------------- per episode
    def _episode_text_scores(self, feats: Features) -> dict[str, torch.Tensor]:
        """(E, V, N) video-text scores: gathered from cached all-class scores or computed."""
        class_ids = self._text_ids
        if f"text_{self.levels[0]}" in feats:
            n_videos = feats[f"text_{self.levels[0]}"].shape[1]
            index = class_ids.unsqueeze(1).expand(-1, n_videos, -1)
            return {lv: feats[f"text_{lv}"].gather(-1, index) for lv in self.levels}
        text = self._score_text if self._score_text is not None else self.episode_text(class_ids)
        return self._text_scores({lv: feats[lv] for lv in self.levels}, text.unsqueeze(1))

    def _support(self, support: Features, labels: torch.Tensor, class_ids: torch.Tensor) -> None:
        n_way = class_ids.shape[1]
        self._support_labels = labels
        self._class_ids = class_ids
        counts = F.one_hot(labels, n_way).sum(1)
        one_per_class = bool((counts == 1).all())
        self._text = self._score_text = None
        self._text_ids = class_ids
        if self.use_text:
            # one template for the whole episode (random in training, the mean at test)
            if self.released_5shot_text:
                fallback = self.split_first[class_ids[:, 0]] if self.split_first.numel() else 0
                fallback = torch.as_tensor(fallback, device=class_ids.device).expand(len(class_ids))
                self._text_ids = released_text_ids(labels, class_ids, fallback)
                both = self.episode_text(torch.cat([class_ids, self._text_ids], 1))
                self._text, self._score_text = both.split(n_way, 1)
            else:
                self._text = self._score_text = self.episode_text(class_ids)
        self._support_inputs, self._support_text_scores = support, None
        self._prototypes = {}
        for lv in self.levels:
            cached = support.get(f"support_{lv}")
            if cached is not None and (one_per_class or not self.use_text):
                self._prototypes[lv] = class_means(cached, labels, n_way)
            elif self.use_text:  # K-shot: prototypes (features and texts) are formed before fusion
                self._prototypes[lv] = self._fuse(
                    lv, class_means(support[lv], labels, n_way), self._text
                )
            else:
                self._prototypes[lv] = self._plain(lv, class_means(support[lv], labels, n_way))

    @property
    def _support_text(self) -> dict[str, torch.Tensor]:
        """(E, S, N) video-text scores of the last supports: they enter the loss only, so they are
        computed on first use (evaluation never needs them)."""
        if self._support_text_scores is None:
            self._support_text_scores = self._episode_text_scores(self._support_inputs)
        return self._support_text_scores

    def _query_sequences(self, query: Features, level: str) -> torch.Tensor:
        if f"query_{level}" in query:
            return query[f"query_{level}"]
        if self.use_text:
            return self._fuse(level, query[level], None)
        return self._plain(level, query[level])

    def _query(self, query: Features) -> torch.Tensor:
        scores: dict[str, torch.Tensor] = {}
        for lv in self.levels:
            q = self._query_sequences(query, lv)  # (E, Q, T, D)
            s = self._prototypes[lv]  # (E, N, T, D)
            dists = 1 - frame_cosine(q, s, self.cosine_eps)
            scores[f"match_{lv}"] = -otam_bidirectional(dists, self.otam_lambda)  # (E, Q, N)
        self._query_text = self._episode_text_scores(query) if self.use_text else {}
        for lv, s in self._query_text.items():
            scores[f"text_{lv}"] = s
        self._scores = scores
        scale = self.log_scale.exp()
        self._logits = [s * scale[i] for i, s in enumerate(scores.values())]
        probabilities = torch.stack([torch.softmax(s, dim=-1) for s in self._logits])
        if self.score_weights is not None:
            self._prediction = torch.einsum(
                "n,neqc->eqc", torch.softmax(self.score_weights, 0), probabilities
            )
        else:
            self._prediction = probabilities.mean(0)
        return self._prediction

    def _loss(self, query_labels: torch.Tensor) -> torch.Tensor:
        scale = self.log_scale.exp()

        def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            if self.loss_kind == "released":  # cross-entropy applied to probabilities
                logits = torch.softmax(logits, dim=-1)
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

        n_levels = len(self.levels)
        loss = sum(cross_entropy(self._logits[i], query_labels) for i in range(n_levels))
        if self.use_text:
            labels = torch.cat([self._support_labels, query_labels], dim=1)
            for i, lv in enumerate(self.levels):
                both = torch.cat([self._support_text[lv], self._query_text[lv]], dim=1)
                loss = loss + cross_entropy(both * scale[n_levels + i], labels)
        if self.score_weights is not None:  # the learnable combination needs its own term
            log_prediction = torch.log(self._prediction.clamp_min(1e-8))
            loss = loss + F.nll_loss(log_prediction.flatten(0, 1), query_labels.flatten())
        return loss
