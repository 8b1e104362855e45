"""The frozen open_clip model stage 1 encodes with: `load_clip(model, pretrained, device)`.

Importing it registers `pipeline/model_configs` (e.g. `fsar-tiny-vit`, for tests and the demo).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from pipeline.errors import ExtractError, UnsupportedModel
from pipeline.weights import (
    Weights,
    load_weights,
    quick_gelu_for,
    resolve_weights,
    sha256_state,
)
from store.layout import default_layers as store_default_layers

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
TINY_MODEL = "fsar-tiny-vit"
NONE_SEED = 0  # torch seed for `pretrained none`: every worker must build identical random weights
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")  # a tag may set these

_registered = False


def register_model_configs() -> None:
    """Add ``pipeline/model_configs/*.json`` to open_clip's registry (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


register_model_configs()


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing the weights expect (open_clip's ``PreprocessCfg`` fields)."""

    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def to_open_clip(self) -> PreprocessCfg:
        return PreprocessCfg(
            size=self.image_size,
            mean=self.mean,
            std=self.std,
            interpolation=self.interpolation,
            resize_mode=self.resize_mode,
            fill_color=self.fill_color,
        )

    @classmethod
    def of(cls, model: nn.Module) -> Preprocess:
        """The preprocessing open_clip attached to `model` (its tag's, else the architecture's)."""
        pcfg = open_clip.get_model_preprocess_cfg(model)
        size = pcfg.get("size", model.visual.image_size)
        square = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return cls(
            image_size=square,
            mean=tuple(float(x) for x in pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            std=tuple(float(x) for x in pcfg.get("std", open_clip.OPENAI_DATASET_STD)),
            interpolation=str(pcfg.get("interpolation", "bicubic")),
            resize_mode=str(pcfg.get("resize_mode", "shortest")),
            fill_color=int(pcfg.get("fill_color", 0)),
        )

    def transform(self) -> Any:
        """open_clip's own eval transform (PIL image -> (3,S,S) float tensor) for these settings."""
        return image_transform_v2(self.to_open_clip(), is_train=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "fill_color": self.fill_color,
        }


@dataclass
class LoadedClip:
    """A frozen open_clip model plus what the store spec needs to describe it."""

    model: nn.Module
    model_name: str
    pretrained: str  # spec value: the tag, "none", or "file:<basename>"
    weights_sha256: str
    preprocess: Preprocess
    device: torch.device
    weights_path: str | None = None

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def depth(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return int(self.model.visual.transformer.width)

    @property
    def dim(self) -> int:
        return int(self.model.visual.proj.shape[1])

    @property
    def patch_grid(self) -> tuple[int, int]:
        g = self.model.visual.grid_size
        return int(g[0]), int(g[1])

    @property
    def tokens(self) -> int:
        h, w = self.patch_grid
        return 1 + h * w

    @property
    def image_size(self) -> int:
        return int(self.preprocess.image_size[0])

    def tokenizer(self) -> Any:
        return open_clip.get_tokenizer(self.model_name)

    def spec_fields(self) -> dict[str, Any]:
        """The spec keys this model determines (docs/design.md names)."""
        return {
            "model": self.model_name,
            "pretrained": self.pretrained,
            "weights_sha256": self.weights_sha256,
            "image_size": self.image_size,
            "layers": default_layers(self.depth),
            "tokens": self.tokens,
            "dim": self.dim,
            "width": self.width,
            "patch_grid": list(self.patch_grid),
        }


def default_layers(depth: int) -> list[int]:
    """1-based layers the recipe caches: [4, 8, 12] for 12 blocks, thirds of the depth otherwise."""
    try:
        return store_default_layers(depth)
    except ValueError as exc:
        raise UnsupportedModel(str(exc)) from None


def resolve_device(device: str) -> str:
    """fsar-extract's --device: `auto` -> `cuda` when a GPU is visible, else `cpu` (no cuda:N:
    each worker picks its GPU)."""
    from runtime.device import DeviceError, pick_device

    try:
        return pick_device(device, indexed=False).type
    except DeviceError as error:
        raise ExtractError(str(error)) from None


def _check_model_name(model_name: str) -> None:
    if model_name not in open_clip.list_models():
        near = get_close_matches(model_name, open_clip.list_models(), n=4, cutoff=0.5)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise UnsupportedModel(f"unknown open_clip model '{model_name}'{hint}")


def load_clip(
    model_name: str = "ViT-B-16",
    pretrained: str | os.PathLike[str] | None = "openai",
    device: str | torch.device = "cpu",
    *,
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
    allow_torchscript: bool = False,
) -> LoadedClip:
    """Build a frozen open_clip model in eval mode.

    pretrained: an open_clip tag (local caches first; downloads only when online, never retried),
        ``"none"`` (random init seeded with ``NONE_SEED``, a warning is printed; ``weights_sha256`` is the
        sha256 of that init's state dict, identical on every worker), or a local weights file
        (``weights_sha256`` = sha256 of the file bytes). See `pipeline.weights`.
    quick_gelu: force the activation; by default it follows the tag (OpenAI tags use QuickGELU), and for
        files it is switched on when the file's sha256 is that of OpenAI's published archive; other
        OpenAI-weight files need ``quick_gelu=True`` or the ``<model>-quickgelu`` config (a note says so).
    allow_torchscript: read a TorchScript weights file (it runs code when loaded); OpenAI's published
        archives (sha256 in their URL) are read without it.
    Raises EncoderError subclasses with one-line messages.
    """
    register_model_configs()
    _check_model_name(model_name)
    weights = resolve_weights(model_name, pretrained, cache_dir, allow_torchscript)
    model = _build(model_name, weights, quick_gelu)
    sha = _load_weights(model, weights, model_name)
    _freeze(model, torch.device(device))
    return LoadedClip(
        model=model,
        model_name=model_name,
        pretrained=weights.label,
        weights_sha256=sha,
        preprocess=Preprocess.of(model),
        device=torch.device(device),
        weights_path=weights.path,
    )


def _build(model_name: str, weights: Weights, quick_gelu: bool | None) -> nn.Module:
    """The architecture with the activation and preprocessing the weights need, seeded init."""
    if quick_gelu is None:
        quick_gelu = quick_gelu_for(weights, model_name)
    model_cfg = open_clip.get_model_config(model_name) or {}
    if quick_gelu is False and model_cfg.get("quick_gelu", False):
        raise UnsupportedModel(
            f"{model_name} is a QuickGELU architecture; quick_gelu=False conflicts"
        )
    preprocess = {k: weights.tag_cfg[k] for k in PREPROCESS_KEYS if k in weights.tag_cfg}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), _quiet_logging():
        warnings.simplefilter("ignore")
        torch.manual_seed(NONE_SEED)
        try:
            return open_clip.create_model(
                model_name,
                pretrained=None,
                device="cpu",
                force_quick_gelu=bool(quick_gelu) and not model_cfg.get("quick_gelu", False),
                force_preprocess_cfg=preprocess or None,
                pretrained_hf=False,  # never fetch HF text-tower weights; ours come next
            )
        except Exception as e:
            raise UnsupportedModel(f"cannot build {model_name}: {type(e).__name__}: {e}") from None


@contextmanager
def _quiet_logging() -> Iterator[None]:
    """open_clip logs "initialized randomly" before we load the weights ourselves."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _load_weights(model: nn.Module, weights: Weights, model_name: str) -> str:
    """Load the weights file into `model`; the sha256 the spec records (of the init for `none`)."""
    if weights.path is not None:
        load_weights(model, weights, model_name)
        return weights.sha256
    print(
        f"warning: {model_name} with pretrained none: random weights (seed {NONE_SEED}); "
        f"features are for tests and demos only",
        file=sys.stderr,
    )
    return sha256_state(model.state_dict())


def _freeze(model: nn.Module, device: torch.device) -> None:
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    model.to(device)
