"""Stores filled with seeded random tokens of the right shape, for tests and benchmarks.

Extracting a large split on a CPU takes hours (ViT-B/16 runs at a few frames/s); these stores let the
benchmarks and tests exercise the store and the heads at realistic sizes in seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .featurestore import FeatureStore, create_store, done_update
from .layout import build_spec

TokenFn = Callable[[int, np.random.Generator], dict[str, np.ndarray]]


def random_spec(
    *,
    frames: int = 4,
    views: int = 1,
    dim: int = 32,
    width: int = 48,
    patches: int = 4,
    recipe: str = "emp",
    layers: Sequence[int] = (4, 8, 12),
    codec: dict | None = None,
) -> dict:
    side = int(round(patches**0.5))
    return build_spec(
        model="random-tokens",
        pretrained="none",
        weights_sha256="none",
        image_size=side * 16,
        preprocess={"name": "none", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        frames=frames,
        views=views,
        recipe=recipe,
        layers=layers,
        tokens=1 + patches,
        dim=dim,
        width=width,
        patch_grid=[side, patches // side],
        codec=codec,
    )


def write_random_store(
    path: str | Path,
    spec: dict,
    classes_per_split: dict[str, int],
    videos_per_class: int,
    *,
    seed: int = 0,
    tokens_fn: TokenFn | None = None,
    text: bool = True,
) -> FeatureStore:
    """Create a store with every row `ok`. `tokens_fn(row, rng)` may supply each row's tensors."""
    classes: list[str] = []
    videos = []
    for split in ("train", "val", "test"):
        for c in range(classes_per_split.get(split, 0)):
            name = f"{split} class {c}"
            classes.append(name)
            for k in range(videos_per_class):
                vid = f"{split}/{name.replace(' ', '_')}/v{k:03d}"
                videos.append(
                    {"video_id": vid, "relpath": vid + ".mp4", "class_name": name, "split": split}
                )
    s = create_store(
        path, spec, classes, pd.DataFrame(videos), dataset="random", split_source="random"
    )
    from .featurestore import ChunkWriter

    writer = ChunkWriter(path)
    rng = np.random.default_rng(seed)
    v, t, n_tok, d, w = spec["views"], spec["frames"], spec["tokens"], spec["dim"], spec["width"]
    updates = []
    for row in range(len(videos)):
        if tokens_fn is not None:
            tensors = tokens_fn(row, rng)
        else:
            tensors = {
                name: rng.standard_normal((v, t, n_tok, d)).astype(np.float16)
                for name in (e["name"] for e in spec["tensors"])
                if name.startswith("tokens/") and not name.endswith("_in")
            }
            for e in spec["tensors"]:
                if e["name"].endswith("_in"):
                    tensors[e["name"]] = rng.standard_normal((v, t, n_tok, w)).astype(np.float16)
        sums = writer.write_row(row, tensors)
        idx = [list(range(t)) for _ in range(v)]
        updates.append(
            done_update(row, sums, n_frames=t, fps=25.0, frame_indices=idx, decoder="random")
        )
    s.commit(updates)
    if text:
        s.write_text(
            "emp16",
            rng.standard_normal((len(classes), 16, d)).astype(np.float32),
            [f"template {i} {{}}" for i in range(16)],
        )
    return s
