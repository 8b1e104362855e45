"""Which CLIP weights a run uses, checked before they are loaded: an open_clip tag, `none` or a file.

Resolution, hashing and refusals are fsar's; the state-dict fix-ups are open_clip's `load_checkpoint`.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import warnings
import zipfile
from collections.abc import Mapping, Sequence
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
