"""The Parquet manifest: one row per video, written only by the driver, atomically."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CorruptStoreError
from .layout import MANIFEST_BASE_COLUMNS, checksum_column, manifest_columns

_BASE_TYPES: dict[str, pa.DataType] = {
    "video_id": pa.string(),
    "relpath": pa.string(),
    "class_name": pa.string(),
    "label": pa.int32(),
    "split": pa.string(),
    "row": pa.int64(),
    "status": pa.string(),
    "error": pa.string(),
    "n_frames": pa.int32(),
    "fps": pa.float64(),
    "frame_indices": pa.list_(pa.list_(pa.int32())),
    "decoder": pa.string(),
}


def manifest_schema(tensors: Sequence[str]) -> pa.Schema:
    fields = [pa.field(name, _BASE_TYPES[name]) for name in MANIFEST_BASE_COLUMNS]
    fields += [pa.field(checksum_column(t), pa.string()) for t in tensors]
    fields.append(pa.field("extracted_at", pa.timestamp("us", tz="UTC")))
    return pa.schema(fields)


def new_manifest(
    videos: pd.DataFrame, classes: Sequence[str], tensors: Sequence[str]
) -> pd.DataFrame:
    """All rows `pending`, `row` = position, `label` = index of `class_name` in `classes`."""
    missing = {"video_id", "relpath", "class_name", "split"} - set(videos.columns)
    if missing:
        raise ValueError(f"videos table lacks columns {sorted(missing)}")
    if videos["video_id"].duplicated().any():
        dup = videos.loc[videos["video_id"].duplicated(), "video_id"].iloc[0]
        raise ValueError(f"duplicate video_id {dup!r}")
    index = {name: i for i, name in enumerate(classes)}
    unknown = set(videos["class_name"]) - set(index)
    if unknown:
        raise ValueError(f"class names not in the class list: {sorted(unknown)[:5]}")
    n = len(videos)
    df = pd.DataFrame(
        {
            "video_id": videos["video_id"].astype(str).to_numpy(),
            "relpath": videos["relpath"].astype(str).to_numpy(),
            "class_name": videos["class_name"].astype(str).to_numpy(),
            "label": videos["class_name"].map(index).astype("int32").to_numpy(),
            "split": videos["split"].astype(str).to_numpy(),
            "row": range(n),
            "status": "pending",
            "error": None,
            "n_frames": pd.array([None] * n, dtype="Int32"),
            "fps": float("nan"),
            "frame_indices": [None] * n,
            "decoder": None,
        }
    )
    if "status" in videos.columns:  # rows known to fail before extraction (e.g. `missing`)
        df["status"] = videos["status"].fillna("pending").to_numpy()
        df["error"] = videos.get("error", pd.Series([None] * n)).to_numpy()
    for t in tensors:
        df[checksum_column(t)] = None
    df["extracted_at"] = pd.Series([pd.NaT] * n, dtype="datetime64[us, UTC]")
    return df[manifest_columns(tensors)]


def to_table(df: pd.DataFrame, tensors: Sequence[str]) -> pa.Table:
    return pa.Table.from_pandas(
        df[manifest_columns(tensors)], schema=manifest_schema(tensors), preserve_index=False
    )


def write_manifest_atomic(path: Path, df: pd.DataFrame, tensors: Sequence[str]) -> None:
    """Temp file, fsync, rename: a crash leaves the old or the new manifest, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(to_table(df, tensors), tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def manifest_to_bytes(df: pd.DataFrame, tensors: Sequence[str]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(to_table(df, tensors), sink)
    return sink.getvalue()


def read_manifest(data: bytes, where: str, tensors: Sequence[str]) -> pd.DataFrame:
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise CorruptStoreError(
            f"manifest of {where} is unreadable ({exc}); restore it from a copy"
        ) from exc
    want = manifest_columns(tensors)
    missing = [c for c in want if c not in table.column_names]
    if missing:
        raise CorruptStoreError(f"manifest of {where} lacks columns {missing}")
    df = table.to_pandas()
    if not (df["row"].to_numpy() == range(len(df))).all():
        raise CorruptStoreError(f"manifest of {where} has rows out of order")
    return df
