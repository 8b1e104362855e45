"""The Parquet manifest: one row per video, written only by the driver, atomically.

Written with page checksums (CRC-32 per data page) so that a damaged manifest is an error when read,
never a table with changed values; its schema and values are checked before anything uses them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
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
    fields.append(pa.field("finite", pa.bool_()))
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
    df["finite"] = pd.array([None] * n, dtype="boolean")
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


# Uncompressed bytes one row may take in each column (values, lengths, levels), checked in the Parquet
# metadata before any column is read; `frame_indices` takes FRAME_INDEX_BYTES per index of the spec.
_ROW_BYTES = {
    "video_id": 512,
    "relpath": 4096,
    "class_name": 512,
    "label": 8,
    "split": 64,
    "row": 16,
    "status": 16,
    "error": 4096,
    "n_frames": 8,
    "fps": 16,
    "decoder": 256,
    "finite": 4,
    "extracted_at": 16,
}
CHECKSUM_ROW_BYTES = 128
FRAME_INDEX_BYTES = 16
COLUMN_SLACK = 64 << 10  # page headers, dictionaries and statistics of one column chunk
MAX_FOOTER_BYTES = 16 << 20
MAX_KEY_VALUE_BYTES = 1 << 20  # the pandas and Arrow schema documents


def read_manifest(
    data: bytes,
    where: str,
    tensors: Sequence[str],
    *,
    indices_per_row: int,
    max_rows: int = MAX_ROWS,
) -> pd.DataFrame:
    """Parse and check a manifest: its Parquet metadata first (rows, schema, the uncompressed size
    of every column chunk), then its values, before anything uses it.

    `indices_per_row` (views x frames) bounds `frame_indices`. Manifests written before the
    `finite` column existed are read with it unknown (their rows are checked on every read).
    """
    what = f"manifest of {where}"
    want = manifest_schema(tensors)
    strings = [f.name for f in want if pa.types.is_string(f.type)]
    try:
        parquet = pq.ParquetFile(
            io.BytesIO(data), page_checksum_verification=True, read_dictionary=strings
        )
        if "finite" not in parquet.schema_arrow.names:
            want = want.remove(want.get_field_index("finite"))
        _check_metadata(parquet.metadata, want, what, indices_per_row, max_rows)
        table = _decoded_strings(parquet.read(columns=want.names), strings, what)
    except CorruptStoreError:
        raise
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise CorruptStoreError(
            f"{what} is unreadable ({one_line(exc)}); restore it from a copy"
        ) from exc
    try:
        df = table.to_pandas()
    except Exception as exc:  # damaged pandas metadata in the file's key-value metadata
        raise CorruptStoreError(f"{what} is unreadable ({one_line(exc)})") from exc
    if list(df.columns) != want.names:
        raise CorruptStoreError(f"{what} has damaged column metadata")
    if "finite" not in df.columns:
        unknown = pd.array([None] * len(df), dtype="boolean")
        df.insert(list(df.columns).index("extracted_at"), "finite", unknown)
    df["finite"] = df["finite"].astype("boolean")
    _check_values(df, what)
    return df


def _check_metadata(
    meta: pq.FileMetaData, want: pa.Schema, what: str, indices_per_row: int, max_rows: int
) -> None:
    """Rows, footer, schema and every column chunk's uncompressed size, from the footer alone."""
    if meta.num_rows > max_rows:
        raise CorruptStoreError(f"{what} claims {meta.num_rows} rows; refusing it")
    if (
        meta.serialized_size > MAX_FOOTER_BYTES
        or sum(len(k) + len(v) for k, v in (meta.metadata or {}).items()) > MAX_KEY_VALUE_BYTES
    ):
        raise CorruptStoreError(f"{what} has a footer of {meta.serialized_size} bytes; refusing it")
    have = meta.schema.to_arrow_schema()
    if set(have.names) != set(want.names) or len(have.names) != len(want.names):
        odd = sorted(set(have.names) ^ set(want.names)) or have.names
        raise CorruptStoreError(
            f"{what} has columns {have.names}, expected {want.names} ({odd[0]!r})"
        )
    for field in want:
        if not have.field(field.name).type.equals(field.type):
            raise CorruptStoreError(
                f"{what}: column {field.name} is {have.field(field.name).type}, expected {field.type}"
            )
    budget = {name: _ROW_BYTES.get(name, CHECKSUM_ROW_BYTES) for name in want.names}
    budget["frame_indices"] = FRAME_INDEX_BYTES * indices_per_row + 64
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            name = column.path_in_schema.split(".", 1)[0]
            most = budget.get(name, 0) * group.num_rows + COLUMN_SLACK
            values = (2 * indices_per_row + 2 if name == "frame_indices" else 1) * group.num_rows
            if column.total_uncompressed_size > most or column.num_values > values:
                raise CorruptStoreError(
                    f"{what}: column {name} holds {column.total_uncompressed_size} bytes "
                    f"({column.num_values} values) uncompressed in {group.num_rows} rows, more "
                    f"than a manifest can ({most} bytes, {values} values); refusing to read it"
                )


def _decoded_strings(table: pa.Table, strings: Sequence[str], what: str) -> pa.Table:
    """String columns read as dictionaries (so a value repeated in every row is not expanded
    first), checked for the longest value, then decoded."""
    for name in strings:
        most = _ROW_BYTES.get(name, CHECKSUM_ROW_BYTES)
        for chunk in table.column(name).chunks:
            longest = pc.max(pc.binary_length(chunk.dictionary)).as_py() or 0
            if longest > most:
                raise CorruptStoreError(
                    f"{what}: column {name} holds a value of {longest} bytes (at most {most}); "
                    "refusing to read it"
                )
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, table.column(name).cast(pa.string()))
    return table


def _check_values(df: pd.DataFrame, what: str) -> None:
    if not (df["row"].to_numpy() == range(len(df))).all():
        raise CorruptStoreError(f"{what} has rows out of order")
    for name in ("video_id", "relpath", "class_name", "split", "status", "label"):
        if df[name].isna().any():
            raise CorruptStoreError(f"{what}: column {name} has empty values")
    if df["video_id"].duplicated().any():
        dup = df.loc[df["video_id"].duplicated(), "video_id"].iat[0]
        raise CorruptStoreError(f"{what}: video_id {dup!r} appears twice")
    bad = sorted(set(df["status"]) - set(STATUSES))
    if bad:
        raise CorruptStoreError(f"{what}: unknown status {bad[0]!r}")
