"""Checkpoints as safetensors + JSON metadata only (no pickle anywhere).

A checkpoint holds the head's weights under `model/<name>`; a training checkpoint adds Adam's
moments under `optimizer/<param index>/<key>` and RNG states under `rng/<name>` (uint8), with the
optimizer's hyper-parameters and the training state as JSON in the safetensors metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from .base import FewShotHead


def save_checkpoint(
    path: str | Path,
    head: FewShotHead,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Write atomically (temp file, then rename)."""
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
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """{'meta': dict, 'head': str, 'head_config': dict} without loading tensors."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    return {
        "meta": json.loads(raw.get("meta", "{}")),
        "head": raw.get("head", ""),
        "head_config": json.loads(raw.get("head_config", "{}")),
    }


def load_model(path: str | Path, head: FewShotHead) -> None:
    """Load the head's weights (strict)."""
    tensors = load_file(str(path))
    state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    head.load_state_dict(state, strict=True)


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore Adam's state and the RNG states saved by `save_checkpoint(..., optimizer)`."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        groups = json.loads((f.metadata() or {})["optimizer_param_groups"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
