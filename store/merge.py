"""New stores from existing ones: `subset` keeps some splits or tensors, `merge` joins two stores.

Both build the new store through `store.derived`, which re-hashes every copied row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .derived import (
    RowSource,
    ShareReport,
    base_spec,
    batch_rows,
    check_extras,
    class_splits,
    extra_attrs,
    records,
    share_report,
    split_rank,
    write_store,
)
from .errors import SpecMismatchError, StoreError
from .featurestore import FeatureStore, open_store
from .layout import checksum_column, spec_differences, text_name, weights_file

COSINE_SAME = 0.999  # below this, two copies of a video are different features, not fp16 rounding
SCALE_SAME = 0.01  # norms further apart than 1% are different features too
_STATUS_RANK = {"ok": 2, "failed": 1, "pending": 0}


# ---------------------------------------------------------------------- class lists
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
    splits = sorted(set(sa.values()) | set(sb.values()), key=split_rank)
    out: list[str] = []
    for split in splits:
        out += _merge_order(
            [c for c in a.classes if sa[c] == split], [c for c in b.classes if sb[c] == split]
        )
    return out


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
    check_extras(s)
    have_splits = sorted(set(s.manifest["split"]), key=split_rank)
    if splits is not None:
        unknown = [x for x in splits if x not in have_splits]
        if unknown:
            raise StoreError(
                f"{s.location.describe()} has no split {unknown[0]!r} (it has: {', '.join(have_splits)})"
            )
    keep_splits = set(have_splits if splits is None else splits)
    spec = base_spec(s)
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
        for i, rec in enumerate(records(s))
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
    dest = write_store(
        Path(out),
        spec=spec,
        classes=classes,
        rows=rows,
        first=s,
        texts=texts,
        weights=weights,
        extra_attrs=extra_attrs(s),
        progress=progress,
    )
    return share_report(out, dest, classes)


# ---------------------------------------------------------------------- merge
@dataclass
class Conflict:
    """Two copies of one thing (a video's tensor, a class's text) that are not the same."""

    what: str  # `video <id>` or `class <name>`
    tensor: str
    reason: str  # `cosine 0.41`, `scale x8.00`, `B's copy holds NaN or inf`

    def __str__(self) -> str:
        return f"{self.what} {self.tensor}: {self.reason}"


def difference(x: np.ndarray, y: np.ndarray) -> str | None:
    """Why copies A (`x`) and B (`y`) of the same features differ beyond fp16 rounding (direction,
    scale or NaN/inf), compared vector by vector on the last axis; None when they do not."""
    a = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    b = np.asarray(y, dtype=np.float32).reshape(-1, y.shape[-1])
    for side, v in (("A", a), ("B", b)):
        if not np.isfinite(v).all():
            return f"{side}'s copy holds NaN or inf"
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a * b).sum(axis=1) / np.maximum(na * nb, 1e-30)
    cos[both_zero] = 1.0
    if cos.size and cos.min() < COSINE_SAME:
        return f"cosine {cos.min():.4f}"
    ratio = np.maximum(na, nb) / np.maximum(np.minimum(na, nb), 1e-30)
    ratio[both_zero] = 1.0
    if ratio.size and ratio.max() > 1 + SCALE_SAME:
        return f"scale x{ratio.max():.2f}"
    return None


def _compare(
    a: FeatureStore, b: FeatureStore, pairs: list[tuple[int, int, str]], names: Sequence[str]
) -> list[Conflict]:
    """Both-ok overlapping rows whose checksums differ: compare their values (read as stored,
    NaN included: a copy the user will not take does not stop the merge)."""
    conflicts: list[Conflict] = []
    step = batch_rows(a, names)
    for start in range(0, len(pairs), step):
        batch = pairs[start : start + step]
        for n in names:
            da = a.array(n).oindex[np.asarray([p[0] for p in batch])]
            db = b.array(n).oindex[np.asarray([p[1] for p in batch])]
            for i, (_, _, vid) in enumerate(batch):
                reason = difference(da[i], db[i])
                if reason and not any(c.what == f"video {vid}" for c in conflicts):
                    conflicts.append(Conflict(f"video {vid}", n, reason))
    return conflicts


def _merge_texts(
    a: FeatureStore, b: FeatureStore, prefer: str | None, classes: list[str], notes: list[str]
) -> tuple[dict[str, tuple[np.ndarray, list[str]]], list[Conflict]]:
    """Text arrays rebuilt class by class from the preferred store (A unless `prefer` is B); a
    class both stores embed differently is a conflict."""
    first, second = (b, a) if prefer == "B" else (a, b)
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    conflicts: list[Conflict] = []
    for name in sorted(set(a.text_names) | set(b.text_names)):
        have = {side: s.text(name) for side, s in (("A", a), ("B", b)) if name in s.text_names}
        templates = next(iter(have.values()))[1]
        if any(t != templates for _, t in have.values()):
            raise SpecMismatchError(f"{text_name(name)} uses different templates in the two stores")
        if len(have) == 2:
            for c in set(a.classes) & set(b.classes):
                reason = difference(
                    have["A"][0][a.classes.index(c)], have["B"][0][b.classes.index(c)]
                )
                if reason:
                    conflicts.append(Conflict(f"class {c!r}", text_name(name), reason))
        rows = [
            next((s.text(name)[0][s.classes.index(c)] for s in (first, second)
                  if name in s.text_names and c in s.classes), None)
            for c in classes
        ]  # fmt: skip
        if any(r is None for r in rows):
            notes.append(f"{text_name(name)} dropped: it does not cover every merged class")
            continue
        out[name] = (np.stack(rows).astype(np.float32), templates)
    return out, conflicts


@dataclass
class _Choice:
    """Which copy of each video the merged store takes, and what still needs a decision."""

    by_vid: dict[str, RowSource]
    order: list[str]  # video ids as first seen (A's rows, then B's new ones)
    to_compare: list[tuple[int, int, str]] = field(default_factory=list)  # (row A, row B, id)
    duplicates: int = 0


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

    An ok copy wins over a failed one, a failed over a pending one. Two ok copies of one video (or
    two embeddings of one class text, or two weights files) that differ beyond fp16 rounding in
    direction, scale or NaN/inf are a conflict: refused unless `prefer` names the store whose
    copies to take. Nothing non-finite is ever copied.
    """
    if prefer not in (None, "A", "B"):
        raise StoreError(f"--prefer must be A or B, not {prefer!r}")
    a, b = open_store(a_path, cache=cache), open_store(b_path, cache=cache)
    _check_mergeable(a, b)
    classes = union_classes(a, b)
    choice = _choose_rows(a, b, prefer)
    notes: list[str] = []
    texts, text_conflicts = _merge_texts(a, b, prefer, classes, notes)
    conflicts = _compare(a, b, choice.to_compare, a.row_tensors) + text_conflicts
    if conflicts and prefer is None:
        raise StoreError(
            f"{len(conflicts)} conflict(s): {a.location.describe()} (A) and "
            f"{b.location.describe()} (B) hold copies that differ beyond fp16 rounding (e.g. "
            f"{conflicts[0]}); take A's copies with --prefer A, or B's with --prefer B"
        )
    if conflicts:
        notes.append(f"{len(conflicts)} conflict(s) resolved with {prefer}'s copies")
    first, second = (b, a) if prefer == "B" else (a, b)
    dest = write_store(
        Path(out),
        spec=base_spec(first),
        classes=classes,
        rows=_in_store_order(choice, classes),
        first=first,
        texts=texts,
        weights=_merge_weights(a, b, prefer),
        extra_attrs=extra_attrs(second) | extra_attrs(first),
        progress=progress,
    )
    return share_report(out, dest, classes, duplicates=choice.duplicates, notes=notes)


def _check_mergeable(a: FeatureStore, b: FeatureStore) -> None:
    """Same spec identity, same per-row tensors, same dataset; texts and weights intact."""
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
    check_extras(a)
    check_extras(b)


def _choose_rows(a: FeatureStore, b: FeatureStore, prefer: str | None) -> _Choice:
    """One copy per video: the better status wins; two ok copies with other checksums are compared."""
    rows_a = records(a)
    choice = _Choice(
        {r["video_id"]: RowSource(a, i, r) for i, r in enumerate(rows_a)},
        [r["video_id"] for r in rows_a],
    )
    for j, rb in enumerate(records(b)):
        vid = rb["video_id"]
        if vid not in choice.by_vid:
            choice.by_vid[vid] = RowSource(b, j, rb)
            choice.order.append(vid)
            continue
        choice.duplicates += 1
        ra = choice.by_vid[vid]
        _check_same_video(a, b, ra.record, rb)
        rank_a, rank_b = _STATUS_RANK[ra.record["status"]], _STATUS_RANK[rb["status"]]
        if rank_a == rank_b and ra.record["status"] == "ok" and _sums_differ(a, ra.record, rb):
            choice.to_compare.append((ra.row, j, vid))
        if rank_b > rank_a or (rank_a == rank_b and prefer == "B"):
            choice.by_vid[vid] = RowSource(b, j, rb)
    return choice


def _check_same_video(
    a: FeatureStore, b: FeatureStore, ra: dict[str, Any], rb: dict[str, Any]
) -> None:
    for key in ("class_name", "split"):
        if ra[key] != rb[key]:
            raise SpecMismatchError(
                f"video {ra['video_id']} has {key} {ra[key]!r} in {a.location.describe()} and "
                f"{rb[key]!r} in {b.location.describe()}"
            )


def _sums_differ(s: FeatureStore, ra: dict[str, Any], rb: dict[str, Any]) -> bool:
    return any(ra[checksum_column(n)] != rb[checksum_column(n)] for n in s.row_tensors)


def _merge_weights(a: FeatureStore, b: FeatureStore, prefer: str | None) -> dict[str, bytes]:
    """Weights files of both stores; one that differs needs `prefer`."""
    first, second = (b, a) if prefer == "B" else (a, b)
    wa, wb = a.attrs.get("weights", {}), b.attrs.get("weights", {})
    out: dict[str, bytes] = {}
    for name in sorted(set(wa) | set(wb)):
        if wa.get(name) and wb.get(name) and wa[name] != wb[name] and prefer is None:
            raise StoreError(
                f"{weights_file(name)} differs between {a.location.describe()} and "
                f"{b.location.describe()}; choose with --prefer A|B"
            )
        source = first if name in first.attrs.get("weights", {}) else second
        out[name] = source.location.read_file(weights_file(name))
    return out


def _in_store_order(choice: _Choice, classes: list[str]) -> list[RowSource]:
    """Rows by split (train, val, test), then class order, then first appearance."""
    rank = {c: i for i, c in enumerate(classes)}
    pos = {vid: i for i, vid in enumerate(choice.order)}
    return sorted(
        choice.by_vid.values(),
        key=lambda r: (
            split_rank(r.record["split"]),
            rank[r.record["class_name"]],
            pos[r.record["video_id"]],
        ),
    )


def describe_report(report: ShareReport, verb: str) -> str:
    """One summary line for the CLI."""
    line = (
        f"{verb}: {report.out} ({report.rows} rows, {report.ok} ok, {report.classes} classes, "
        f"tensors {', '.join(report.tensors)})"
    )
    if report.duplicates:
        line += f"; {report.duplicates} overlapping video(s) de-duplicated"
    return line
