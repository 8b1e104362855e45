"""Which CLIP weights a run uses, checked before they are loaded: an open_clip tag, `none` or a file.

open_clip looks tags up (`get_pretrained_cfg`, `download_pretrained`) and fixes state dicts up
(`load_checkpoint`); fsar's are the offline policy (caches first, a fast one-line failure), the
sha256 of every file, the TorchScript gate and the one-line refusals of files that do not fit.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from pipeline.errors import ExtractError, PretrainedUnavailable, WeightsFileError

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
_NET_PROBE_TIMEOUT_S = 3.0
_HF_HOST = "huggingface.co"
_HUB_LOCK = threading.Lock()


@dataclass(frozen=True)
class Weights:
    """Resolved weights: the spec's label, the file to load (None for `none`) and its sha256."""

    label: str  # spec value: the tag, "none", or "file:<basename>"
    path: str | None = None
    sha256: str = ""  # of the file; for `none` the hash of the built model's state dict
    torchscript: bool = False  # a TorchScript archive that may be read (allowed or published)
    tag_cfg: dict[str, Any] = field(default_factory=dict)  # open_clip's pretrained cfg of a tag


# --------------------------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sha256_state(state: Mapping[str, torch.Tensor]) -> str:
    """Hash of a state dict (names, dtypes, shapes and bytes, in sorted key order)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- tags
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


def _tag_hint(model_name: str, tag: str) -> str:
    return (
        f"supply a local file with --pretrained /path/to/{model_name}.pt (a state dict as open_clip "
        f"saves it), or pre-populate the Hugging Face cache on a machine with network "
        f"(python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{tag}')\")"
    )


@contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub reads only its cache meanwhile. It reads HF_HUB_OFFLINE when imported; its
    switch at run time is `constants.HF_HUB_OFFLINE` (a lock keeps threads from racing on it)."""
    from huggingface_hub import constants

    with _HUB_LOCK:
        saved = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = saved


def _from_cache(cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The cached file of a tag, as open_clip finds it on the Hugging Face hub, without the network.

    Only the hub entry is looked up: open_clip reaches a tag's bare URL with urllib, which has no
    offline mode (every open_clip 3 tag has a hub entry, and open_clip prefers it)."""
    if not cfg.get("hf_hub"):
        return None
    try:
        with _hub_offline():
            return open_clip.download_pretrained(_hub_only(cfg), cache_dir=cache_dir) or None
    except Exception:  # not cached (huggingface_hub raises its own types, open_clip wraps some)
        return None


def _hub_only(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k != "url"}


def _resolve_tag(model_name: str, tag: str, cache_dir: str | None) -> tuple[str, dict[str, Any]]:
    """The weights file of an open_clip tag, looked up by open_clip: its local caches first (never
    the network), then a download when online; offline it fails at once, saying what to do."""
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
    cached = _from_cache(cfg, cache_dir)
    if cached:
        return cached, cfg
    where = cfg.get("hf_hub") or cfg.get("url", "")
    offline = _offline_reason()
    if offline:
        raise PretrainedUnavailable(
            f"pretrained '{tag}' for {model_name} is not in the local cache and {offline} "
            f"({where}); {_tag_hint(model_name, tag)}"
        )
    try:
        path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as error:
        raise PretrainedUnavailable(
            f"could not download pretrained '{tag}' for {model_name} from {where} "
            f"({type(error).__name__}); {_tag_hint(model_name, tag)}"
        ) from None
    return str(path), cfg


def _offline_reason() -> str | None:
    """Why no download may be tried (HF_HUB_OFFLINE, or the hub unreachable), None when online."""
    if _hf_offline():
        return "HF_HUB_OFFLINE is set"
    if not _host_reachable(_HF_HOST):
        return f"{_HF_HOST} is unreachable"
    return None


# --------------------------------------------------------------------------------------------- files
def _is_torchscript(path: str) -> bool:
    """A TorchScript archive, by the test torch.load itself applies: `<archive>/constants.pkl`, where
    the archive folder is the first member's. torch.load hands such a file to torch.jit.load, so a
    file passed with `weights_only=False` is never unpickled as a plain pickle."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    if not names or "/" not in names[0]:
        return False
    return f"{names[0].split('/', 1)[0]}/constants.pkl" in names


def _published_openai_archive(model_name: str, sha: str, quick_gelu_only: bool = False) -> bool:
    """True when `sha` is the published hash of one of this model's OpenAI archives (in its URL)."""
    for tag in open_clip.list_pretrained_tags_by_model(model_name) if model_name else []:
        cfg = open_clip.get_pretrained_cfg(model_name, tag)
        url = cfg.get("url", "")
        if quick_gelu_only and not cfg.get("quick_gelu"):
            continue
        if "openaipublic" in url and url.split("/")[-2] == sha:
            return True
    return False


def _looks_like_path(value: str) -> bool:
    return (
        os.path.exists(value)
        or os.sep in value
        or (os.altsep is not None and os.altsep in value)
        or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
    )


def _checked_file(path: str, model_name: str, allow_torchscript: bool) -> tuple[str, bool]:
    """(sha256, whether it is TorchScript) of a weights file that may be read; refusals otherwise."""
    p = Path(path)
    if not p.is_file():
        raise WeightsFileError(f"weights file not found: {path}")
    sha = sha256_file(p)
    torchscript = not p.name.endswith(".safetensors") and _is_torchscript(str(p))
    if torchscript and not (allow_torchscript or _published_openai_archive(model_name, sha)):
        raise WeightsFileError(
            f"weights file {p.name} is a TorchScript archive, which runs code when loaded; "
            f"pass --allow-torchscript if you trust it, or a state dict (torch.save or safetensors)"
        )
    return sha, torchscript


# --------------------------------------------------------------------------------------------- public
def resolve_weights(
    model_name: str,
    pretrained: str | os.PathLike[str] | None,
    cache_dir: str | None = None,
    allow_torchscript: bool = False,
) -> Weights:
    """A tag (local caches first), `none`/None, or a local file; files are hashed and gated here."""
    p = "none" if pretrained is None else str(pretrained)
    if p.strip().lower() == "none" or p.strip() == "":
        return Weights("none")
    if _looks_like_path(p) and not open_clip.get_pretrained_cfg(model_name, p):
        path, label, tag_cfg = p, f"file:{Path(p).name}", {}
    else:
        path, tag_cfg = _resolve_tag(model_name, p, cache_dir)
        label = p
    sha, torchscript = _checked_file(path, model_name, allow_torchscript)
    return Weights(label, path, sha, torchscript, dict(tag_cfg))


def quick_gelu_for(weights: Weights, model_name: str) -> bool | None:
    """QuickGELU as the weights need it: a tag's setting, True for OpenAI's published files.

    None when unknown (then a note says that OpenAI weights need the `-quickgelu` config).
    """
    if weights.tag_cfg:
        return bool(weights.tag_cfg.get("quick_gelu", False))
    if weights.path is None:
        return None
    if _published_openai_archive(model_name, weights.sha256, quick_gelu_only=True):
        return True
    if f"{model_name}-quickgelu" in open_clip.list_models():
        print(
            f"note: {model_name} uses GELU; if {Path(weights.path).name} holds OpenAI weights, "
            f"use --model {model_name}-quickgelu",
            file=sys.stderr,
        )
    return None


def load_weights(model: nn.Module, weights: Weights, model_name: str) -> None:
    """Load a resolved weights file into `model` with open_clip's `load_checkpoint` (its fix-ups).

    Anything unreadable, pickled objects besides tensors, and a state dict that does not fit the
    model raise a one-line WeightsFileError.
    """
    assert weights.path is not None
    name = Path(weights.path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's TorchScript dispatch and deprecation notes
            incompatible = open_clip.load_checkpoint(
                model, weights.path, strict=False, weights_only=not weights.torchscript
            )
    except Exception as exc:  # unreadable, or open_clip's fix-ups or torch refused the state
        state = _read_state(weights, name)
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        not_tensors = [k for k in own if k in state and not isinstance(state[k], torch.Tensor)]
        shapes = [
            f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}"
            for k in own
            if isinstance(state.get(k), torch.Tensor) and state[k].shape != own[k].shape
        ]
        _raise_misfit(model, name, model_name, missing, list(state), not_tensors, shapes)
        raise WeightsFileError(
            f"weights file {name} does not fit {model_name} ({type(exc).__name__}); "
            "pass the matching --model or another file"
        ) from None
    _raise_misfit(model, name, model_name, incompatible.missing_keys, incompatible.unexpected_keys)


def _read_state(weights: Weights, name: str) -> Mapping[str, Any]:
    """The file's state dict as open_clip reads it; a one-line WeightsFileError when it cannot."""
    from open_clip.factory import load_state_dict

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = load_state_dict(weights.path, weights_only=not weights.torchscript)
        if not isinstance(state, Mapping):
            raise TypeError(type(state).__name__)
        return state
    except Exception as exc:
        if type(exc).__name__ == "UnpicklingError" and "Unsupported global" in str(exc):
            why = "it holds Python objects besides tensors (refused: loading them could run code)"
        else:
            why = f"it is not a torch state dict or safetensors file ({type(exc).__name__})"
        raise WeightsFileError(
            f"cannot read weights file {name}: {why}; pass a state dict saved by "
            "torch.save(model.state_dict()) or safetensors"
        ) from None


def _raise_misfit(
    model: nn.Module,
    name: str,
    model_name: str,
    missing: Sequence[str],
    extra: Sequence[str],
    not_tensors: Sequence[str] = (),
    shapes: Sequence[str] = (),
) -> None:
    """One-line WeightsFileError naming what of a weights file does not fit `model`, if anything."""
    own = model.state_dict()
    non_persistent = {k for k, _ in model.named_buffers()} - set(own)  # e.g. attn_mask of JIT
    unexpected = [k for k in extra if k not in own and k not in non_persistent]
    parts = []
    for count, what in (
        (missing, "missing"),
        (unexpected, "unexpected"),
        (not_tensors, "not tensors"),
    ):
        if count:
            parts.append(f"{len(count)} {what} (e.g. {count[0]})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
    if parts:
        raise WeightsFileError(
            f"weights file {name} does not fit {model_name}: {', '.join(parts)}; "
            f"pass the matching --model or another file"
        )


def choose_weights(
    model: str | None, pretrained: str | None, store_spec: Mapping[str, Any] | None, store: str
) -> tuple[str, str]:
    """--model/--pretrained, falling back to the existing store's, then to ViT-B-16/openai.

    A store's `pretrained` is only ever an open_clip tag (or `none`): the store never names a file
    to load (a received store could ship weights that run code, or point at any file here).
    """
    spec = store_spec or {}
    model_name = model or spec.get("model") or DEFAULT_MODEL
    if pretrained is None:
        stored = spec.get("pretrained")
        if stored and str(stored).startswith("file:"):
            raise ExtractError(
                f"{store} was extracted with weights file {stored[5:]}: pass it again "
                "with --pretrained PATH"
            )
        if stored and not _is_tag(str(model_name), str(stored)):
            raise ExtractError(
                f"{store}: the store's spec names pretrained {str(stored)[:80]!r}, which is "
                f"not an open_clip tag of {model_name}; pass --pretrained (a tag or your weights file)"
            )
        pretrained = stored or DEFAULT_PRETRAINED
    return str(model_name), str(pretrained)


def _is_tag(model: str, pretrained: str) -> bool:
    if pretrained.strip().lower() == "none":
        return True
    try:
        return bool(open_clip.get_pretrained_cfg(model, pretrained))
    except Exception:  # an unknown model: its tags cannot be checked
        return False
