"""Workloads shared by the benchmarks: random stores, heads ready to train, one training episode.

Stores hold seeded random tokens of the stated shapes (store/random_store.py): the cost of reading
and of the heads does not depend on the values. `lastlayer` gets a randomly initialised ViT-B/16-like
last block written to `weights/lastblock.safetensors` like Stage 1 would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

WAY, SHOT, QUERY = 5, 1, 5  # the training episode of issue 6


def token_shapes(spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of the tensors ChunkWriter takes (cls/ arrays are derived from tokens/)."""
    from store.layout import written_tensors

    written = set(written_tensors(spec))
    return {e["name"]: tuple(e["shape_per_row"]) for e in spec["tensors"] if e["name"] in written}


def random_pool(spec: dict[str, Any], n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`n` distinct rows of N(0, 1) float16 tokens."""
    rng = np.random.default_rng(seed)
    return [
        {
            k: rng.standard_normal(shape).astype(np.float16)
            for k, shape in token_shapes(spec).items()
        }
        for _ in range(n)
    ]


def build_store(
    path: str | Path,
    spec: dict[str, Any],
    splits: dict[str, tuple[int, int]],
    pool: list[dict[str, np.ndarray]] | None = None,
) -> tuple[float, Any]:
    """A store with `splits[name] = (classes, videos per class)`, every row ok; rows cycle `pool`.

    `store.random_store.write_random_store` with rows from a small pool of random rows: creation
    stays fast, and every chunk is still compressed and written on its own, so sizes and read costs
    are those of distinct rows. Adds `text/emp16`, for `last` a random last block, for `ts` a random
    side-network init and `text/descriptions`. Returns
    (seconds spent in ChunkWriter.write_row, the store open read-only).
    """
    from store import open_store
    from store.layout import recipe_parts
    from store.random_store import random_tsfsar_init, write_random_store

    pool = pool or random_pool(spec, 4)
    names = set(token_shapes(spec))
    parts = recipe_parts(spec["recipe"])
    lastblock = None
    if "last" in parts:
        block = random_last_block(int(spec["width"]), int(spec["dim"]))
        lastblock = (block.state_tensors(), block.config)
    times: list[float] = []
    write_random_store(
        path,
        spec,
        splits,
        tokens_fn=lambda row, _rng: {k: v for k, v in pool[row % len(pool)].items() if k in names},
        lastblock=lastblock,
        tsfsar_init=random_tsfsar_init(spec) if "ts" in parts else None,
        descriptions="ts" in parts,
        write_times=times,
    ).close()
    return sum(times), open_store(path)


def random_last_block(width: int, dim: int) -> Any:
    from heads.clip_block import LastBlock

    torch.manual_seed(0)
    return LastBlock(width=width, heads=max(1, width // 64), act="quick_gelu", dim=dim)


def make_head(name: str, spec: dict[str, Any], store: Any | None = None, **cfg: Any) -> Any:
    """A head for the store's shapes, with class texts (and block) from the store or random."""
    import heads

    if name == "emp":
        cfg.setdefault("dim", int(spec["dim"]))
    head = heads.create(name, **cfg)
    if store is not None:
        head.prepare(store)
    else:
        if head.uses_text:
            head.set_class_text(torch.randn(20, 16, int(spec["dim"])))
        if name == "lastlayer":
            head.set_block(random_last_block(int(spec["width"]), int(spec["dim"])))
    return head


def episode_labels(
    way: int = WAY, shot: int = SHOT, query: int = QUERY
) -> tuple[torch.Tensor, ...]:
    """Support labels (way*shot), query labels (way*query) and class ids (way)."""
    support = torch.arange(way).repeat_interleave(shot)
    queries = torch.arange(way).repeat_interleave(query)
    return support, queries, torch.arange(way)


def head_step(
    head: Any,
    inputs: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    way: int = WAY,
    shot: int = SHOT,
    query: int = QUERY,
) -> float:
    """One training episode of a head on inputs of way*(shot+query) videos (support first).

    Forward (per-video features, support set, query scores), loss, backward and optimiser step;
    a head without parameters (`proto`) does forward + loss only.
    """
    support_labels, query_labels, class_ids = episode_labels(way, shot, query)
    n_support = way * shot
    feats = head.video_features(inputs)
    head.process_support_set(
        {k: v[:n_support] for k, v in feats.items()}, support_labels, class_ids
    )
    head({k: v[n_support:] for k, v in feats.items()})
    loss = head.loss(query_labels)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def optimizer_for(head: Any) -> torch.optim.Optimizer | None:
    """The optimiser `fsar-train` builds (lr 1e-5), or None for a head without parameters."""
    from heads.train import TrainConfig, make_optimizer

    if not any(p.requires_grad for p in head.parameters()):
        return None
    return make_optimizer(head, TrainConfig(lr=1e-5))


def episode_rows(
    store: Any, split: str, seed: int, way: int = WAY, shot: int = SHOT, query: int = QUERY
) -> np.ndarray:
    """Rows of one random episode: way classes, shot support then query videos each (support first)."""
    m = store.manifest
    rows = store.select(split=split)
    labels = m["label"].to_numpy()[rows]
    rng = np.random.default_rng(seed)
    classes = rng.choice(np.unique(labels), way, replace=False)
    picked = [rng.choice(rows[labels == c], shot + query, replace=False) for c in classes]
    support = [p[:shot] for p in picked]
    queries = [p[shot:] for p in picked]
    return np.concatenate(support + queries)


def read_inputs(store: Any, rows: np.ndarray, roles: dict[str, str]) -> dict[str, torch.Tensor]:
    """The head's roles for `rows`, view 0, as torch tensors (B, T, ...)."""
    data = store.read(rows, list(roles.values()), view=0, as_torch=True)
    return {role: data[name] for role, name in roles.items()}
