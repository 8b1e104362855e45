"""Deterministic CLIP-block weights (Hugging Face names) for the side-network init reference.

Numpy only, so both tests and `make_tsfsar_init.py` (run with the released code) import it.
"""

from __future__ import annotations

import numpy as np

# (name, width, side width, adapter width): `randomized` exercises scikit-learn's randomized solver
# (matrices above 500 rows: 4 power iterations for the side blocks, 7 for the Adapter), `full` its
# full SVD (everything at most 500).
CASES = {"randomized": (512, 64, 32), "full": (96, 64, 32)}
DEPTH = 2


def layer_weights(width: int, layer: int) -> dict[str, np.ndarray]:
    """Float32 weights of one HF CLIPEncoderLayer: decaying column scales give a PCA spectrum."""
    rng = np.random.RandomState(1000 * width + layer)
    shapes = {
        "self_attn.q_proj": (width, width),
        "self_attn.k_proj": (width, width),
        "self_attn.v_proj": (width, width),
        "self_attn.out_proj": (width, width),
        "mlp.fc1": (4 * width, width),
        "mlp.fc2": (width, 4 * width),
    }
    out = {}
    for name, (rows, cols) in shapes.items():
        scale = 0.02 * np.linspace(1.0, 0.1, cols)
        out[f"{name}.weight"] = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        out[f"{name}.bias"] = (0.02 * rng.standard_normal(rows)).astype(np.float32)
    for norm in ("layer_norm1", "layer_norm2"):
        out[f"{norm}.weight"] = (1 + 0.1 * rng.standard_normal(width)).astype(np.float32)
        out[f"{norm}.bias"] = (0.1 * rng.standard_normal(width)).astype(np.float32)
    return out


def sample(values: np.ndarray, count: int = 256) -> np.ndarray:
    """A fixed strided subsample of a tensor's values (the whole tensor when small)."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    if flat.size <= count:
        return flat
    return flat[np.linspace(0, flat.size - 1, count).astype(np.int64)]
