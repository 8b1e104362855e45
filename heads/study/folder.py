"""The study folder: study.json, one directory per cell (run, per-episode file, cell.json), a lock.

A cell is finished when its cell.json says ok with the cell's config hash; cell.json is written last
(atomically), so a cell killed at any point is simply run again. Per-episode files are Parquet with
columns `episode` and `accuracy` (as `fsar-eval --per-episode` writes them) plus, here, metadata
naming the episodes they score.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from heads.config import MAX_COUNT
from runtime import files
from runtime.errors import FsarError

from .cell import CellOutcome
from .plans import Cell

STUDY_FILE = "study.json"
CELL_FILE = "cell.json"
PER_EPISODE_FILE = "per_episode.parquet"
EPISODES_KEY = b"fsar.episodes"
MAX_EPISODES = MAX_COUNT  # a per-episode file holds at most this many
MAX_JSON_BYTES = 16 << 20
# MAX_EPISODES rows of two 8-byte columns, and room for Parquet's own
MAX_PER_EPISODE_BYTES = 1 << 30


class StudyError(FsarError, ValueError):
    """A study folder or file problem the user can fix (one-line message)."""


def write_atomic(path: Path, text: str) -> None:
    files.write_file(path, text)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a study file, or None when absent, not a regular file (a link), too
    large, too deeply nested or unreadable."""
    try:
        data = files.read_json(path, "study file", MAX_JSON_BYTES)
    except files.FileRefused:
        return None
    return data if isinstance(data, dict) else None


def write_per_episode(path: Path, accuracy: np.ndarray, meta: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {"episode": np.arange(len(accuracy)), "accuracy": np.asarray(accuracy, np.float64)}
    )
    table = table.replace_schema_metadata({EPISODES_KEY: json.dumps(meta, sort_keys=True).encode()})
    files.write_file(path, lambda f: pq.write_table(table, f))


def read_per_episode(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any] | None]:
    """(episode indices, accuracies in [0, 1], the episodes' metadata or None) of a per-episode file."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        files.regular_file(path, MAX_PER_EPISODE_BYTES, "per-episode file")
    except files.FileRefused as error:
        raise StudyError(str(error)) from None
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as error:  # not Parquet, truncated
        raise StudyError(f"{path}: not a readable per-episode Parquet file ({error})") from None
    names = set(parquet.schema_arrow.names)
    if not {"episode", "accuracy"} <= names:
        raise StudyError(
            f"{path}: needs columns episode and accuracy (has {', '.join(sorted(names))})"
        )
    if parquet.metadata.num_rows > MAX_EPISODES:
        raise StudyError(f"{path}: more than {MAX_EPISODES} episodes")
    table = parquet.read(columns=["episode", "accuracy"])
    episode = table.column("episode").to_numpy(zero_copy_only=False)
    accuracy = table.column("accuracy").to_numpy(zero_copy_only=False).astype(np.float64)
    if not np.issubdtype(episode.dtype, np.integer) or len(np.unique(episode)) != len(episode):
        raise StudyError(f"{path}: column episode must hold distinct integers")
    if (
        not np.all(np.isfinite(accuracy))
        or accuracy.min(initial=0) < 0
        or accuracy.max(initial=0) > 1
    ):
        raise StudyError(f"{path}: accuracies must be fractions in [0, 1]")
    meta = None
    raw = (parquet.schema_arrow.metadata or {}).get(EPISODES_KEY)
    if raw is not None and len(raw) < MAX_JSON_BYTES:
        try:
            loaded = files.parse_json(raw, f"{path}: episode metadata")
            meta = loaded if isinstance(loaded, dict) else None
        except files.FileRefused:
            meta = None
    order = np.argsort(episode, kind="stable")
    return episode[order], accuracy[order], meta


PAIRING_KEYS = ("store_fingerprint", "split", "way", "shot", "query", "seed")


def read_pair(a: str | Path, b: str | Path) -> tuple[np.ndarray, np.ndarray, str | None]:
    """The accuracies of two per-episode files scored on the same episodes, and a note when their
    metadata cannot show it (pairing by index); StudyError when they score different episodes."""
    (ep_a, acc_a, meta_a), (ep_b, acc_b, meta_b) = read_per_episode(a), read_per_episode(b)
    if len(ep_a) != len(ep_b) or not (ep_a == ep_b).all():
        raise StudyError(
            f"{a} and {b} score different episodes ({len(ep_a)} and {len(ep_b)}): pair files of "
            "one evaluation setting"
        )
    if not (meta_a and meta_b):
        return acc_a, acc_b, "no episode metadata in both files; pairing by episode index"
    differ = [k for k in PAIRING_KEYS if meta_a.get(k) != meta_b.get(k)]
    if differ:
        raise StudyError(f"{a} and {b} come from different episodes ({', '.join(differ)} differ)")
    return acc_a, acc_b, None


class StudyFolder:
    """`--out`: refuses another study's folder unless resuming it; one fsar-study at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: Any = None

    @classmethod
    def open(cls, path: str | Path, record: dict[str, Any], resume: bool) -> StudyFolder:
        """Create `path`, or reuse it when it holds this study (or any study, with `resume`)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise StudyError(f"--out {path}: exists and is not a folder")
        existing = read_json(path / STUDY_FILE) if path.is_dir() else None
        if path.is_dir() and existing is None and any(path.iterdir()):
            raise StudyError(f"--out {path}: not empty and not a study folder; give another --out")
        if resume and existing is None:
            raise StudyError(f"--resume: nothing to resume, {path} holds no study")
        if existing is not None and existing.get("plan_hash") != record["plan_hash"] and not resume:
            raise StudyError(
                f"--out {path} holds another study (plan {existing.get('plan')}, "
                f"{len(existing.get('cells', []))} cells, store {existing.get('store', {}).get('fingerprint')}); "
                "give another --out, or --resume to continue it with this plan (its finished cells are kept)"
            )
        folder = cls(path)
        (path / "cells").mkdir(parents=True, exist_ok=True)
        folder._take_lock()
        record = {**record, "created_at": (existing or {}).get("created_at", time.time())}
        write_atomic(path / STUDY_FILE, json.dumps(record, indent=2, default=str))
        return folder

    def _take_lock(self) -> None:
        from store.errors import StoreLockedError
        from store.lock import StoreLock

        lock = StoreLock(self.path / ".lock")
        try:
            lock.acquire()
        except StoreLockedError:
            info = read_json(self.path / ".lock") or {}
            raise StudyError(
                f"--out {self.path}: in use by another fsar-study (pid {info.get('pid')} on "
                f"{info.get('host')}); wait for it, or remove {self.path / '.lock'} if it is dead"
            ) from None
        self._lock = lock

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ cells
    def cell_dir(self, cell: Cell) -> Path:
        return self.path / "cells" / f"{cell.id}-{cell.config_hash[:8]}"

    def record(self, cell: Cell) -> dict[str, Any] | None:
        """The cell's cell.json when it was written for this very config, else None."""
        record = read_json(self.cell_dir(cell) / CELL_FILE)
        if record is None or record.get("config_hash") != cell.config_hash:
            return None
        return record

    def finished(self, cell: Cell) -> bool:
        record = self.record(cell)
        return (
            record is not None
            and record.get("status") == "ok"
            and (self.cell_dir(cell) / PER_EPISODE_FILE).is_file()
        )

    def reset(self, cell: Cell) -> Path:
        """An empty directory for a cell about to run (what an earlier attempt left is removed)."""
        directory = self.cell_dir(cell)
        if directory.is_dir() and not directory.is_symlink():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        return directory

    def write_outcome(self, cell: Cell, outcome: CellOutcome) -> None:
        directory = self.cell_dir(cell)
        meta = {
            "store_fingerprint": cell.store_fingerprint, **asdict(cell.eval), "shot": cell.shot,
            "head": cell.head, "cell": cell.id, "config_hash": cell.config_hash,
        }  # fmt: skip
        write_per_episode(directory / PER_EPISODE_FILE, outcome.per_episode, meta)
        fields = {k: v for k, v in asdict(outcome).items() if k != "per_episode"}
        if outcome.run_dir is not None:
            fields["run_dir"] = os.path.relpath(outcome.run_dir, self.path)
        self._write_record(cell, {"status": "ok", **fields, "error": None})

    def write_failure(self, cell: Cell, error: str, details: str, seconds: float) -> None:
        directory = self.cell_dir(cell)
        directory.mkdir(parents=True, exist_ok=True)
        files.write_file(directory / "error.log", details)
        self._write_record(cell, {"status": "failed", "error": error, "seconds": seconds})

    def _write_record(self, cell: Cell, fields: dict[str, Any]) -> None:
        record = {
            "id": cell.id, "row": cell.row, "config_hash": cell.config_hash,
            "identity": cell.identity(), **fields, "finished_at": time.time(),
        }  # fmt: skip
        write_atomic(self.cell_dir(cell) / CELL_FILE, json.dumps(record, indent=1, default=float))

    def per_episode(self, cell: Cell) -> np.ndarray:
        path = self.cell_dir(cell) / PER_EPISODE_FILE
        episode, accuracy, _ = read_per_episode(path)
        if not np.array_equal(episode, np.arange(cell.eval.episodes)):
            raise StudyError(
                f"{path}: not episodes 0..{cell.eval.episodes - 1}; remove its cell folder to rerun it"
            )
        return accuracy
