"""Tiny complete stores for the sharing tests (emp+last, text, last-block weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from bench.common import tiny_spec
from store import FeatureStore, checksum_column, open_store
from store.random_store import random_lastblock, write_random_store

SPLITS = {"train": 2, "val": 1, "test": 2}
PER_CLASS = 2  # 10 rows


def row_tensors_fn(spec: dict, changed: dict[int, float] | None = None):
    """Tokens depending only on the row (so two stores agree); `changed[row]` = noise scale."""
    changed = changed or {}

    def fn(row: int, _rng: np.random.Generator) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(5000 + row)
        v, t, n, d, w = spec["views"], spec["frames"], spec["tokens"], spec["dim"], spec["width"]
        out = {f"tokens/layer{k:02d}": rng.standard_normal((v, t, n, d)) for k in spec["layers"]}
        out["tokens/layer12_in"] = rng.standard_normal((v, t, n, w))
        if row in changed:
            noise = np.random.default_rng(row + 99)
            out = {k: a + changed[row] * noise.standard_normal(a.shape) for k, a in out.items()}
        return {k: a.astype(np.float16) for k, a in out.items()}

    return fn


def make_store(path: Path, changed: dict[int, float] | None = None, **spec_kw: object) -> Path:
    spec = tiny_spec(
        **({"recipe": "emp+last", "frames": 2, "dim": 8, "width": 12, "patches": 4} | spec_kw)
    )
    block = random_lastblock(spec, seed=7)
    tokens = row_tensors_fn(spec, changed)
    write_random_store(path, spec, SPLITS, PER_CLASS, tokens_fn=tokens, lastblock=block).close()
    return path


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def set_rows(path: Path, rows: list[int], status: str, error: str | None = None) -> None:
    """Turn rows back into `pending` / `failed` (as a part-extraction would leave them)."""
    with open_store(path, mode="a") as s:
        blank = {checksum_column(t): None for t in s.row_tensors}
        s.commit([{"row": r, "status": status, "error": error, **blank} for r in rows])


def chunk_file(s: FeatureStore, tensor: str, row: int) -> Path:
    assert s.location.local is not None
    rest = "/".join(["0"] * (s.array(tensor).ndim - 1))
    return s.location.local / tensor / "c" / str(row) / rest


def by_video(s: FeatureStore, names: list[str]) -> dict[str, dict[str, np.ndarray]]:
    rows = s.select(status="ok")
    data = s.read(rows, names)
    vids = s.manifest["video_id"].to_numpy()[rows]
    return {vid: {n: data[n][i] for n in names} for i, vid in enumerate(vids)}
