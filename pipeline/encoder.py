"""Frozen open_clip encoder for Stage 1: load weights safely, capture the recipe's ViT tensors.

Importing this module registers the architectures in ``pipeline/model_configs`` (e.g. ``fsar-tiny-vit``,
a 12-layer, width-64 ViT on 64x64 images with 16 patches, for tests and the demo) with open_clip.

Public API::

    clip = load_clip("ViT-B-16", "openai", device="cpu")    # -> LoadedClip (frozen, eval mode)
    enc = FrameEncoder(clip, recipe="emp+last")            # layers 4/8/12 (+ input of block 12)
    out = enc(frames)                                      # (B,3,S,S) -> {"tokens/layer04": (B,L,D) fp16, ...}
    tensors, config = export_last_block(clip.model)        # for weights/lastblock.safetensors

``pretrained`` is an open_clip tag (looked up in the local caches first, never retried), ``none`` (seeded
random init, so every worker builds the same weights) or the path of a local weights file (a state dict
as open_clip saves it, ``.safetensors``/``.bin``/``.pt``, loaded with ``weights_only=True``). A TorchScript
archive runs code when loaded (``torch.jit.load``), so it is read only with ``allow_torchscript=True``
(``--allow-torchscript``) or when its sha256 is the published one of OpenAI's archive for the model;
only its tensors are kept.
Errors a user can fix raise :class:`EncoderError` (one-line message; the CLI exits 2).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import threading
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import QuickGELU
from torch import nn

from store.layout import (
    LASTBLOCK_LAYER_SCALE_KEYS,
    LASTBLOCK_RESBLOCK_KEYS,
    encoded_names,
    token_name,
)
from store.layout import default_layers as store_default_layers

__all__ = [
    "EncoderError",
    "PretrainedUnavailable",
    "WeightsFileError",
    "UnsupportedModel",
    "Preprocess",
    "LoadedClip",
    "load_clip",
    "default_layers",
    "tensor_names",
    "FrameEncoder",
    "export_last_block",
    "MODEL_CONFIG_DIR",
    "TINY_MODEL",
    "NONE_SEED",
]

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
TINY_MODEL = "fsar-tiny-vit"
NONE_SEED = 0  # torch seed for `pretrained none`: every worker must build identical random weights
_NET_PROBE_TIMEOUT_S = 3.0
_HF_HOST = "huggingface.co"

_registered = False


def register_model_configs() -> None:
    """Add ``pipeline/model_configs/*.json`` to open_clip's registry (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


register_model_configs()


# --------------------------------------------------------------------------------------------- errors
class EncoderError(Exception):
    """A problem the user can fix (model name, weights, templates); the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class PretrainedUnavailable(EncoderError):
    """A pretrained tag is unknown or its weights are not available here (offline, not cached)."""


class WeightsFileError(EncoderError):
    """A local weights file is missing, unreadable, not a state dict, or for another architecture."""


class UnsupportedModel(EncoderError):
    """The architecture cannot be cached by the recipe (e.g. timm towers, attentional pooling)."""


# --------------------------------------------------------------------------------------------- loading
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


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_offline() -> bool:
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - open_clip depends on huggingface_hub
        return True


def _host_reachable(host: str, port: int = 443, timeout: float = _NET_PROBE_TIMEOUT_S) -> bool:
    """TCP connect within `timeout` seconds (DNS included: it runs in a thread we stop waiting for)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def _sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_state(state: Mapping[str, torch.Tensor]) -> str:
    """Hash of a state dict (names, dtypes, shapes and bytes, in sorted key order)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tag_hint(model_name: str, tag: str) -> str:
    return (
        f"supply a local file with --pretrained /path/to/{model_name}.pt (a state dict as open_clip "
        f"saves it), or pre-populate the Hugging Face cache on a machine with network "
        f"(python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{tag}')\")"
    )


def _resolve_tag(model_name: str, tag: str, cache_dir: str | None) -> tuple[str, dict[str, Any]]:
    """Path of the cached (or freshly downloaded) weights for an open_clip tag; fails fast offline."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        avail = ", ".join(tags) if tags else "none for this model"
        raise PretrainedUnavailable(
            f"unknown pretrained '{tag}' for {model_name}: not an open_clip tag (available: {avail}) "
            f"and no such file"
        )
    if cfg.get("file"):
        return str(cfg["file"]), cfg

    hub = cfg.get("hf_hub", "")
    url = cfg.get("url", "")
    hub_candidates: list[tuple[str, str]] = []
    if hub:
        if hub.endswith("/"):
            repo_id, filename = hub.rstrip("/"), ""
        else:
            repo_id, filename = os.path.split(hub)
        names = (
            [filename]
            if filename
            else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        )
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        hub_candidates = [(repo_id, n) for n in names]

    # 1. local caches only: never touches the network
    if hub_candidates:
        from huggingface_hub import hf_hub_download

        for repo_id, fname in hub_candidates:
            try:
                return hf_hub_download(
                    repo_id, fname, cache_dir=cache_dir, local_files_only=True
                ), cfg
            except Exception:
                pass
    if url:
        cached = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
        if cached.is_file():
            return str(cached), cfg

    # 2. network, only when allowed and reachable (one short probe, no retries)
    where = f"{hub_candidates[0][0]}" if hub_candidates else url
    if _hf_offline():
        raise PretrainedUnavailable(
            f"pretrained '{tag}' for {model_name} is not in the local cache and HF_HUB_OFFLINE is set "
            f"({where}); {_tag_hint(model_name, tag)}"
        )
    if not hub_candidates:
        raise PretrainedUnavailable(
            f"pretrained '{tag}' for {model_name} is only available by URL ({url}) and is not cached; "
            f"{_tag_hint(model_name, tag)}"
        )
    if not _host_reachable(_HF_HOST):
        raise PretrainedUnavailable(
            f"pretrained '{tag}' for {model_name} is not cached and {_HF_HOST} is unreachable; "
            f"{_tag_hint(model_name, tag)}"
        )
    from huggingface_hub import hf_hub_download

    errors = []
    for repo_id, fname in hub_candidates:
        try:
            return hf_hub_download(repo_id, fname, cache_dir=cache_dir, etag_timeout=5), cfg
        except Exception as e:  # noqa: PERF203 - a few candidates at most
            errors.append(f"{fname}: {type(e).__name__}")
    raise PretrainedUnavailable(
        f"could not download pretrained '{tag}' for {model_name} from {where} "
        f"({'; '.join(errors)}); {_tag_hint(model_name, tag)}"
    )


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _read_state_dict(
    path: str, allow_torchscript: bool = False, model_name: str = ""
) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, without unpickling arbitrary objects or running TorchScript
    (unless allowed, or the file is OpenAI's published archive for `model_name`)."""
    p = Path(path)
    if not p.is_file():
        raise WeightsFileError(f"weights file not found: {path}")
    name = p.name
    torchscript = not name.endswith(".safetensors") and _is_torchscript(str(p))
    if torchscript and not (
        allow_torchscript or _published_openai_archive(model_name, _sha256_file(p))
    ):
        raise WeightsFileError(
            f"weights file {name} is a TorchScript archive, which runs code when loaded; "
            f"pass --allow-torchscript if you trust it, or a state dict (torch.save or safetensors)"
        )
    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        elif torchscript:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                obj = torch.jit.load(str(p), map_location="cpu").state_dict()
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        if type(e).__name__ == "UnpicklingError" and "Unsupported global" in str(e):
            why = "it holds Python objects besides tensors (refused: loading them could run code)"
        else:
            why = f"it is not a torch state dict or safetensors file ({type(e).__name__})"
        raise WeightsFileError(
            f"cannot read weights file {name}: {why}; pass a state dict saved by "
            "torch.save(model.state_dict()) or safetensors"
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsFileError(
            f"weights file {name} does not hold a state dict (got {type(obj).__name__})"
        )
    state = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsFileError(f"weights file {name}: entry '{k}' is not a tensor")
        state[k[7:] if str(k).startswith("module.") else str(k)] = v
    for k in ("input_resolution", "context_length", "vocab_size"):  # OpenAI archive extras
        state.pop(k, None)
    return state


def _load_into(
    model: nn.Module, state: dict[str, torch.Tensor], name: str, model_name: str
) -> None:
    """Strictly load `state` into `model`; a mismatch becomes a one-line WeightsFileError."""
    own = model.state_dict()
    non_persistent = {k for k, _ in model.named_buffers()} - set(
        own
    )  # e.g. attn_mask in JIT archives
    for key in non_persistent:
        state.pop(key, None)
    for key in ("logit_scale", "logit_bias"):
        if key in state and key in own and state[key].shape != own[key].shape:
            if state[key].numel() == own[key].numel():
                state[key] = state[key].reshape(own[key].shape)
    state.pop("text.transformer.embeddings.position_ids", None)
    if "logit_bias" in own and "logit_bias" not in state and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(own["logit_bias"])
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} shape mismatches (e.g. {k}: file {list(state[k].shape)} "
                f"vs model {list(own[k].shape)})"
            )
        raise WeightsFileError(
            f"weights file {name} does not fit {model_name}: {', '.join(parts)}; "
            f"pass the matching --model or another file"
        )
    model.load_state_dict(state, strict=True)


def _check_model_name(model_name: str) -> None:
    if model_name not in open_clip.list_models():
        near = get_close_matches(model_name, open_clip.list_models(), n=4, cutoff=0.5)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise UnsupportedModel(f"unknown open_clip model '{model_name}'{hint}")


def _looks_like_path(value: str) -> bool:
    return (
        os.path.exists(value)
        or os.sep in value
        or (os.altsep is not None and os.altsep in value)
        or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
    )


def _published_openai_archive(model_name: str, sha: str) -> bool:
    """True when `sha` is the published hash of one of this model's OpenAI archives (in its URL)."""
    for tag in open_clip.list_pretrained_tags_by_model(model_name) if model_name else []:
        url = open_clip.get_pretrained_cfg(model_name, tag).get("url", "")
        if "openaipublic" in url and url.split("/")[-2] == sha:
            return True
    return False


def _openai_quick_gelu_for_sha(model_name: str, sha: str) -> bool:
    """True when `sha` is the published hash of one of this model's QuickGELU (OpenAI) weight files."""
    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        cfg = open_clip.get_pretrained_cfg(model_name, tag)
        url = cfg.get("url", "")
        if cfg.get("quick_gelu") and "openaipublic" in url and url.split("/")[-2] == sha:
            return True
    return False


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
        (``weights_sha256`` = sha256 of the file bytes).
    quick_gelu: force the activation; by default it follows the tag (OpenAI tags use QuickGELU), and for
        files it is switched on when the file's sha256 is that of OpenAI's published archive; other
        OpenAI-weight files need ``quick_gelu=True`` or the ``<model>-quickgelu`` config (a note says so).
    allow_torchscript: read a TorchScript weights file (it runs code when loaded); OpenAI's published
        archives (sha256 in their URL) are read without it.
    Raises EncoderError subclasses with one-line messages.
    """
    register_model_configs()
    _check_model_name(model_name)
    dev = torch.device(device)
    p = "none" if pretrained is None else str(pretrained)

    state: dict[str, torch.Tensor] | None = None
    weights_path: str | None = None
    tag_cfg: dict[str, Any] = {}
    label: str
    if p.strip().lower() == "none" or p.strip() == "":
        label = "none"
    elif _looks_like_path(p) and not open_clip.get_pretrained_cfg(model_name, p):
        weights_path = p
        label = f"file:{Path(p).name}"
    else:
        weights_path, tag_cfg = _resolve_tag(model_name, p, cache_dir)
        label = p

    sha = ""
    if weights_path is not None:
        state = _read_state_dict(weights_path, allow_torchscript, model_name)
        sha = _sha256_file(weights_path)
        if quick_gelu is None:
            if tag_cfg:
                quick_gelu = bool(tag_cfg.get("quick_gelu", False))
            elif _openai_quick_gelu_for_sha(model_name, sha):
                quick_gelu = True
            elif not tag_cfg and f"{model_name}-quickgelu" in open_clip.list_models():
                print(
                    f"note: {model_name} uses GELU; if {Path(weights_path).name} holds OpenAI weights, "
                    f"use --model {model_name}-quickgelu",
                    file=sys.stderr,
                )
    model_cfg = open_clip.get_model_config(model_name) or {}
    force_qg = bool(quick_gelu) and not model_cfg.get("quick_gelu", False)
    pp_overrides = {
        k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg
    }

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(NONE_SEED)
        # open_clip logs "initialized randomly" before we load the weights ourselves
        prev = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            model = open_clip.create_model(
                model_name,
                pretrained=None,
                device="cpu",
                force_quick_gelu=force_qg,
                force_preprocess_cfg=pp_overrides or None,
                pretrained_hf=False,  # never fetch HF text-tower weights; ours come next
            )
        except Exception as e:
            raise UnsupportedModel(f"cannot build {model_name}: {type(e).__name__}: {e}") from None
        finally:
            logging.disable(prev)
    if quick_gelu is False and model_cfg.get("quick_gelu", False):
        raise UnsupportedModel(
            f"{model_name} is a QuickGELU architecture; quick_gelu=False conflicts"
        )

    if state is not None:
        _load_into(model, state, Path(weights_path or "").name or label, model_name)
    else:
        sha = _sha256_state(model.state_dict())
        print(
            f"warning: {model_name} with pretrained none: random weights (seed {NONE_SEED}); "
            f"features are for tests and demos only",
            file=sys.stderr,
        )

    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    model.to(dev)

    pcfg = open_clip.get_model_preprocess_cfg(model)
    size = pcfg.get("size", model.visual.image_size)
    size_t = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    pre = Preprocess(
        image_size=size_t,
        mean=tuple(float(x) for x in pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(float(x) for x in pcfg.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=str(pcfg.get("interpolation", "bicubic")),
        resize_mode=str(pcfg.get("resize_mode", "shortest")),
        fill_color=int(pcfg.get("fill_color", 0)),
    )
    return LoadedClip(
        model=model,
        model_name=model_name,
        pretrained=label,
        weights_sha256=sha,
        preprocess=pre,
        device=dev,
        weights_path=weights_path,
    )


# --------------------------------------------------------------------------------------------- encoding
def default_layers(depth: int) -> list[int]:
    """1-based layers the recipe caches: [4, 8, 12] for 12 blocks, thirds of the depth otherwise."""
    try:
        return store_default_layers(depth)
    except ValueError as exc:
        raise UnsupportedModel(str(exc)) from None


def tensor_names(recipe: str, layers: Sequence[int]) -> list[str]:
    """Store array names for a recipe (docs/design.md): tokens/layerKK..., plus tokens/layerLL_in."""
    try:
        return encoded_names(recipe, layers)
    except ValueError:
        raise EncoderError(f"unknown recipe '{recipe}' (expected emp or emp+last)") from None


def _check_visual(visual: nn.Module) -> None:
    if not hasattr(visual, "transformer") or not hasattr(visual.transformer, "resblocks"):
        raise UnsupportedModel(
            f"the vision tower {type(visual).__name__} is not an open_clip VisionTransformer "
            f"(timm/ResNet towers are not supported)"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModel("vision towers with attentional pooling are not supported")
    if getattr(visual, "proj", None) is None:
        raise UnsupportedModel("the vision tower has no output projection (proj)")


class FrameEncoder:
    """One forward pass of the frozen visual tower capturing the recipe's tensors.

    Input: preprocessed frames (B, 3, S, S) as a torch tensor or numpy array (any batch composition).
    Output: ``{name: (B, L, D) float16 numpy}`` for ``tokens/layerKK`` (ln_post + proj applied to all
    tokens) and, for recipe ``emp+last``, ``tokens/layerLL_in`` (B, L, W): the raw residual stream
    entering the last block. CPU runs in fp32; CUDA uses autocast (fp16 by default, or bf16).
    """

    def __init__(
        self,
        clip: LoadedClip | nn.Module,
        recipe: str = "emp",
        layers: Sequence[int] | None = None,
        precision: str = "auto",
        device: str | torch.device | None = None,
    ) -> None:
        model = clip.model if isinstance(clip, LoadedClip) else clip
        self.visual: nn.Module = model.visual if hasattr(model, "visual") else model
        _check_visual(self.visual)
        self.depth = len(self.visual.transformer.resblocks)
        self.layers = list(layers) if layers is not None else default_layers(self.depth)
        if (
            any(k < 1 or k > self.depth for k in self.layers)
            or sorted(set(self.layers)) != self.layers
        ):
            raise EncoderError(f"layers {self.layers} must be increasing, within 1..{self.depth}")
        self.recipe = recipe
        self.names = tensor_names(recipe, self.layers)
        if recipe == "emp+last" and self.layers[-1] != self.depth:
            raise EncoderError(
                f"recipe emp+last needs the last cached layer to be the last block ({self.depth}), "
                f"got layers {self.layers}"
            )
        if device is None:
            device = clip.device if isinstance(clip, LoadedClip) else self.visual.proj.device
        self.device = torch.device(device)
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision not in ("fp32", "fp16", "bf16"):
            raise EncoderError(f"unknown precision '{precision}' (fp32, fp16, bf16 or auto)")
        self.precision = precision
        s = self.visual.image_size
        self.image_size = (int(s[0]), int(s[1])) if not isinstance(s, int) else (s, s)
        self.batch_first = bool(getattr(self.visual.transformer, "batch_first", True))

    @property
    def compute(self) -> dict[str, str]:
        """The spec's ``compute`` entry."""
        return {"device": self.device.type, "precision": self.precision}

    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _to_device(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = (
            torch.from_numpy(np.ascontiguousarray(frames))
            if isinstance(frames, np.ndarray)
            else frames
        )
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.image_size:
            raise EncoderError(
                f"frames must be (B, 3, {self.image_size[0]}, {self.image_size[1]}), got {tuple(x.shape)}"
            )
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        return x.float()

    @torch.inference_mode()
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch + class + positional embeddings, patch dropout (identity in eval), ``ln_pre``."""
        v = self.visual
        if hasattr(v, "_embeds"):  # open_clip >= 2.24
            return v._embeds(x)
        x = v.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    @torch.inference_mode()
    def encode_torch(self, frames: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """Like ``__call__`` but returns float32 tensors on the encoder's device (no fp16 rounding).

        Walks the resblocks itself (no hooks), so concurrent calls from several threads are safe.
        """
        x = self._to_device(frames)
        blocks = self.visual.transformer.resblocks
        last = self.layers[-1]
        want = set(self.layers)
        ln_post, proj = self.visual.ln_post, self.visual.proj
        result: dict[str, torch.Tensor] = {}
        with self._autocast():
            h = self._embed(x)
            if not self.batch_first:
                h = h.transpose(0, 1)
            for i, block in enumerate(blocks[:last], start=1):
                if i == last and self.recipe == "emp+last":
                    result["in"] = h
                h = block(h)
                if i in want:
                    tokens = h if self.batch_first else h.transpose(0, 1)
                    result[token_name(i)] = (ln_post(tokens) @ proj).float()
        if self.recipe == "emp+last":
            xin = result.pop("in")
            result[self.names[-1]] = (xin if self.batch_first else xin.transpose(0, 1)).float()
        return {name: result[name] for name in self.names}

    def __call__(self, frames: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        out = self.encode_torch(frames)
        return {k: v.to(torch.float16).cpu().numpy() for k, v in out.items()}


# --------------------------------------------------------------------------------------------- last block


def export_last_block(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The last visual resblock + ``ln_post`` + ``proj`` as float32 CPU tensors and their config.

    Keys and config follow docs/design.md; ``heads.lastblock.load_last_block`` rebuilds the block in
    plain torch. Refuses blocks with features the plain rebuild does not implement (qk-norm, scaled
    cosine attention, extra norms, tanh GELU).
    """
    visual = model.visual if hasattr(model, "visual") else model
    _check_visual(visual)
    block = visual.transformer.resblocks[-1]
    sd = block.state_dict()
    layer_scale = "ls_1.gamma" in sd
    allowed = set(LASTBLOCK_RESBLOCK_KEYS) | (
        set(LASTBLOCK_LAYER_SCALE_KEYS) if layer_scale else set()
    )
    extra = sorted(set(sd) - allowed)
    missing = sorted(set(allowed) - set(sd))
    if extra or missing:
        raise UnsupportedModel(
            f"the last block of {type(visual).__name__} is not a plain CLIP resblock "
            f"(extra {extra[:3]}, missing {missing[:3]})"
        )
    mha = block.attn
    if isinstance(mha, nn.MultiheadAttention):
        if mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
            raise UnsupportedModel("the last block's attention has bias_k/zero-attn/kdim options")
        heads = int(mha.num_heads)
    else:
        heads = int(getattr(mha, "num_heads", 0))
        for attr in ("ln_q", "ln_k", "ln_inner"):
            if not isinstance(getattr(mha, attr, nn.Identity()), nn.Identity):
                raise UnsupportedModel(f"the last block's attention uses {attr}")
        if (
            getattr(mha, "logit_scale", None) is not None
            or getattr(mha, "head_scale", None) is not None
        ):
            raise UnsupportedModel("the last block uses scaled-cosine or head-scaled attention")
    act_mod = block.mlp.gelu
    if isinstance(act_mod, QuickGELU):
        act = "quick_gelu"
    elif isinstance(act_mod, nn.GELU) and act_mod.approximate == "none":
        act = "gelu"
    else:
        raise UnsupportedModel(f"the last block's activation {act_mod!r} is not gelu or quick_gelu")
    eps = {float(block.ln_1.eps), float(block.ln_2.eps), float(visual.ln_post.eps)}
    if len(eps) != 1:
        raise UnsupportedModel(f"the last block's LayerNorms use different eps {sorted(eps)}")
    width = int(block.ln_1.weight.shape[0])
    tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in sd.items()}
    tensors["ln_post.weight"] = visual.ln_post.weight.detach().float().cpu().contiguous().clone()
    tensors["ln_post.bias"] = visual.ln_post.bias.detach().float().cpu().contiguous().clone()
    tensors["proj"] = visual.proj.detach().float().cpu().contiguous().clone()
    config = {
        "width": width,
        "heads": heads,
        "mlp_ratio": float(block.mlp.c_fc.weight.shape[0]) / width,
        "act": act,
        "ln_eps": eps.pop(),
        "layer_scale": layer_scale,
        "dim": int(visual.proj.shape[1]),
    }
    return tensors, config
