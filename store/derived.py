"""New stores built from rows of existing ones (subset, merge): create, copy and re-hash, finish.

Every copied row is re-hashed against its source manifest, so a corrupt source is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from runtime.progress import progress_bar

from .errors import CorruptStoreError, NonFiniteError, StoreError
from .featurestore import FeatureStore, create_store, open_store
from .folders import building
from .layout import checksum_column, row_bytes
from .writing import ChunkWriter

SPLIT_ORDER = ("train", "val", "test")
_STANDARD_ATTRS = {
    "schema_version",
    "spec",
    "classes",
    "tensors",
    "dataset",
    "split_source",
    "created_at",
    "text",
    "weights",
    "written_on",
}
_COPIED_COLUMNS = ("n_frames", "fps", "frame_indices", "decoder", "extracted_at", "error")


def class_splits(s: FeatureStore) -> dict[str, str]:
    """Split of every class in `s.classes`; a class without rows takes its neighbours' split."""
    m = s.manifest
    seen = m.groupby("class_name")["split"].unique()
    known: dict[str, str] = {}
    for name, splits in seen.items():
        if len(splits) > 1:
            raise CorruptStoreError(
                f"{s.location.describe()}: class {name!r} has videos in splits {sorted(splits)}"
            )
        known[str(name)] = str(splits[0])
    out: dict[str, str] = {}
    previous: str | None = None
    pending: list[str] = []
    for name in s.classes:
        if name in known:
            for p in pending:  # rowless classes before the first known one
                out[p] = known[name]
            pending = []
            previous = known[name]
            out[name] = previous
        elif previous is not None:
            out[name] = previous
        else:
            pending.append(name)
    for p in pending:
        out[p] = SPLIT_ORDER[0]
    return out


def split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split), "") if split in SPLIT_ORDER else (len(SPLIT_ORDER), split)


@dataclass
class RowSource:
    """One output row: where its data and manifest record come from."""

    store: FeatureStore
    row: int
    record: dict[str, Any]


@dataclass
class ShareReport:
    """What `merge` / `subset` wrote."""

    out: Path
    rows: int
    ok: int
    classes: int
    tensors: list[str]
    duplicates: int = 0
    notes: list[str] = field(default_factory=list)


def batch_rows(s: FeatureStore, names: Sequence[str]) -> int:
    """Rows per copy batch: at most 256, about 64 MB of the named tensors."""
    return max(1, min(256, (64 << 20) // max(1, row_bytes(s.spec, names))))


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, (list, np.ndarray)):
        return True
    return not pd.isna(value)


def write_store(
    out: Path,
    *,
    spec: dict[str, Any],
    classes: list[str],
    rows: list[RowSource],
    first: FeatureStore,
    texts: dict[str, tuple[np.ndarray, list[str]]],
    weights: dict[str, bytes],
    extra_attrs: dict[str, Any],
    progress: bool,
) -> FeatureStore:
    """Create `out` holding `rows` (ok rows' chunks copied and re-hashed), texts and weights;
    built under a temp name beside `out`, so a failure (a full disk too) leaves nothing."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"{out} exists and is not empty: choose another --out")
    with building(out, "writing the new store") as folder:
        dest = create_store(
            folder,
            spec,
            classes,
            _videos_table(rows),
            dataset=first.dataset,
            split_source=str(first.attrs.get("split_source", "")),
            written_here=False,  # rows from elsewhere: reads keep checking checksums
            temp_name=False,  # `folder` is the temp name already
        )
        with dest:
            updates = _failed_updates(rows) + _copy_rows(dest, folder, rows, progress)
            dest.commit(sorted(updates, key=lambda u: u["row"]))
            for name, (array, templates) in texts.items():
                dest.write_text(name, array, templates)
            for name, data_bytes in weights.items():
                dest.write_weights_file(name, data_bytes)
            if extra_attrs:
                dest.set_attrs(**extra_attrs)
    return open_store(out)


def _videos_table(rows: Sequence[RowSource]) -> pd.DataFrame:
    """The new store's video list: ok rows start `pending` (until copied), failed rows stay failed."""
    failed = [r.record["status"] == "failed" for r in rows]
    return pd.DataFrame(
        {
            "video_id": [r.record["video_id"] for r in rows],
            "relpath": [r.record["relpath"] for r in rows],
            "class_name": [r.record["class_name"] for r in rows],
            "split": [r.record["split"] for r in rows],
            "status": ["failed" if f else "pending" for f in failed],
            "error": [r.record["error"] if f else None for r, f in zip(rows, failed, strict=True)],
        }
    )


def _copied_fields(record: dict[str, Any], keys: Sequence[str] = _COPIED_COLUMNS) -> dict[str, Any]:
    return {k: record.get(k) for k in keys if _present(record.get(k))}


def _failed_updates(rows: Sequence[RowSource]) -> list[dict[str, Any]]:
    """Manifest updates keeping what a failed row recorded (frames, decoder, error)."""
    return [
        {"row": out_row, **_copied_fields(src.record)}
        for out_row, src in enumerate(rows)
        if src.record["status"] == "failed"
    ]


def _copy_rows(
    dest: FeatureStore, out: Path, rows: Sequence[RowSource], progress: bool
) -> list[dict[str, Any]]:
    """Copy every ok row's chunks, source store by source store in batches; their updates."""
    by_store: dict[int, list[tuple[int, RowSource]]] = {}
    for out_row, src in enumerate(rows):
        if src.record["status"] == "ok":
            by_store.setdefault(id(src.store), []).append((out_row, src))
    writer = ChunkWriter(out)
    bar = progress_bar(sum(map(len, by_store.values())), progress, desc="copy", unit="video")
    updates: list[dict[str, Any]] = []
    for items in by_store.values():
        step = batch_rows(items[0][1].store, dest.row_tensors)
        for start in range(0, len(items), step):
            batch = items[start : start + step]
            updates += _copy_batch(writer, dest.row_tensors, batch)
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    return updates


def _copy_batch(
    writer: ChunkWriter, names: Sequence[str], batch: Sequence[tuple[int, RowSource]]
) -> list[dict[str, Any]]:
    """Write one batch of rows from one source store, each re-hashed against its source record."""
    store = batch[0][1].store
    data = store.read([src.row for _, src in batch], names, verify=False)
    updates = []
    for i, (out_row, src) in enumerate(batch):
        try:
            sums = writer.write_row(out_row, {n: data[n][i] for n in names})
        except NonFiniteError:
            where = store.location.describe()
            raise NonFiniteError(
                f"{where}: row {src.row} ({src.record['video_id']}) holds NaN or inf values; "
                f"it is not copied (run fsar-store verify {where})"
            ) from None
        _check_copied(store, src, sums, names)
        fields = _copied_fields(src.record, [k for k in _COPIED_COLUMNS if k != "error"])
        updates.append({"row": out_row, "status": "ok", "error": None, **fields, **sums})
    return updates


def _check_copied(
    store: FeatureStore, src: RowSource, sums: dict[str, str], names: Sequence[str]
) -> None:
    for n in names:
        col = checksum_column(n)
        if sums[col] != src.record.get(col):
            where = store.location.describe()
            raise CorruptStoreError(
                f"{where}: row {src.row} ({src.record['video_id']}) {n} fails its checksum; "
                f"run fsar-store verify {where}"
            )


def share_report(
    out: str | Path, dest: FeatureStore, classes: list[str], **extra: Any
) -> ShareReport:
    return ShareReport(
        Path(out),
        dest.n_rows,
        len(dest.select(status="ok")),
        len(classes),
        dest.row_tensors,
        **extra,
    )


def records(s: FeatureStore) -> list[dict[str, Any]]:
    return s.manifest.to_dict(orient="records")


def check_extras(s: FeatureStore) -> None:
    """Text arrays and weights must match their recorded checksums before they are copied."""
    problems = s.verify([])
    if problems:
        raise CorruptStoreError(f"{s.location.describe()}: {problems[0]}; run fsar-store verify")


def extra_attrs(s: FeatureStore) -> dict[str, Any]:
    return {k: v for k, v in s.attrs.items() if k not in _STANDARD_ATTRS}


def base_spec(s: FeatureStore) -> dict[str, Any]:
    return {k: v for k, v in s.spec.items() if k not in ("tensors", "checksum")}
