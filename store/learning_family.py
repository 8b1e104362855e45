"""Generated stores for the learning map: one base design, rows that change one factor each.

`write_learning_store(path, FAMILY["nuisance x3"])` writes a seeded `emp+last+ts` store through the store API.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from .featurestore import FeatureStore
from .layout import LASTBLOCK_KEYS, TEXT_DEFAULT, layer_in_name, resid_name, token_name
from .random_store import random_spec, write_random_store

Where = Literal["cls", "all_patches", "few_patches"]
Layers = Literal["graded", "equal", "deep", "shallow"]
ClassesBy = Literal["order", "content"]
Text = Literal["informative", "random", "misleading"]

DEPTH = 12  # taps 0..12 of the residual stream: all cached (resid/), and tokens/layer04, 08, 12
CACHED_LAYERS = (4, 8, 12)
TEMPLATES = 16


@dataclass(frozen=True)
class Factors:
    """What a generated store's classes differ by, where that lives, and what hides it.

    Every token of every frame is a residual-stream vector (width = dim) made of: the class signal
    (a `signal_dim`-dim subspace; norm 1 on each token that carries it, times the layer's share),
    a nuisance shared by all tokens of a video (an `nuisance_dim`-dim subspace, per video plus half
    as much per frame; norm `nuisance`) and isotropic per-token noise (norm `noise`). Cached tokens
    are ln_post(stream) @ proj, as fsar-extract writes them.
    """

    where: Where = (
        "few_patches"  # tokens carrying the signal (CLS gets `cls_share` of it otherwise)
    )
    cls_share: float = 0.25
    carriers: int = 4  # patches carrying it when `where` is few_patches (fixed positions)
    layers: Layers = "graded"  # share per tap: k/11, 1, taps 9+ only, taps 1-4 only (tap 12 = 11)
    classes_by: ClassesBy = "order"  # time-reversal pairs of one smooth path, or a static direction
    nuisance: float = 1.0  # norm of the shared nuisance per token, in units of the signal's
    frame_nuisance: float = 0.5  # the part of it drawn afresh for every frame, relative to the rest
    noise: float = 0.5  # norm of the per-token noise, same units
    text: Text = "informative"  # the class's time-mean signal, a random vector, another class's
    base_classes: int = 32
    val_classes: int = 8
    test_classes: int = 10
    videos_per_class: int = 12
    dim: int = 64
    frames: int = 8
    patches: int = 16
    signal_dim: int = 4
    nuisance_dim: int = 8
    jitter: float = 0.2  # per-frame variation of a video's signal around its class's


BASE = Factors()
# the rows at a tenth of the cost (D 32, 6 frames, 4 patches of which one carries the signal): the
# fast tests and `python -m bench.learning --small`
SMALL = dict(base_classes=12, val_classes=6, test_classes=6, videos_per_class=8, dim=32, frames=6,
             patches=4, carriers=1)  # fmt: skip

# One factor changed from BASE per row (`independent` is the case: several at once).
FAMILY: dict[str, Factors] = {
    "base": BASE,
    "signal in CLS only": replace(BASE, where="cls"),
    "signal in all patches": replace(BASE, where="all_patches"),
    "signal in layers 9-12 only": replace(BASE, layers="deep"),
    "signal in layers 1-4 only": replace(BASE, layers="shallow"),
    "signal equal in every layer": replace(BASE, layers="equal"),
    "classes differ by content": replace(BASE, classes_by="content"),
    "no nuisance": replace(BASE, nuisance=0.0),
    "nuisance x3": replace(BASE, nuisance=3.0),
    "random texts": replace(BASE, text="random"),
    "misleading texts": replace(BASE, text="misleading"),
    "8 base classes": replace(BASE, base_classes=8),
    "96 base classes": replace(BASE, base_classes=96),
    "independent": replace(
        BASE, nuisance=1.25, frame_nuisance=0.0, text="random", carriers=3, cls_share=0.15
    ),
}


def layer_share(layers: Layers, tap: int) -> float:
    """The fraction of the signal tap `tap` (0..DEPTH) of the residual stream carries."""
    tap = min(tap, DEPTH - 1)  # the cached last block starts as the identity: tap 12 = tap 11
    if tap == 0:
        return 0.0
    if layers == "graded":
        return tap / (DEPTH - 1)
    if layers == "deep":
        return float(tap >= 9)
    if layers == "shallow":
        return float(tap <= 4)
    return 1.0


def class_paths(f: Factors, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """(n_classes, frames, signal_dim) unit vectors: each class's signal frame by frame.

    order: classes 2k and 2k+1 follow one smooth arc (a great circle through 135 degrees) forwards
    and backwards; content: each class holds one direction for the whole video.
    """
    if f.classes_by == "content":
        u = rng.standard_normal((n_classes, 1, f.signal_dim))
        return np.repeat(u / np.linalg.norm(u, axis=-1, keepdims=True), f.frames, axis=1)
    angle = np.linspace(0.0, 0.75 * np.pi, f.frames)[:, None]
    paths = []
    for _ in range(n_classes // 2):
        a, b = np.linalg.qr(rng.standard_normal((f.signal_dim, 2)))[0].T
        arc = np.cos(angle) * a + np.sin(angle) * b  # (frames, signal_dim), unit norm
        paths += [arc, arc[::-1]]
    return np.stack(paths)


def class_texts(
    f: Factors,
    paths: np.ndarray,
    splits: list[int],
    signal_out: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """(classes, TEMPLATES, dim) text embeddings; `splits` gives each split's class count in order.

    informative: the class's time-mean signal as the cached tokens show it (an order pair shares it);
    random: a random direction per class; misleading: the informative text of the class two places on
    in its split (another pair's).
    """
    informative = paths.mean(1) @ signal_out  # (classes, dim)
    if f.text == "random":
        text = rng.standard_normal(informative.shape)
    elif f.text == "misleading":
        text, start = np.empty_like(informative), 0
        for n in splits:
            text[start : start + n] = np.roll(informative[start : start + n], -2, axis=0)
            start += n
    else:
        text = informative
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    noise = 0.3 / np.sqrt(f.dim) * rng.standard_normal((len(text), TEMPLATES, f.dim))
    return (text[:, None] + noise).astype(np.float32)


def layer_norm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def identity_last_block(width: int, dim: int, proj: np.ndarray, rng: np.random.Generator) -> tuple:
    """(tensors, config) of a CLIP block whose residual branches start at zero, then ln_post, proj.

    Zero output projections make the block the identity on the stream, so tokens/layer12 equals
    the block applied to tokens/layer12_in (as extraction guarantees), and `lastlayer` starts
    from the training-free features; its other weights are random and train from there.
    """
    shapes = {
        "attn.in_proj_weight": (3 * width, width),
        "attn.out_proj.weight": (width, width),
        "mlp.c_fc.weight": (4 * width, width),
        "mlp.c_proj.weight": (width, 4 * width),
    }
    tensors = {}
    for key in LASTBLOCK_KEYS:
        if key == "proj":
            tensors[key] = proj.astype(np.float32)
        elif key in ("ln_1.weight", "ln_2.weight", "ln_post.weight"):
            tensors[key] = np.ones(width, np.float32)
        elif key in ("attn.in_proj_weight", "mlp.c_fc.weight"):
            fan = shapes[key]
            tensors[key] = (rng.standard_normal(fan) * np.sqrt(2.0 / sum(fan))).astype(np.float32)
        elif key in shapes:
            tensors[key] = np.zeros(shapes[key], np.float32)
        else:
            size = (
                3 * width if key == "attn.in_proj_bias" else 4 * width if "c_fc" in key else width
            )
            tensors[key] = np.zeros(size, np.float32)
    config = {"width": width, "heads": max(1, width // 64), "mlp_ratio": 4.0, "act": "gelu",
              "ln_eps": 1e-5, "layer_scale": False, "dim": dim}  # fmt: skip
    return tensors, config


def write_learning_store(
    path: str | Path, f: Factors = BASE, *, seed: int = 0, ts: bool = True
) -> FeatureStore:
    """Write the store `f` describes at `path` (recipe emp+last+ts, or emp+last without `ts`; one
    view; every tap, no side-network initialisation); returns it open."""
    if any(n % 2 for n in (f.base_classes, f.val_classes, f.test_classes)):
        raise ValueError("every split needs an even number of classes (order pairs)")
    splits = [f.base_classes, f.val_classes, f.test_classes]
    n_classes, width, tokens = sum(splits), f.dim, 1 + f.patches
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((width, width)))[0].T
    signal_in = basis[: f.signal_dim]  # (signal_dim, width): the signal's subspace of the stream
    nuisance_in = basis[f.signal_dim : f.signal_dim + f.nuisance_dim]
    proj = np.linalg.qr(rng.standard_normal((width, f.dim)))[0]  # (width, dim), orthonormal
    paths = class_paths(f, n_classes, rng)
    carrier = np.zeros(tokens)  # the share of the signal each token position carries
    if f.where == "cls":
        carrier[0] = 1.0
    else:
        carrier[0] = f.cls_share
        chosen = (
            rng.choice(f.patches, f.carriers, replace=False) if f.where == "few_patches" else None
        )
        carrier[1:][chosen if chosen is not None else slice(None)] = 1.0
    taps = list(range(DEPTH + 1)) if ts else []
    shares = {tap: layer_share(f.layers, tap) for tap in (*CACHED_LAYERS, DEPTH - 1, *taps)}
    spec = random_spec(frames=f.frames, dim=f.dim, width=width, patches=f.patches,
                       recipe="emp+last+ts" if ts else "emp+last", layers=CACHED_LAYERS,
                       taps=taps or None, depth=DEPTH)  # fmt: skip

    def streams(row: int, row_rng: np.random.Generator) -> dict[str, np.ndarray]:
        label = row // f.videos_per_class
        signal = paths[label] + f.jitter * row_rng.standard_normal(paths[label].shape)
        nuisance = row_rng.standard_normal(
            (1, 1, f.nuisance_dim)
        ) + f.frame_nuisance * row_rng.standard_normal((f.frames, 1, f.nuisance_dim))
        shared = f.nuisance / np.sqrt(f.nuisance_dim) * nuisance @ nuisance_in  # (frames, 1, width)
        noise = f.noise / np.sqrt(width) * row_rng.standard_normal((f.frames, tokens, width))
        carried = carrier[None, :, None] * (signal @ signal_in)[:, None]  # (frames, tokens, width)

        def tap(k: int) -> np.ndarray:  # the residual stream after block k, one view
            return (shares[k] * carried + shared + noise)[None]

        out = {token_name(k): layer_norm(tap(k)) @ proj for k in CACHED_LAYERS}
        out[layer_in_name(DEPTH)] = tap(DEPTH - 1)
        out.update({resid_name(k): tap(k) for k in taps})
        return {k: v.astype(np.float16) for k, v in out.items()}

    counts = dict(zip(("train", "val", "test"), splits, strict=True))
    block = identity_last_block(width, f.dim, proj, np.random.default_rng(seed + 1))
    store = write_random_store(path, spec, counts, f.videos_per_class, seed=seed + 2,
                               tokens_fn=streams, text=False, lastblock=block)  # fmt: skip
    text = class_texts(f, paths, splits, signal_in @ proj, rng)
    store.write_text(TEXT_DEFAULT, text, [f"template {i} {{}}" for i in range(TEMPLATES)])
    return store
