"""Stores filled with seeded random tokens of the right shapes, for tests and benchmarks.

`write_random_store` is the one builder (any recipe: `random_spec(recipe="ts")` gives resid/ taps,
`random_tsfsar_init` a side-network init of the right keys); `hidden_order_store` hides a signal
only training finds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .featurestore import FeatureStore, create_store
from .layout import (
    TEXT_DEFAULT,
    TEXT_DESCRIPTIONS,
    TSFSAR_MLP_RATIO,
    build_spec,
    tsfsar_init_shapes,
    tsfsar_side_width,
    written_tensors,
)
from .weights_format import lastblock_shapes
from .writing import ChunkWriter, done_update

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
    taps: Sequence[int] | None = None,
    depth: int = 12,
) -> dict:
    """A spec of `recipe` for a made-up ViT of `depth` blocks (`taps`: recipes with ts, default
    all of 0..depth; `layers`: recipes with emp)."""
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
        taps=taps,
        depth=depth if "ts" in recipe.split("+") else None,
        codec=codec,
    )


def random_tsfsar_init(
    spec: Mapping[str, Any], seed: int = 0, side_width: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A side-network init of a `ts` spec's keys and shapes, N(0, 0.02) weights and N(1, 0.02)
    LayerNorm gains, with the config `fsar-extract` writes (method `random`)."""
    width, dim, depth = int(spec["width"]), int(spec["dim"]), int(spec["depth"])
    side = side_width or tsfsar_side_width(width)
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, shape in tsfsar_init_shapes(depth, side, dim).items():
        value = 0.02 * rng.standard_normal(shape)
        tensors[key] = (value + 1.0 if ".norm" in key and key.endswith("weight") else value).astype(
            np.float32
        )
    config = {
        "side_width": side,
        "mlp_ratio": TSFSAR_MLP_RATIO,
        "adapter_dim": dim,
        "depth": depth,
        "width": width,
        "model": spec["model"],
        "pretrained": spec["pretrained"],
        "pca": {"method": "random"},
    }
    return tensors, config


def random_lastblock(
    spec: Mapping[str, Any], seed: int = 0, heads: int = 2
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A last block of the spec's width and dim (every tensor its config implies, N(0, 0.02)),
    with the config `fsar-extract` writes."""
    config = {
        "width": int(spec["width"]),
        "heads": heads,
        "mlp_ratio": 4.0,
        "act": "gelu",
        "ln_eps": 1e-5,
        "layer_scale": False,
        "dim": int(spec["dim"]),
    }
    rng = np.random.default_rng(seed)
    tensors = {
        key: (0.02 * rng.standard_normal(shape)).astype(np.float32)
        for key, shape in lastblock_shapes(config).items()
    }
    return tensors, config


def write_random_store(
    path: str | Path,
    spec: dict,
    classes_per_split: Mapping[str, int | tuple[int, int]],
    videos_per_class: int = 0,
    *,
    seed: int = 0,
    tokens_fn: TokenFn | None = None,
    text: bool = True,
    lastblock: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
    tsfsar_init: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
    descriptions: bool = False,
    write_times: list[float] | None = None,
) -> FeatureStore:
    """Create a store with every row `ok`, open for writing; the one random-store builder.

    `classes_per_split[split]` is a number of classes (of `videos_per_class` videos each) or a pair
    (classes, videos per class). Each row holds N(0, 1) float16 tokens, unless `tokens_fn(row, rng)`
    supplies its tensors. Adds `text/emp16` (`text`), unit-norm `text/descriptions`
    (`descriptions`), the last block's (tensors, config) (`lastblock`) and a side-network init
    (`tsfsar_init`, e.g. `random_tsfsar_init(spec)`). `write_times` receives each row's seconds in
    `ChunkWriter.write_row`.
    """
    classes: list[str] = []
    videos = []
    for split in ("train", "val", "test"):
        count = classes_per_split.get(split, 0)
        n_classes, per_class = count if isinstance(count, tuple) else (count, videos_per_class)
        for c in range(n_classes):
            name = f"{split} class {c}"
            classes.append(name)
            for k in range(per_class):
                vid = f"{split}/{name.replace(' ', '_')}/v{k:03d}"
                videos.append(
                    {"video_id": vid, "relpath": vid + ".mp4", "class_name": name, "split": split}
                )
    s = create_store(
        path, spec, classes, pd.DataFrame(videos), dataset="random", split_source="random"
    )
    writer = ChunkWriter(path)
    rng = np.random.default_rng(seed)
    v, t, d = spec["views"], spec["frames"], spec["dim"]
    shapes = {e["name"]: e["shape_per_row"] for e in spec["tensors"]}
    written = written_tensors(spec)  # cls/ of a tokens/ array is derived by the writer
    updates = []
    for row in range(len(videos)):
        if tokens_fn is not None:
            tensors = tokens_fn(row, rng)
        else:
            tensors = {n: rng.standard_normal(shapes[n]).astype(np.float16) for n in written}
        start = time.perf_counter()
        sums = writer.write_row(row, tensors)
        if write_times is not None:
            write_times.append(time.perf_counter() - start)
        idx = [list(range(t)) for _ in range(v)]
        updates.append(
            done_update(row, sums, n_frames=t, fps=25.0, frame_indices=idx, decoder="random")
        )
    s.commit(updates)
    if text:
        s.write_text(
            TEXT_DEFAULT,
            rng.standard_normal((len(classes), 16, d)).astype(np.float32),
            [f"template {i} {{}}" for i in range(16)],
        )
    if descriptions:
        emb = rng.standard_normal((len(classes), 1, d))
        emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
        s.write_text(TEXT_DESCRIPTIONS, emb.astype(np.float32), ["random class descriptions"])
    if lastblock is not None:
        s.write_lastblock(*lastblock)
    if tsfsar_init is not None:
        s.write_tsfsar_init(*tsfsar_init)
    return s


def hidden_order_store(
    path: str | Path,
    *,
    classes: dict[str, int] | None = None,
    videos_per_class: int = 12,
    frames: int = 8,
    patches: int = 16,
    dim: int = 64,
    seed: int = 0,
    signal: float = 4.0,
    nuisance: float = 2.0,
    recipe: str = "emp",
    layers: Sequence[int] = (4, 8, 12),
    depth: int = 12,
    taps: Sequence[int] | None = None,
) -> FeatureStore:
    """A store whose classes differ only in the temporal order of a signal no fixed metric sees.

    Classes come in time-reversal pairs: class 2k follows a path of T unit vectors in a 4-dim
    signal subspace, class 2k+1 the same path backwards. Four fixed patches of every frame carry
    the path (amplitude `signal`); every token (CLS and patches) also carries a per-video plus
    per-frame nuisance in an 8-dim subspace shared by all classes (amplitude `nuisance`) and
    isotropic noise. Cosine on raw tokens is dominated by the nuisance, so training-free heads sit
    at chance, while a learned projection onto the signal subspace separates every class. Class
    texts name the pair (its time-mean path) in a 4-dim text subspace of their own: they tell
    pairs apart once a head learns to align them, never the order inside a pair. With `recipe`
    `emp+ts` every tap (`resid/`, width = dim) carries the same kind of tokens as every layer.
    """
    classes = classes or {"train": 16, "val": 8, "test": 8}
    if any(n % 2 for n in classes.values()):
        raise ValueError("every split needs an even number of classes (reversal pairs)")
    spec = random_spec(frames=frames, dim=dim, width=dim, patches=patches, recipe=recipe,
                       layers=layers, depth=depth, taps=taps)  # fmt: skip
    basis = np.linalg.qr(np.random.default_rng(seed + 1).standard_normal((dim, dim)))[0]
    signal_basis, nuisance_basis, text_basis = basis[:, :4], basis[:, 4:12], basis[:, 12:16]
    rng = np.random.default_rng(seed + 2)
    n_classes = sum(classes.values())
    paths = rng.standard_normal((n_classes // 2, frames, 4))
    paths /= np.linalg.norm(paths, axis=-1, keepdims=True)
    carriers = 1 + rng.choice(patches, 4, replace=False)  # token positions of the signal patches
    names = written_tensors(spec)

    def tokens(row: int, row_rng: np.random.Generator) -> dict[str, np.ndarray]:
        label = row // videos_per_class
        path = paths[label // 2][:: -1 if label % 2 else 1]
        path = path + 0.2 * row_rng.standard_normal(path.shape)
        shared = nuisance * (
            row_rng.standard_normal((1, 1, 8)) + 0.5 * row_rng.standard_normal((frames, 1, 8))
        )
        carried = np.zeros((frames, 1 + patches, 4))
        carried[:, carriers] = signal * path[:, None]
        carried[:, 0] = signal * path * len(carriers) / patches  # CLS: the patches' mean signal
        clean = shared @ nuisance_basis.T + carried @ signal_basis.T
        return {
            n: (clean + 0.3 * row_rng.standard_normal(clean.shape))[None].astype(np.float16)
            for n in names
        }

    store = write_random_store(
        path, spec, classes, videos_per_class, seed=seed, tokens_fn=tokens, text=False
    )
    pair_text = paths.mean(1) @ text_basis.T
    pair_text /= np.linalg.norm(pair_text, axis=-1, keepdims=True)
    text = np.repeat(pair_text, 2, axis=0)[:, None] + 0.3 / np.sqrt(dim) * rng.standard_normal(
        (n_classes, 16, dim)
    )
    store.write_text(
        TEXT_DEFAULT, text.astype(np.float32), [f"template {i} {{}}" for i in range(16)]
    )
    return store
