"""Checkpoints as safetensors + JSON metadata only (no pickle anywhere), checked before use.

A checkpoint holds the head's weights under `model/<name>`; a training checkpoint adds Adam's
moments under `optimizer/<param index>/<key>` and RNG states under `rng/<name>` (uint8), with the
optimizer's hyper-parameters and the training state as JSON in the safetensors metadata. A sha256
of every tensor and metadata entry (metadata `sha256`) makes a damaged file an error, never other
weights; a head is built only after its config was shown to match the file's tensor shapes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from runtime import files

from .base import FewShotHead

DIGEST_KEY = "sha256"
# Bytes of a checkpoint file at most (a ViT-bigG last block with its Adam state: 0.4 GB).
CHECKPOINT_CAP = 4 << 30


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (one-line message naming the file)."""


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != DIGEST_KEY:
            h.update(f"{key}={metadata[key]}\n".encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(
    path: str | Path,
    head: FewShotHead,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Write atomically (runtime.files: temp file, fsync, rename; never through a link)."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    metadata = {
        "meta": json.dumps(meta, sort_keys=True),
        "head": head.name,
        "head_config": json.dumps(head.config()),
    }
    if optimizer is not None:
        state = optimizer.state_dict()
        for index, param_state in state["state"].items():
            for key, value in param_state.items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
        metadata["optimizer_param_groups"] = json.dumps(state["param_groups"])
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda{i}"] = s
    metadata[DIGEST_KEY] = _digest(tensors, metadata)
    files.write_file(path, save(tensors, metadata=metadata))


def _raw_metadata(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The file's metadata strings and tensor shapes, from its header only (no tensor is read);
    a regular file only (not a link) of at most CHECKPOINT_CAP bytes."""
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        files.regular_file(path, CHECKPOINT_CAP, "checkpoint")
    except files.FileRefused as error:
        raise CheckpointError(str(error)) from None
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file ({type(exc).__name__})"
        ) from None
    return raw, shapes


def read_metadata(path: str | Path) -> dict[str, Any]:
    """{'meta': dict, 'head': str, 'head_config': dict} without loading tensors."""
    path = Path(path)
    raw, _ = _raw_metadata(path)
    try:
        out = {
            "meta": files.parse_json(raw.get("meta", "{}"), "meta"),
            "head": raw["head"],
            "head_config": files.parse_json(raw.get("head_config", "{}"), "head_config"),
        }
    except files.FileRefused as error:
        raise CheckpointError(f"checkpoint {path}: {error}") from None
    except KeyError:
        raise CheckpointError(f"checkpoint {path} has damaged or missing metadata") from None
    if not (
        isinstance(out["meta"], dict)
        and isinstance(out["head"], str)
        and isinstance(out["head_config"], dict)
    ):
        raise CheckpointError(f"checkpoint {path} has malformed metadata")
    return out


def model_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the head's weights in a checkpoint (header only)."""
    _, shapes = _raw_metadata(Path(path))
    return {k[len("model/") :]: v for k, v in shapes.items() if k.startswith("model/")}


def check_fits(path: str | Path, head: torch.nn.Module) -> None:
    """Refuse a checkpoint whose weights do not have `head`'s names and shapes.

    `head` may live on the meta device: this runs before any real weights are allocated.
    """
    have = model_shapes(path)
    want = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    for key, shape in want.items():
        if key not in have:
            raise CheckpointError(f"checkpoint {path} lacks weights {key}")
        if have[key] != shape:
            raise CheckpointError(
                f"checkpoint {path}: {key} is {list(have[key])}, its head config needs {list(shape)}"
            )


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and metadata entry of a checkpoint, checked against its sha256."""
    path = Path(path)
    raw, _ = _raw_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file ({type(exc).__name__})"
        ) from None
    if raw.get(DIGEST_KEY) != _digest(tensors, raw):
        raise CheckpointError(f"checkpoint {path} fails its checksum (damaged or edited)")
    return tensors, raw


def load_model(path: str | Path, head: FewShotHead) -> None:
    """Load the head's weights (strict)."""
    tensors, _ = load_tensors(path)
    state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    own = head.state_dict()
    problems = [f"unexpected weights {k}" for k in state if k not in own]
    problems += [f"no weights for {k}" for k in own if k not in state]
    problems += [
        f"{k} is {list(state[k].shape)}, the head needs {list(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit its head: {problems[0]} ({len(problems)} problem(s))"
        )
    head.load_state_dict(state, strict=True)


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore Adam's state and the RNG states saved by `save_checkpoint(..., optimizer)`."""
    tensors, raw = load_tensors(path)
    try:
        groups = files.parse_json(raw["optimizer_param_groups"], "optimizer_param_groups")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng/torch"])
    except (KeyError, ValueError, TypeError, RuntimeError, files.FileRefused) as exc:
        raise CheckpointError(
            f"checkpoint {path} holds no usable training state ({type(exc).__name__})"
        ) from None
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
