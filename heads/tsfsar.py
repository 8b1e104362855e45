"""TS-FSAR (Long et al., AAAI 2026) on cached CLIP states, as the authors' released code behaves.

Per video (`video_features`, episode-independent): the side network (`heads.tsfsar_side`) reads the
store's taps (`resid/layerKK`) and gives side tokens per frame; TS-DCM (`heads.tsdcm`) turns each
frame's CLS-weighted patches into an alpha-distance covariance; the Adapter reads the frozen
projected CLS of the last block (`cls/layerDD`) over the frames; the side CLS is lifted to the text
width (`up_norm`, `up_proj`). Both text features are averaged over frames and normalised.
Per episode: prototypes are the class means of the supports' per-frame representations; a
Linear (`generator`) turns the query's mean side CLS plus the mean side CLS of all supports into the
T x T weights of the frame-to-frame cosines. Prediction (`forward`): the product of the three
softmaxes, vision^fuse_vision * clip-text^fuse_clip * side-text^fuse_side (released test fusion).
Loss: vision NLL + GLAC cross-entropy over all base classes (a dropout-ed Linear on the frame-mean
representation) + side-text cross-entropy + kd_weight * (KL(GLAC || adapted CLIP text) at kd_t +
adapted-CLIP-text cross-entropy), over every support and query video of the episode.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from store.layout import (
    TEXT_DEFAULT,
    TEXT_DESCRIPTIONS,
    TSFSAR_INIT_FILE,
    TSFSAR_INIT_NAME,
    cls_name,
    resid_name,
    tsfsar_side_width,
)
from store.layout import spec_taps as layout_taps

from .base import Features, FewShotHead, class_means
from .config import ConfigError
from .episodes import EpisodeSampler
from .tsdcm import frame_representations, task_matching
from .tsfsar_side import (
    Adapter,
    SideNetwork,
    init_assignments,
    load_init,
    temporal_side_blocks,
)

# The released optimiser's groups (utils/optimizer.py:21-35), by the modules they hold here.
PARAMETER_GROUPS = {
    "head": ("classifier.", "up_norm.", "up_proj."),  # names with Linear, up_linear, up_ln
    "generator": ("generator.",),
    "side": ("side.",),
    "adapter": ("adapter.",),
}
LOSS_TERMS = ("vision", "classifier", "side_text", "distill", "clip_text")


class TSFSARNotice(UserWarning):
    """A fallback the head takes (no class descriptions, no side-network initialisation)."""


def parse_layers(value: str | Sequence[int], option: str, at_least: int) -> list[int]:
    """'0,4,8,12' or [0, 4, 8, 12] -> sorted distinct layer numbers >= 0 (at least `at_least`)."""
    try:
        items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
        values = [int(v) for v in items if v != ""]
    except (TypeError, ValueError):
        raise ValueError(f"{option} must be whole numbers, e.g. 0,4,8,12 (got {value!r})") from None
    if len(values) < at_least or min(values, default=0) < 0 or len(set(values)) != len(values):
        raise ValueError(
            f"{option} must be {at_least} or more distinct layers >= 0 (got {value!r})"
        )
    return sorted(values)


def spec_taps(spec: dict[str, Any]) -> list[int]:
    """The taps a store holds (none for a store without `ts`)."""
    return layout_taps(spec) if spec.get("recipe") else [int(t) for t in spec.get("taps") or []]


def distillation(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """Released `DistillKL`: KL(softmax(teacher / t) || softmax(student / t)) summed, * t^2 / rows.
    Gradients reach both sides, as released (the teacher is not detached)."""
    log_student = F.log_softmax(student / t, dim=1)
    teacher_p = F.softmax(teacher / t, dim=1)
    return F.kl_div(log_student, teacher_p, reduction="sum") * t**2 / student.shape[0]


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x| over the last axis (released: no epsilon)."""
    return x / x.norm(dim=-1, keepdim=True)


class TSFSAR(FewShotHead):
    """TS-FSAR head. `heads.create("tsfsar", base_classes=31)` at ViT-B/16 shapes (13 taps)."""

    name = "tsfsar"
    uses_text = True

    def __init__(
        self,
        dim: int = 512,
        width: int = 768,
        taps: str | Sequence[int] = tuple(range(13)),
        depth: int = 12,
        frames: int = 8,
        base_classes: int = 64,
        side_width: int = 256,
        side_heads: int | None = None,
        mlp_ratio: float = 4.0,
        temporal_blocks: str | Sequence[int] | None = None,
        gate_t: float = 0.1,
        gate_init: float = 0.0,
        dc_alpha: float = 0.4,
        res_alpha: float = 0.4,
        dropout: float = 0.7,
        temp_clip: float = 50.0,
        temp_side: float = 50.0,
        kd_t: float = 10.0,
        vision_weight: float = 1.0,
        classifier_weight: float = 1.0,
        side_text_weight: float = 1.0,
        kd_weight: float = 6.0,
        fuse_vision: float = 0.15,
        fuse_clip: float = 0.8,
        fuse_side: float = 0.05,
    ) -> None:
        super().__init__()
        self.taps = parse_layers(taps, "taps", 2)  # two taps or more: one side block or more
        if temporal_blocks is not None:
            temporal_blocks = parse_layers(temporal_blocks, "temporal_blocks", 0)
        self.depth, self.frames = depth, frames
        side_heads = side_heads or max(1, side_width // 64)  # released: EMBED_DIM // 64
        temporal = temporal_side_blocks(self.taps, depth, temporal_blocks)
        self._config: dict[str, Any] = dict(
            dim=dim, width=width, taps=self.taps, depth=depth, frames=frames,
            base_classes=base_classes, side_width=side_width, side_heads=side_heads,
            mlp_ratio=mlp_ratio, temporal_blocks=None if temporal_blocks is None else list(temporal_blocks),
            gate_t=gate_t, gate_init=gate_init, dc_alpha=dc_alpha, res_alpha=res_alpha,
            dropout=dropout, temp_clip=temp_clip, temp_side=temp_side, kd_t=kd_t,
            vision_weight=vision_weight, classifier_weight=classifier_weight,
            side_text_weight=side_text_weight, kd_weight=kd_weight, fuse_vision=fuse_vision,
            fuse_clip=fuse_clip, fuse_side=fuse_side,
        )  # fmt: skip
        self.side = SideNetwork(
            width, side_width, temporal, side_heads, mlp_ratio, gate_t, gate_init
        )
        self.generator = nn.Linear(side_width, frames * frames, bias=False)
        self.adapter = Adapter(dim, res_alpha)
        self.up_norm = nn.LayerNorm(side_width)
        self.up_proj = nn.Linear(side_width, dim, bias=False)
        self.classifier = nn.Linear(side_width * (side_width + 1) // 2, base_classes, bias=False)
        self.classifier_dropout = nn.Dropout(dropout)
        self.dc_alpha, self.kd_t = dc_alpha, kd_t
        self.temperatures = (temp_clip, temp_side)
        self.weights = (vision_weight, classifier_weight, side_text_weight, kd_weight)
        self.fusion = (fuse_vision, fuse_clip, fuse_side)
        self.register_buffer("text_unit", torch.zeros(0, dim), persistent=False)
        self.register_buffer("base_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("base_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.loss_terms: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- set-up
    @classmethod
    def store_options(cls, spec: dict[str, Any], manifest: Any = None) -> dict[str, Any]:
        """Shapes from the store: widths, taps, depth, frames, and the number of train classes."""
        options: dict[str, Any] = dict(
            dim=int(spec["dim"]), width=int(spec["width"]), taps=spec_taps(spec) or None,
            depth=spec.get("depth"), frames=int(spec["frames"]),
            side_width=tsfsar_side_width(int(spec["width"])),
        )  # fmt: skip
        if manifest is not None:
            options["base_classes"] = int(
                manifest.loc[manifest["split"] == "train", "label"].nunique()
            )
        return {k: v for k, v in options.items() if v is not None}

    def inputs(self, spec: dict[str, Any]) -> dict[str, str]:
        have = set(spec_taps(spec))
        missing = [t for t in self.taps if t not in have]
        if missing:
            raise ConfigError(
                f"head tsfsar reads taps {','.join(map(str, self.taps))}; the store has "
                f"{','.join(map(str, sorted(have))) or 'none'}: extract with --recipe ts "
                "(and --taps), or train on fewer taps with --option taps=..."
            )
        roles = {f"tap{t:02d}": resid_name(t) for t in self.taps}
        roles["clip"] = cls_name(self.depth)
        return roles

    def set_class_text(self, text: torch.Tensor) -> None:
        """Class texts (C, M, D) -> one unit vector per class: each text normalised, averaged, then
        normalised again (released `build_embeddings`)."""
        self.text_unit = unit(unit(text.float()).mean(1)).to(self.text_unit.device)

    def prepare(self, store: Any) -> None:
        names = list(store.text_names)
        name = TEXT_DESCRIPTIONS if TEXT_DESCRIPTIONS in names else TEXT_DEFAULT
        if name != TEXT_DESCRIPTIONS:
            warnings.warn(
                f"tsfsar: the store has no text/{TEXT_DESCRIPTIONS} (fsar-extract "
                f"--class-descriptions FILE); using the template set text/{TEXT_DEFAULT}",
                TSFSARNotice,
                stacklevel=2,
            )
        text, _ = store.text(name)
        self.set_class_text(torch.from_numpy(text))
        self.set_base_classes(store.manifest)
        self.load_store_init(store)

    def set_base_classes(self, manifest: Any) -> None:
        """The train split's classes, in label order: the GLAC classifier's rows and their texts."""
        labels = sorted(
            int(x) for x in manifest.loc[manifest["split"] == "train", "label"].unique()
        )
        n_classes = int(manifest["label"].max()) + 1 if len(manifest) else 0
        device = self.text_unit.device
        self.base_ids = torch.tensor(labels, dtype=torch.long, device=device)
        index = torch.full((max(n_classes, len(self.text_unit)),), -1, dtype=torch.long)
        index[labels] = torch.arange(len(labels))
        self.base_index = index.to(device)

    def load_store_init(self, store: Any) -> None:
        """Side blocks and Adapter from the store's `weights/tsfsar_init.safetensors`, if it has one
        made for this head's widths (else they keep their random initialisation, said in one line)."""
        if TSFSAR_INIT_NAME not in store.attrs.get("weights", {}):
            return self._notice(f"the store has no {TSFSAR_INIT_FILE} (extract with --recipe ts)")
        tensors, config = store.read_tsfsar_init()
        mine = self._config
        theirs = (int(config["side_width"]), float(config["mlp_ratio"]), int(config["adapter_dim"]))
        if theirs != (mine["side_width"], float(mine["mlp_ratio"]), mine["dim"]):
            return self._notice(
                f"{TSFSAR_INIT_FILE} is for side width {theirs[0]}, MLP ratio {theirs[1]:g} and "
                f"adapter width {theirs[2]}, the head has {mine['side_width']}, "
                f"{mine['mlp_ratio']:g} and {mine['dim']}"
            )
        if int(config["depth"]) < max(self.taps):
            return self._notice(
                f"{TSFSAR_INIT_FILE} covers {config['depth']} blocks, not tap {max(self.taps)}"
            )
        self.load_init(tensors)

    def _notice(self, why: str) -> None:
        warnings.warn(
            f"tsfsar: {why}; the side network and Adapter start from random weights",
            TSFSARNotice,
            stacklevel=3,
        )

    def load_init(self, tensors: dict[str, Any]) -> None:
        """Side block j from CLIP block taps[j + 1]'s PCA entry, the Adapter from the last block's."""
        values = {k: torch.as_tensor(v) for k, v in tensors.items()}
        load_init(self, init_assignments(values, self.taps))

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """The released optimiser's four groups: head (GLAC classifier, up_norm, up_proj), generator,
        side network, adapter; every trainable parameter is in exactly one."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in PARAMETER_GROUPS}
        for name, parameter in self.named_parameters():
            group = next(g for g, prefixes in PARAMETER_GROUPS.items() if name.startswith(prefixes))
            groups[group].append((name, parameter))
        return groups

    def train_sampler(self, manifest: Any, cfg: Any) -> EpisodeSampler:
        n_train = int(manifest["label"].nunique())
        if n_train != self.classifier.out_features:
            raise ConfigError(
                f"head tsfsar was built for {self.classifier.out_features} train classes, the "
                f"store's train split has {n_train}: build it with --option base_classes={n_train}"
            )
        return super().train_sampler(manifest, cfg)

    # ---------------------------------------------------------------- per video
    def video_features(self, inputs: Features) -> Features:
        side = self.side([inputs[f"tap{t:02d}"] for t in self.taps])  # (B, T, 1 + P, S)
        cls = side[:, :, 0]
        clip = self.adapter(inputs["clip"].float()).mean(1)
        return {
            "adc": frame_representations(side, self.dc_alpha),  # (B, T, S (S + 1) / 2)
            "task": cls.mean(1),  # (B, S): the video's share of the task prototype
            "clip_text": unit(clip),  # (B, D)
            "side_text": unit(self.up_proj(self.up_norm(cls)).mean(1)),  # (B, D)
        }

    def support_means(self, shot: int) -> tuple[str, ...] | None:
        # prototypes are class means of "adc"; the support task vector is the mean of "task" over
        # all supports, which equals the mean of the class means when classes have equal shots
        return ("adc", "task")

    # ---------------------------------------------------------------- per episode
    def _support(self, support: Features, labels: torch.Tensor, class_ids: torch.Tensor) -> None:
        self._support_features, self._support_labels, self._class_ids = support, labels, class_ids
        self._prototypes = class_means(support["adc"], labels, class_ids.shape[1])  # (E, N, T, R)
        self._task_support = support["task"].mean(1)  # (E, S)

    def text_logits(
        self, features: torch.Tensor, class_ids: torch.Tensor, temp: float
    ) -> torch.Tensor:
        """Scaled cosines (E, V, N) of unit features (E, V, D) with the texts of classes (E, N)."""
        if self.text_unit.numel() == 0:
            raise RuntimeError("head 'tsfsar' needs class texts: call set_class_text first")
        return features @ self.text_unit[class_ids].transpose(-1, -2) * temp

    def _query(self, query: Features) -> torch.Tensor:
        self._query_features = query
        frame_weights = self.generator(self._task_support.unsqueeze(1) + query["task"])
        self._vision = task_matching(query["adc"], self._prototypes, frame_weights)  # (E, Q, N)
        temp_clip, temp_side = self.temperatures
        clip = self.text_logits(query["clip_text"], self._class_ids, temp_clip)
        side = self.text_logits(query["side_text"], self._class_ids, temp_side)
        fuse_vision, fuse_clip, fuse_side = self.fusion
        return (
            F.softmax(self._vision, -1).pow(fuse_vision)
            * F.softmax(clip, -1).pow(fuse_clip)
            * F.softmax(side, -1).pow(fuse_side)
        )

    def _loss(self, query_labels: torch.Tensor) -> torch.Tensor:
        support, query = self._support_features, self._query_features
        vision = F.nll_loss(F.log_softmax(self._vision, -1).flatten(0, 1), query_labels.flatten())
        labels = torch.cat(
            [self._support_labels, query_labels], dim=1
        )  # every video of the episode
        base = self.base_index[self._class_ids.gather(1, labels)].flatten()
        if bool((base < 0).any()):
            raise ConfigError("head tsfsar trains on train-split classes only")

        def videos(key: str) -> torch.Tensor:
            return torch.cat([support[key], query[key]], dim=1).flatten(0, 1)

        glac = self.classifier(self.classifier_dropout(videos("adc").mean(1)))
        temp_clip, temp_side = self.temperatures
        base_text = self.text_unit[self.base_ids].T
        clip = videos("clip_text") @ base_text * temp_clip
        side = videos("side_text") @ base_text * temp_side
        terms = {
            "vision": vision,
            "classifier": F.cross_entropy(glac, base),
            "side_text": F.cross_entropy(side, base),
            "distill": distillation(glac, clip, self.kd_t),
            "clip_text": F.cross_entropy(clip, base),
        }
        self.loss_terms = {k: v.detach() for k, v in terms.items()}  # (read without a sync)
        vision_w, classifier_w, side_w, kd_w = self.weights
        return (
            vision_w * terms["vision"]
            + classifier_w * terms["classifier"]
            + side_w * terms["side_text"]
            + kd_w * (terms["distill"] + terms["clip_text"])
        )
