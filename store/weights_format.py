"""The format of a store's weights files: float32 safetensors with a config as JSON in its metadata.

`weights/lastblock.safetensors` (CLIP's last block) and `weights/tsfsar_init.safetensors` (the side
network's initial weights) use it. Nothing is ever unpickled; `weights_from_bytes` refuses anything
else with a ValueError (docs/design.md).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np


def weights_to_bytes(tensors: Mapping[str, Any], config: Mapping[str, Any]) -> bytes:
    """Serialise tensors (numpy or torch) as float32 safetensors, `config` under the `config` key."""
    from safetensors.numpy import save

    arrays = {}
    for key, value in tensors.items():
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().float().cpu().numpy()
        arrays[key] = np.ascontiguousarray(value, dtype=np.float32)
    return save(arrays, metadata={"config": json.dumps(dict(config), sort_keys=True)})


def weights_from_bytes(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of `weights_to_bytes`: (numpy tensors, config); ValueError for anything else."""
    from safetensors.numpy import load

    try:
        (header_len,) = struct.unpack("<Q", data[:8])  # 8-byte length, then the JSON header
        header = json.loads(data[8 : 8 + header_len])
        meta = header.get("__metadata__") or {}
        arrays = load(data)
    except Exception as exc:
        raise ValueError(f"not a valid safetensors file ({type(exc).__name__})") from None
    if "config" not in meta:
        raise ValueError("weights file lacks the 'config' metadata")
    try:
        config = json.loads(meta["config"])
    except ValueError:
        raise ValueError("weights file has a config that is not JSON") from None
    if not isinstance(config, dict):
        raise ValueError("weights file has a config that is not a JSON object")
    return arrays, config
