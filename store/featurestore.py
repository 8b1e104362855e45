"""`FeatureStore`: one open store (read, write, verify) and its two factories, open and create.

The classes behind it each do one job: `reading.StoreReader`, `writing.StoreWriter`,
`verification.StoreChecks`. Reads check every row against its manifest checksum by default, except
for a directory store written on this machine at its current path (`root.written_here`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from .errors import StoreError
from .folders import building
from .layout import LOCK_FILE
from .location import resolve
from .lock import StoreLock
from .root import open_group
from .verification import StoreChecks
from .writing import StoreWriter, create_layout


class FeatureStore(StoreWriter, StoreChecks):
    """An open store. Use `create_store` / `open_store` rather than the constructor."""


def create_store(
    path: str | Path,
    spec: Mapping[str, Any],
    classes: Sequence[str],
    videos: pd.DataFrame,
    *,
    dataset: str,
    split_source: str,
    written_here: bool = True,
    temp_name: bool = True,
) -> FeatureStore:
    """Create a store with every row `pending` and arrays pre-sized; returns it open for writing.

    `videos` needs columns `video_id`, `relpath`, `class_name`, `split` (optionally `status`/`error`
    for rows known to have failed already, e.g. `missing`). `written_here` records this machine and
    path in the root attributes, so that reads here skip checksums (merge and subset pass False:
    their rows come from elsewhere). The store is built under a temp name beside `path` unless
    `temp_name` is False (merge and subset build their whole folder under one already).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file, not a store directory: choose another path")
    if path.exists() and any(path.iterdir()):
        raise StoreError(
            f"{path} exists and is not empty: open it to resume, or choose another path"
        )
    if len(videos) == 0:
        raise StoreError("no videos to store")
    mark = os.path.realpath(path) if written_here else None
    building_it = building(path, "creating the store") if temp_name else nullcontext(path)
    with building_it as folder:
        lock = create_layout(
            folder,
            spec,
            classes,
            videos,
            dataset=dataset,
            split_source=split_source,
            written_on=mark,
        )
    lock.path = path / LOCK_FILE  # the lock file moved with the folder
    try:
        location = resolve(path, mode="a")
        return FeatureStore(location, open_group(location, "r+"), "a", lock)
    except BaseException:
        lock.release()
        raise


def open_store(
    path: str | Path,
    mode: Literal["r", "a"] = "r",
    *,
    cache: str | Path | None = None,
    verify: bool | None = None,
) -> FeatureStore:
    """Open read-only (`r`, any number of readers) or as the single writer (`a`, takes the lock).

    `path` is a directory, a packed file (`fsar-store pack`) or a URL (http(s)://, s3://, gs://);
    `cache` (default: env `FSAR_CACHE`) keeps a remote store's fetched chunks on local disk.
    `verify` sets `verify_reads` (default: see `verify_by_default`).
    """
    if mode not in ("r", "a"):
        raise ValueError("mode must be 'r' or 'a'")
    location = resolve(path, mode=mode, cache=cache)
    lock = None
    if mode == "a":
        if location.local is None:
            raise StoreError(f"{location.describe()} is not a local directory: it opens read-only")
        lock = StoreLock(location.local / LOCK_FILE)
        lock.acquire()
    try:
        group = open_group(location, "r" if mode == "r" else "r+")
        return FeatureStore(location, group, mode, lock, verify)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
