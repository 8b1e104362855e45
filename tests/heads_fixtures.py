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
