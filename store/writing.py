"""Writing a store: its layout at creation, the driver's manifest and attribute updates, workers' chunks.

The driver creates the store (all rows `pending`, arrays pre-sized, chunk = one video) and is the only
writer of the manifest and root attributes; workers write their own rows' chunks through `ChunkWriter`.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
import zarr.codecs

from .errors import NonFiniteError, StoreError
from .layout import (
    CHECKSUM_ALGORITHM,
    LASTBLOCK_NAME,
    LOCK_FILE,
    MANIFEST_FILE,
    TSFSAR_INIT_NAME,
    check_tsfsar_init,
    checksum_column,
    cls_source,
    dimension_names,
    manifest_columns,
    row_tensors,
    schema_version_for,
    text_name,
    weights_file,
)
from .location import DirLocation, resolve
from .lock import StoreLock
from .manifest import manifest_to_bytes, new_manifest
from .reading import StoreReader, checksum
from .root import open_group, validate_attrs
from .weights_format import weights_to_bytes

DEFAULT_CODEC: dict[str, Any] = {"name": "zstd", "level": 3}
WRITE_CONFIG = {"write_empty_chunks": True}  # a row of zeros is still a chunk: missing means lost


def make_compressors(codec: Mapping[str, Any]) -> Any:
    name = codec.get("name", "zstd")
    if name == "none":
        return None
    if name == "zstd":
        return zarr.codecs.ZstdCodec(level=int(codec.get("level", 3)))
    if name == "blosc-zstd":
        return zarr.codecs.BloscCodec(
            cname="zstd",
            clevel=int(codec.get("level", 5)),
            shuffle=codec.get("shuffle", "shuffle"),
            typesize=2,
        )
    raise StoreError(f"unknown codec {name!r}: use zstd, blosc-zstd or none")


def _now() -> pd.Timestamp:
    return pd.Timestamp(datetime.now(timezone.utc))


def create_layout(
    folder: Path,
    spec: Mapping[str, Any],
    classes: Sequence[str],
    videos: pd.DataFrame,
    *,
    dataset: str,
    split_source: str,
    written_on: str | None,
) -> StoreLock:
    """Write a new store's arrays, manifest and root attributes into the empty `folder`; returns
    its lock, held. `written_on` is the store's final real path when it records this machine."""
    spec = _complete_spec(spec)
    location = resolve(folder, mode="w")
    assert isinstance(location, DirLocation)
    lock = StoreLock(folder / LOCK_FILE)
    lock.acquire()
    try:
        group = zarr.open_group(location.zarr_store, mode="a", zarr_format=3)  # only the lock
        _create_arrays(group, spec, len(videos))
        names = [t["name"] for t in spec["tensors"]]
        manifest = new_manifest(videos, classes, names)
        location.write_file(MANIFEST_FILE, manifest_to_bytes(manifest, names))
        mark = {"host": socket.gethostname(), "path": written_on}
        group.attrs.update(
            {
                **({"written_on": mark} if written_on is not None else {}),
                "schema_version": schema_version_for(spec),
                "spec": json.loads(json.dumps(spec)),
                "classes": list(classes),
                "tensors": names,
                "dataset": dataset,
                "split_source": split_source,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "text": {},
                "weights": {},
            }
        )
        return lock
    except BaseException:
        lock.release()
        raise


def _complete_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as stored: dtype and codec defaults, checksum algorithm, the per-row tensor list."""
    out = dict(spec)
    out.setdefault("dtype", "float16")
    out.setdefault("codec", dict(DEFAULT_CODEC))
    out["checksum"] = CHECKSUM_ALGORITHM
    out["tensors"] = row_tensors(out)
    return out


def _create_arrays(group: zarr.Group, spec: Mapping[str, Any], n_rows: int) -> None:
    """One array per per-row tensor, pre-sized to every row, one chunk per video."""
    compressors = make_compressors(spec["codec"])
    for entry in spec["tensors"]:
        shape = tuple(entry["shape_per_row"])
        group.create_array(
            entry["name"],
            shape=(n_rows, *shape),
            chunks=(1, *shape),
            dtype=entry["dtype"],
            fill_value=0,
            compressors=compressors,
            dimension_names=dimension_names(entry["name"]),
        )


class StoreWriter(StoreReader):
    """The driver's side of an open store (mode `a`): manifest commits, text arrays, weights files."""

    def _require_writer(self) -> None:
        if self.mode != "a":
            raise StoreError(f"{self.location.describe()} is open read-only")

    def commit(self, updates: Sequence[Mapping[str, Any]]) -> None:
        """Apply manifest updates (each names its `row`) and rewrite the manifest atomically.

        A row may be `ok` only with every checksum and `finite` recorded (what
        `ChunkWriter.write_row` returns); nothing changes when an update is refused.
        """
        self._require_writer()
        allowed = set(manifest_columns(self.row_tensors)) - {"video_id", "row"}
        m = self.manifest.copy()
        for upd in updates:
            r = int(upd["row"])
            unknown = sorted(set(upd) - allowed - {"row"})
            if unknown:
                raise ValueError(f"unknown manifest column {unknown[0]!r}")
            if upd.get("status", "ok") != "ok" and "finite" not in upd:
                m.at[r, "finite"] = None  # a row that is not ok claims nothing
            for key, value in upd.items():
                if key == "frame_indices" and value is not None:
                    value = [list(map(int, v)) for v in value]
                if key == "extracted_at" and value is not None:
                    value = pd.Timestamp(value)
                if key != "row":
                    m.at[r, key] = value
            record = [m.at[r, checksum_column(t)] for t in self.row_tensors]
            if m.at[r, "status"] == "ok" and (
                not all(isinstance(v, str) for v in record)
                or not isinstance(m.at[r, "finite"], (bool, np.bool_))
                or not m.at[r, "finite"]
            ):
                raise ValueError(
                    f"row {r} committed ok without checksums and finiteness (what "
                    "ChunkWriter.write_row returns)"
                )
        self._writer().write_file(MANIFEST_FILE, manifest_to_bytes(m, self.row_tensors))
        self.manifest = m

    def _writer(self) -> DirLocation:
        if not isinstance(self.location, DirLocation):
            raise StoreError(
                f"{self.location.describe()} is not a local directory: it cannot be written"
            )
        return self.location

    def set_attrs(self, **updates: Any) -> None:
        self._group.attrs.update(updates)
        self.attrs.update(updates)

    def write_text(self, name: str, embeddings: np.ndarray, templates: Sequence[str]) -> None:
        """Add or replace `text/<name>`: (C, M, D) embeddings of every class under M templates."""
        self._require_writer()
        emb = np.asarray(embeddings, dtype=np.float32)
        if not np.isfinite(emb).all():
            raise NonFiniteError(f"{text_name(name)}: NaN or inf embeddings are not written")
        if emb.ndim != 3 or emb.shape[0] != len(self.classes) or emb.shape[1] != len(templates):
            raise ValueError(
                f"{text_name(name)} must be (classes={len(self.classes)}, templates={len(templates)}, D), "
                f"got {emb.shape}"
            )
        path = text_name(name)
        arr = self._group.create_array(
            path,
            shape=emb.shape,
            chunks=emb.shape,
            dtype="float32",
            overwrite=True,
            compressors=None,
        ).with_config(WRITE_CONFIG)
        arr[...] = emb
        self._arrays.pop(path, None)
        text = dict(self.attrs.get("text", {}))
        text[name] = {"templates": list(templates), "checksum": checksum(emb)}
        tensors = self.tensors if path in self.tensors else [*self.tensors, path]
        self.set_attrs(text=text, tensors=tensors)

    def write_lastblock(self, tensors: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        """Save the last block's weights + config as `weights/lastblock.safetensors`."""
        self._require_writer()
        self.write_weights_file(LASTBLOCK_NAME, weights_to_bytes(tensors, config))

    def write_tsfsar_init(self, tensors: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        """Save TS-FSAR's side-network init + config as `weights/tsfsar_init.safetensors`."""
        self._require_writer()
        arrays = {k: np.asarray(v) for k, v in tensors.items()}
        check_tsfsar_init(arrays, config)
        self.write_weights_file(TSFSAR_INIT_NAME, weights_to_bytes(arrays, config))

    def write_weights_file(self, name: str, data: bytes) -> None:
        """Store raw bytes as `weights/<name>` (temp file, rename) and record their sha256."""
        self._require_writer()
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad weights file name {name!r}")
        self._writer().write_file(weights_file(name), data)
        weights = dict(self.attrs.get("weights", {}))
        weights[name] = hashlib.sha256(data).hexdigest()
        self.set_attrs(weights=weights)


class ChunkWriter:
    """A worker's handle: writes its own rows' chunks, never the manifest, takes no lock."""

    def __init__(self, path: str | Path) -> None:
        self.location = resolve(path, mode="a")
        group = open_group(self.location, "r+")
        attrs = dict(group.attrs)
        validate_attrs(attrs, self.location.describe())
        self.spec = attrs["spec"]
        self._entries = {t["name"]: t for t in self.spec["tensors"]}
        self._arrays = {
            name: zarr.open_array(self.location.zarr_store, path=name, mode="r+").with_config(
                WRITE_CONFIG
            )
            for name in self._entries
        }

    def write_row(self, row: int, tensors: Mapping[str, np.ndarray]) -> dict[str, str]:
        """Write one video's tensors (shape without the row axis); `cls/` arrays are derived from
        their `tokens/` arrays when not given. Nothing is written unless every value is finite.
        Returns the manifest fields that record what was written (checksums, `finite`).
        """
        data = dict(tensors)
        for name in self._entries:
            source = cls_source(name)
            if source is not None and name not in data and source in data:
                data[name] = np.asarray(data[source])[..., 0, :]
        missing = set(self._entries) - set(data)
        if missing:
            raise ValueError(f"row {row}: missing tensors {sorted(missing)}")
        values = {name: self._as_stored(row, name, value) for name, value in data.items()}
        sums: dict[str, Any] = {}
        for name, value in values.items():
            self._arrays[name][row] = value
            sums[checksum_column(name)] = checksum(value)
        return {**sums, "finite": True}

    def _as_stored(self, row: int, name: str, value: np.ndarray) -> np.ndarray:
        """The value in the array's dtype; refused when its shape is not the spec's or when it
        holds NaN or inf (after the cast: float16 overflows past 65504)."""
        entry = self._entries.get(name)
        if entry is None:
            raise ValueError(f"the store has no per-row tensor {name!r}")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
            value = np.ascontiguousarray(value, dtype=entry["dtype"])
        if list(value.shape) != entry["shape_per_row"]:
            raise ValueError(f"{name}: shape {value.shape}, the spec says {entry['shape_per_row']}")
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        if bad:
            raise NonFiniteError(
                f"row {row} {name}: {bad} NaN or inf value(s) ({entry['dtype']} overflow?); "
                "the row is not written"
            )
        return value


def done_update(row: int, sums: Mapping[str, str], **fields: Any) -> dict[str, Any]:
    """A manifest update marking a row `ok` (after its chunks are written)."""
    return {"row": row, "status": "ok", "error": None, "extracted_at": _now(), **sums, **fields}
