"""The Parquet manifest: one row per video, written only by the driver, atomically.

Written with page checksums (CRC-32 per data page) so that a damaged manifest is an error when read,
never a table with changed values; its schema and values are checked before anything uses them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CorruptStoreError
from .layout import MANIFEST_BASE_COLUMNS, MAX_ROWS, STATUSES, checksum_column, manifest_columns
from .location import one_line

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


def manifest_to_bytes(df: pd.DataFrame, tensors: Sequence[str]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(to_table(df, tensors), sink, write_page_checksum=True)
    return sink.getvalue()


def read_manifest(
    data: bytes, where: str, tensors: Sequence[str], max_rows: int = MAX_ROWS
) -> pd.DataFrame:
    """Parse and check a manifest: row count, column types and values, before anything uses it."""
    try:
        meta = pq.ParquetFile(io.BytesIO(data)).metadata
        if meta.num_rows > max_rows:
            raise CorruptStoreError(f"manifest of {where} claims {meta.num_rows} rows; refusing it")
        table = pq.read_table(io.BytesIO(data), page_checksum_verification=True)
    except CorruptStoreError:
        raise
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise CorruptStoreError(
            f"manifest of {where} is unreadable ({one_line(exc)}); restore it from a copy"
        ) from exc
    want = manifest_schema(tensors)
    missing = [c for c in want.names if c not in table.column_names]
    if missing:
        raise CorruptStoreError(f"manifest of {where} lacks columns {missing}")
    for name in want.names:
        have = table.schema.field(name).type
        if not have.equals(want.field(name).type):
            raise CorruptStoreError(
                f"manifest of {where}: column {name} is {have}, expected {want.field(name).type}"
            )
    try:
        df = table.to_pandas()
    except Exception as exc:  # damaged pandas metadata in the file's key-value metadata
        raise CorruptStoreError(f"manifest of {where} is unreadable ({one_line(exc)})") from exc
    if list(df.columns) != table.column_names:
        raise CorruptStoreError(f"manifest of {where} has damaged column metadata")
    if not (df["row"].to_numpy() == range(len(df))).all():
        raise CorruptStoreError(f"manifest of {where} has rows out of order")
    for name in ("video_id", "relpath", "class_name", "split", "status", "label"):
        if df[name].isna().any():
            raise CorruptStoreError(f"manifest of {where}: column {name} has empty values")
    if df["video_id"].duplicated().any():
        dup = df.loc[df["video_id"].duplicated(), "video_id"].iat[0]
        raise CorruptStoreError(f"manifest of {where}: video_id {dup!r} appears twice")
    bad = sorted(set(df["status"]) - set(STATUSES))
    if bad:
        raise CorruptStoreError(f"manifest of {where}: unknown status {bad[0]!r}")
    return df
