"""New stores from existing ones: `subset` keeps some splits or tensors, `merge` joins two stores.

Every copied row is re-hashed against its source manifest, so a corrupt source is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from runtime.progress import progress_bar

from .errors import CorruptStoreError, SpecMismatchError, StoreError
from .featurestore import FeatureStore, create_store, open_store
from .layout import checksum_column, row_bytes, spec_differences, text_name, weights_file
from .location import remove_partial
from .writing import ChunkWriter

SPLIT_ORDER = ("train", "val", "test")
COSINE_SAME = 0.999  # below this, two copies of a video are different features, not fp16 rounding
_STATUS_RANK = {"ok": 2, "failed": 1, "pending": 0}
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


# ---------------------------------------------------------------------- class lists
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


def _split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split), "") if split in SPLIT_ORDER else (len(SPLIT_ORDER), split)


def _merge_order(first: Sequence[str], second: Sequence[str]) -> list[str]:
    """Union keeping both orders where they agree: each new name goes after its predecessor."""
    out = list(first)
    for i, name in enumerate(second):
        if name in out:
            continue
        anchor = next((second[j] for j in range(i - 1, -1, -1) if second[j] in out), None)
        out.insert(0 if anchor is None else out.index(anchor) + 1, name)
    return out


def union_classes(a: FeatureStore, b: FeatureStore) -> list[str]:
    """Classes of both stores, train then val then test, each in split-file order."""
    sa, sb = class_splits(a), class_splits(b)
    for name in set(sa) & set(sb):
        if sa[name] != sb[name]:
            raise SpecMismatchError(
                f"class {name!r} is in split {sa[name]} in {a.location.describe()} and "
                f"{sb[name]} in {b.location.describe()}: different split sources"
            )
    splits = sorted(set(sa.values()) | set(sb.values()), key=_split_rank)
    out: list[str] = []
    for split in splits:
        out += _merge_order(
            [c for c in a.classes if sa[c] == split], [c for c in b.classes if sb[c] == split]
        )
    return out


# ---------------------------------------------------------------------- writing a new store
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


def _batch_rows(s: FeatureStore, names: Sequence[str]) -> int:
    """Rows per copy batch: at most 256, about 64 MB of the named tensors."""
    return max(1, min(256, (64 << 20) // max(1, row_bytes(s.spec, names))))


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, (list, np.ndarray)):
        return True
    return not pd.isna(value)


def _write_store(
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
    """Create `out` holding `rows` (ok rows' chunks copied and re-hashed), texts and weights."""
    videos = pd.DataFrame(
        {
            "video_id": [r.record["video_id"] for r in rows],
            "relpath": [r.record["relpath"] for r in rows],
            "class_name": [r.record["class_name"] for r in rows],
            "split": [r.record["split"] for r in rows],
            "status": ["failed" if r.record["status"] == "failed" else "pending" for r in rows],
            "error": [r.record["error"] if r.record["status"] == "failed" else None for r in rows],
        }
    )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"{out} exists and is not empty: choose another --out")
    created = not out.exists()
    dest = create_store(
        out,
        spec,
        classes,
        videos,
        dataset=first.dataset,
        split_source=str(first.attrs.get("split_source", "")),
        written_here=False,  # rows from elsewhere: reads keep checking checksums
    )
    try:
        names = dest.row_tensors
        writer = ChunkWriter(out)
        updates: list[dict[str, Any]] = []
        todo: dict[int, list[tuple[int, RowSource]]] = {}
        for out_row, src in enumerate(rows):
            extra = {k: src.record.get(k) for k in _COPIED_COLUMNS}
            upd = {"row": out_row, **{k: v for k, v in extra.items() if _present(v)}}
            if src.record["status"] == "ok":
                todo.setdefault(id(src.store), []).append((out_row, src))
            elif src.record["status"] == "failed":
                updates.append(upd)
        total = sum(len(v) for v in todo.values())
        bar = progress_bar(total, progress, desc="copy", unit="video")
        for items in todo.values():
            store = items[0][1].store
            step = _batch_rows(store, names)
            for start in range(0, len(items), step):
                batch = items[start : start + step]
                data = store.read([src.row for _, src in batch], names, verify=False)
                for i, (out_row, src) in enumerate(batch):
                    sums = writer.write_row(out_row, {n: data[n][i] for n in names})
                    for n in names:
                        col = checksum_column(n)
                        if sums[col] != src.record.get(col):
                            vid = src.record["video_id"]
                            raise CorruptStoreError(
                                f"{store.location.describe()}: row {src.row} ({vid}) {n} fails its "
                                f"checksum; run fsar-store verify {store.location.describe()}"
                            )
                    extra = {k: src.record.get(k) for k in _COPIED_COLUMNS if k != "error"}
                    updates.append(
                        {
                            "row": out_row,
                            "status": "ok",
                            "error": None,
                            **{k: v for k, v in extra.items() if _present(v)},
                            **sums,
                        }
                    )
                if bar is not None:
                    bar.update(len(batch))
        if bar is not None:
            bar.close()
        dest.commit(sorted(updates, key=lambda u: u["row"]))
        for name, (array, templates) in texts.items():
            dest.write_text(name, array, templates)
        for name, data_bytes in weights.items():
            dest.write_weights_file(name, data_bytes)
        if extra_attrs:
            dest.set_attrs(**extra_attrs)
        dest.close()
    except BaseException:
        dest.close()
        remove_partial(out, created)
        raise
    return open_store(out)


def _report(out: str | Path, dest: FeatureStore, classes: list[str], **extra: Any) -> ShareReport:
    return ShareReport(
        Path(out),
        dest.n_rows,
        len(dest.select(status="ok")),
        len(classes),
        dest.row_tensors,
        **extra,
    )


def _records(s: FeatureStore) -> list[dict[str, Any]]:
    return s.manifest.to_dict(orient="records")


def _check_extras(s: FeatureStore) -> None:
    """Text arrays and weights must match their recorded checksums before they are copied."""
    problems = s.verify([])
    if problems:
        raise CorruptStoreError(f"{s.location.describe()}: {problems[0]}; run fsar-store verify")


def _extra_attrs(s: FeatureStore) -> dict[str, Any]:
    return {k: v for k, v in s.attrs.items() if k not in _STANDARD_ATTRS}


def _base_spec(s: FeatureStore) -> dict[str, Any]:
    return {k: v for k, v in s.spec.items() if k not in ("tensors", "checksum")}


# ---------------------------------------------------------------------- subset
def subset(
    src: str | Path,
    out: str | Path,
    *,
    splits: Sequence[str] | None = None,
    tensors: Sequence[str] | None = None,
    ok_only: bool = False,
    cache: str | Path | None = None,
    progress: bool = False,
) -> ShareReport:
    """Copy some splits and/or per-row tensors of a store (local, packed or remote) into `out`.

    Only the kept splits' classes remain (labels remapped, text arrays sliced); weights are kept.
    """
    s = open_store(src, cache=cache)
    _check_extras(s)
    have_splits = sorted(set(s.manifest["split"]), key=_split_rank)
    if splits is not None:
        unknown = [x for x in splits if x not in have_splits]
        if unknown:
            raise StoreError(
                f"{s.location.describe()} has no split {unknown[0]!r} (it has: {', '.join(have_splits)})"
            )
    keep_splits = set(have_splits if splits is None else splits)
    spec = _base_spec(s)
    if tensors is not None:
        unknown = [t for t in tensors if t not in s.row_tensors]
        if unknown:
            raise StoreError(
                f"{s.location.describe()} has no per-row tensor {unknown[0]!r} "
                f"(it has: {', '.join(s.row_tensors)})"
            )
        kept = [t for t in s.row_tensors if t in set(tensors)]
        if kept:
            spec["subset"] = kept
    csplit = class_splits(s)
    classes = [c for c in s.classes if csplit[c] in keep_splits]
    rows = [
        RowSource(s, i, rec)
        for i, rec in enumerate(_records(s))
        if rec["split"] in keep_splits and (rec["status"] == "ok" or not ok_only)
    ]
    if not rows:
        raise StoreError(f"{s.location.describe()}: no rows match (splits {sorted(keep_splits)})")
    index = [s.classes.index(c) for c in classes]
    texts = {}
    for name in s.text_names:
        array, templates = s.text(name)
        texts[name] = (array[index], templates)
    weights = {
        name: s.location.read_file(weights_file(name)) for name in s.attrs.get("weights", {})
    }
    dest = _write_store(
        Path(out),
        spec=spec,
        classes=classes,
        rows=rows,
        first=s,
        texts=texts,
        weights=weights,
        extra_attrs=_extra_attrs(s),
        progress=progress,
    )
    return _report(out, dest, classes)


# ---------------------------------------------------------------------- merge
@dataclass
class Conflict:
    video_id: str
    tensor: str
    cosine: float


def min_cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Smallest cosine between matching feature vectors (last axis) of two copies of a row."""
    a = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    b = np.asarray(y, dtype=np.float32).reshape(-1, y.shape[-1])
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a * b).sum(axis=1) / np.maximum(na * nb, 1e-30)
    cos[both_zero] = 1.0
    return float(cos.min()) if cos.size else 1.0


def _compare(
    a: FeatureStore, b: FeatureStore, pairs: list[tuple[int, int, str]], names: Sequence[str]
) -> list[Conflict]:
    """Both-ok overlapping rows whose checksums differ: compare their values."""
    conflicts: list[Conflict] = []
    step = _batch_rows(a, names)
    for start in range(0, len(pairs), step):
        batch = pairs[start : start + step]
        da = a.read([p[0] for p in batch], names, verify=True)
        db = b.read([p[1] for p in batch], names, verify=True)
        for i, (_, _, vid) in enumerate(batch):
            for n in names:
                c = min_cosine(da[n][i], db[n][i])
                if c < COSINE_SAME:
                    conflicts.append(Conflict(vid, n, c))
                    break
    return conflicts


def _merge_texts(
    stores: Sequence[FeatureStore], classes: list[str], notes: list[str]
) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Text arrays rebuilt class by class, from the first store (in preference order) that has it."""
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    names = sorted({n for s in stores for n in s.text_names})
    for name in names:
        have = [(s, *s.text(name)) for s in stores if name in s.text_names]
        templates = have[0][2]
        if any(t != templates for _, _, t in have):
            raise SpecMismatchError(f"{text_name(name)} uses different templates in the two stores")
        rows: list[np.ndarray] = []
        for c in classes:
            row = next((arr[s.classes.index(c)] for s, arr, _ in have if c in s.classes), None)
            if row is None:
                break
            rows.append(row)
        if len(rows) != len(classes):
            notes.append(f"{text_name(name)} dropped: it does not cover every merged class")
            continue
        out[name] = (np.stack(rows).astype(np.float32), templates)
    return out


def merge(
    a_path: str | Path,
    b_path: str | Path,
    out: str | Path,
    *,
    prefer: Literal["A", "B"] | None = None,
    cache: str | Path | None = None,
    progress: bool = False,
) -> ShareReport:
    """Combine two stores of the same spec into `out` (de-duplicated by video_id).

    An ok copy wins over a failed one, a failed over a pending one. Two ok copies that differ beyond
    fp16 rounding (min cosine < 0.999) are refused unless `prefer` names the store to take them from.
    """
    if prefer not in (None, "A", "B"):
        raise StoreError(f"--prefer must be A or B, not {prefer!r}")
    a, b = open_store(a_path, cache=cache), open_store(b_path, cache=cache)
    where_a, where_b = a.location.describe(), b.location.describe()
    diffs = spec_differences(a.spec, b.spec)
    if diffs:
        raise SpecMismatchError(
            f"cannot merge {where_a} and {where_b}: specs differ in " + "; ".join(diffs)
        )
    if a.row_tensors != b.row_tensors:
        raise SpecMismatchError(
            f"cannot merge: {where_a} holds {a.row_tensors}, {where_b} holds {b.row_tensors} "
            "(fsar-store subset both to the same --tensors first)"
        )
    if a.dataset != b.dataset:
        raise SpecMismatchError(
            f"cannot merge: {where_a} is dataset {a.dataset!r}, {where_b} is {b.dataset!r}"
        )
    _check_extras(a)
    _check_extras(b)
    classes = union_classes(a, b)
    rec_a, rec_b = _records(a), _records(b)
    by_vid: dict[str, RowSource] = {r["video_id"]: RowSource(a, i, r) for i, r in enumerate(rec_a)}
    order = [r["video_id"] for r in rec_a]
    first, second = (b, a) if prefer == "B" else (a, b)
    to_compare: list[tuple[int, int, str]] = []
    duplicates = 0
    for j, rb in enumerate(rec_b):
        vid = rb["video_id"]
        if vid not in by_vid:
            by_vid[vid] = RowSource(b, j, rb)
            order.append(vid)
            continue
        duplicates += 1
        ra = by_vid[vid].record
        for key in ("class_name", "split"):
            if ra[key] != rb[key]:
                raise SpecMismatchError(
                    f"video {vid} has {key} {ra[key]!r} in {where_a} and {rb[key]!r} in {where_b}"
                )
        rank_a, rank_b = _STATUS_RANK[ra["status"]], _STATUS_RANK[rb["status"]]
        if rank_b > rank_a:
            by_vid[vid] = RowSource(b, j, rb)
        elif rank_a == rank_b:
            if ra["status"] == "ok" and any(
                ra[checksum_column(n)] != rb[checksum_column(n)] for n in a.row_tensors
            ):
                to_compare.append((by_vid[vid].row, j, vid))
            if first is b:
                by_vid[vid] = RowSource(b, j, rb)
    conflicts = _compare(a, b, to_compare, a.row_tensors) if to_compare else []
    if conflicts and prefer is None:
        c = conflicts[0]
        raise StoreError(
            f"{len(conflicts)} video(s) differ between {where_a} and {where_b} beyond fp16 rounding "
            f"(e.g. {c.video_id} {c.tensor}: cosine {c.cosine:.4f}); choose with --prefer A or --prefer B"
        )
    notes = [f"{len(conflicts)} differing video(s) taken from {prefer}"] if conflicts else []
    weights: dict[str, bytes] = {}
    for name in sorted(set(a.attrs.get("weights", {})) | set(b.attrs.get("weights", {}))):
        da, db = a.attrs.get("weights", {}).get(name), b.attrs.get("weights", {}).get(name)
        if da and db and da != db and prefer is None:
            raise StoreError(
                f"{weights_file(name)} differs between {where_a} and {where_b}; choose with --prefer A|B"
            )
        source = first if name in first.attrs.get("weights", {}) else second
        weights[name] = source.location.read_file(weights_file(name))
    texts = _merge_texts([first, second], classes, notes)
    rank = {c: i for i, c in enumerate(classes)}
    pos = {vid: i for i, vid in enumerate(order)}
    rows = sorted(
        by_vid.values(),
        key=lambda r: (
            _split_rank(r.record["split"]),
            rank[r.record["class_name"]],
            pos[r.record["video_id"]],
        ),
    )
    extra = _extra_attrs(second) | _extra_attrs(first)
    dest = _write_store(
        Path(out),
        spec=_base_spec(first),
        classes=classes,
        rows=rows,
        first=first,
        texts=texts,
        weights=weights,
        extra_attrs=extra,
        progress=progress,
    )
    return _report(out, dest, classes, duplicates=duplicates, notes=notes)


def describe_report(report: ShareReport, verb: str) -> str:
    """One summary line for the CLI."""
    line = (
        f"{verb}: {report.out} ({report.rows} rows, {report.ok} ok, {report.classes} classes, "
        f"tensors {', '.join(report.tensors)})"
    )
    if report.duplicates:
        line += f"; {report.duplicates} overlapping video(s) de-duplicated"
    return line
