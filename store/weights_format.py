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

from .form import json_depth
from .layout import LASTBLOCK_KEYS, LASTBLOCK_LAYER_SCALE_KEYS

MAX_MLP_RATIO = 16.0
MAX_CONFIG_DEPTH = 4  # fsar writes numbers, flags, names and one level of groups


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
    except (ValueError, RecursionError):
        raise ValueError("weights file has a config that is not JSON") from None
    if not isinstance(config, dict) or json_depth(config) > MAX_CONFIG_DEPTH:
        raise ValueError(
            f"weights file has a config that is not a JSON object nested at most {MAX_CONFIG_DEPTH} deep"
        )
    return arrays, config


def lastblock_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a last block and the shape its config implies (ValueError when the config
    is not one fsar writes: width, heads, mlp_ratio, dim, layer_scale)."""
    try:
        width, heads, dim = (int(config[k]) for k in ("width", "heads", "dim"))
        hidden = int(width * float(config["mlp_ratio"]))
        layer_scale = config.get("layer_scale", False)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"its config lacks width/heads/mlp_ratio/dim ({exc!r})") from None
    if (
        not 1 <= heads <= width
        or width % heads
        or not 0 < float(config["mlp_ratio"]) <= MAX_MLP_RATIO
        or not isinstance(layer_scale, bool)
    ):
        raise ValueError(f"its config {dict(config)!r} is not one of a ViT block")
    w3 = 3 * width
    shapes: dict[str, tuple[int, ...]] = {
        "attn.in_proj_weight": (w3, width),
        "attn.in_proj_bias": (w3,),
        "attn.out_proj.weight": (width, width),
        "mlp.c_fc.weight": (hidden, width),
        "mlp.c_fc.bias": (hidden,),
        "mlp.c_proj.weight": (width, hidden),
        "proj": (width, dim),
    }
    keys = LASTBLOCK_KEYS + (LASTBLOCK_LAYER_SCALE_KEYS if layer_scale else ())
    return {key: shapes.get(key, (width,)) for key in keys}


def check_lastblock(
    tensors: Mapping[str, np.ndarray], config: Mapping[str, Any], spec: Mapping[str, Any]
) -> None:
    """ValueError unless the block is the spec's (width and dim) and holds exactly the tensors its
    config implies, so nothing is built from a config the file does not back."""
    for key in ("width", "dim"):
        if config.get(key) != spec.get(key):
            raise ValueError(
                f"its config says {key} {config.get(key)!r}, the spec {spec.get(key)!r}"
            )
    want = lastblock_shapes(config)
    odd = sorted(set(tensors) ^ set(want))
    if odd:
        raise ValueError(f"its tensors differ from those its config implies (e.g. {odd[0]})")
    for key, shape in want.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{key} has shape {tuple(tensors[key].shape)}, its config implies {shape}"
            )
