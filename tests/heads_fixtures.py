"""Small synthetic inputs shared by the head tests (D <= 64, <= 16 patches, T <= 8)."""

from __future__ import annotations

import torch

SPEC = {"layers": [4, 8, 12]}


def random_inputs(
    head, n_videos: int, frames: int = 4, patches: int = 9, dim: int = 32, seed: int = 0
):
    """Store-like inputs for `head`: every role gets (B, T, L, D) float16 tokens or (B, T, D) CLS."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for role, name in head.inputs(SPEC).items():
        if name.startswith("cls/"):
            out[role] = torch.randn(n_videos, frames, dim, generator=g).half()
        else:
            out[role] = torch.randn(n_videos, frames, 1 + patches, dim, generator=g).half()
    return out


def take(features: dict, index) -> dict:
    return {k: v[index] for k, v in features.items()}


def reverse_time(inputs: dict) -> dict:
    return {k: v.flip(1) for k, v in inputs.items()}


def reversal_pair_store(
    path,
    frames: int = 6,
    patches: int = 4,
    dim: int = 32,
    views: int = 2,
    classes: dict | None = None,
    videos_per_class: int = 10,
    seed: int = 0,
    recipe: str = "emp",
    noise: float = 0.6,
):
    """A store whose classes come in time-reversal pairs: class 2k plays a trajectory, 2k+1 plays it backwards.

    Every video of a class follows its class trajectory (T random unit directions) plus noise, in every
    layer, CLS and patch token; time means are identical within a pair, so `proto` sits near chance
    inside a pair while order-aware heads can tell the two apart.
    """
    import numpy as np

    from store.random_store import random_spec, write_random_store

    classes = classes or {"train": 8, "val": 6, "test": 6}
    spec = random_spec(
        frames=frames, views=views, dim=dim, width=dim + 16, patches=patches, recipe=recipe
    )
    n_classes = sum(classes.values())
    rng = np.random.default_rng(seed + 1000)
    trajectories = rng.standard_normal((n_classes // 2 + 1, frames, dim))
    trajectories /= np.linalg.norm(trajectories, axis=-1, keepdims=True)
    offsets = rng.standard_normal((n_classes // 2 + 1, dim)) * 0.5
    layer_names = [e["name"] for e in spec["tensors"] if e["name"].startswith("tokens/")]

    def tokens(row: int, row_rng) -> dict:
        label = row // videos_per_class
        base = trajectories[label // 2] + offsets[label // 2]
        if label % 2:
            base = base[::-1]
        out = {}
        for name in layer_names:
            width = spec["width"] if name.endswith("_in") else dim
            signal = np.zeros((views, frames, 1 + patches, width))
            signal[..., :dim] = base[None, :, None, :] * 3.0
            signal = signal + noise * 3.0 * row_rng.standard_normal(signal.shape)
            out[name] = signal.astype(np.float16)
        return out

    return write_random_store(path, spec, classes, videos_per_class, seed=seed, tokens_fn=tokens)
