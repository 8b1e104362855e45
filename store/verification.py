"""Checking an open store: rows against their checksums, texts and weights, its fingerprint and info.

`verify` re-hashes what a store holds; `fingerprint` names what it holds; `info` summarises it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .errors import RemoteStoreError, StoreError, UnsafeStoreError
from .layout import (
    LASTBLOCK_NAME,
    TSFSAR_INIT_NAME,
    checksum_column,
    row_bytes,
    text_name,
    weights_file,
)
from .location import one_line, safe_member
from .reading import StoreReader, checksum


@dataclass(frozen=True)
class Problem:
    """One verification failure."""

    row: int | None
    video_id: str | None
    tensor: str
    reason: str

    def __str__(self) -> str:
        where = f"row {self.row} ({self.video_id})" if self.row is not None else "store"
        return f"{where} {self.tensor}: {self.reason}"


class StoreChecks(StoreReader):
    """Verification, fingerprint and summary of an open store (any location, read-only)."""

    def find_corrupt(
        self,
        rows: Sequence[int] | np.ndarray,
        names: Sequence[str] | None = None,
        progress: bool = False,
    ) -> list[Problem]:
        """Rows x per-row tensors whose chunk is unreadable, missing or fails its checksum.

        For training with `--skip-corrupt`: drop the returned rows and count them. A store that cannot
        be reached at all (server down) raises `RemoteStoreError` instead of reporting every row.
        """
        names = list(self.row_tensors if names is None else names)
        unknown = [n for n in names if n not in self.row_tensors]
        if unknown:
            raise StoreError(f"{self.location.describe()} has no per-row tensor {unknown[0]!r}")
        arrays = {name: self.array(name) for name in names}
        m = self.manifest
        problems: list[Problem] = []
        iterator: Iterable[int] = np.asarray(rows, dtype=np.int64).reshape(-1)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc="verify", unit="video")
        for r in iterator:
            r = int(r)
            vid = str(m["video_id"].iat[r])
            for name in names:
                want = m[checksum_column(name)].iat[r]
                if want is None or pd.isna(want):
                    status = m["status"].iat[r]
                    problems.append(
                        Problem(r, vid, name, f"no checksum recorded (status {status})")
                    )
                    continue
                try:
                    value = arrays[name][r]
                except (RemoteStoreError, UnsafeStoreError):
                    raise
                except Exception as exc:
                    problems.append(Problem(r, vid, name, f"unreadable chunk ({one_line(exc)})"))
                    continue
                if checksum(value) != want:
                    problems.append(Problem(r, vid, name, "checksum mismatch"))
                elif not np.isfinite(value).all():
                    problems.append(Problem(r, vid, name, "holds NaN or inf values"))
        return problems

    def verify(self, rows: Sequence[int] | None = None, progress: bool = False) -> list[Problem]:
        """Re-hash every `ok` row of every per-row tensor, the text arrays and the weights file;
        report video paths that would leave a data root (absolute, `..`)."""
        todo = self.select(status="ok") if rows is None else np.asarray(rows, dtype=np.int64)
        problems = self.find_corrupt(todo, progress=progress)
        m = self.manifest
        for r in todo if rows is not None else range(self.n_rows):
            if not safe_member(str(m["relpath"].iat[int(r)])):
                problems.append(
                    Problem(
                        int(r), str(m["video_id"].iat[int(r)]), "relpath", "leaves the data root"
                    )
                )
        for name in self.attrs.get("text", {}):
            try:
                self.text(name, verify=True)
            except (RemoteStoreError, UnsafeStoreError):
                raise
            except Exception as exc:
                reason = "checksum mismatch" if "checksum" in str(exc) else one_line(exc)
                problems.append(Problem(None, None, text_name(name), reason))
        readers = {LASTBLOCK_NAME: self.read_lastblock, TSFSAR_INIT_NAME: self.read_tsfsar_init}
        for name in self.attrs.get("weights", {}):
            try:
                readers.get(name, lambda n=name: self.read_weights(n))()
            except StoreError as exc:
                problems.append(Problem(None, None, weights_file(name), str(exc)))
        return problems

    def fingerprint(self) -> str:
        """Hash of everything that changes a result: the spec (bar versions, codec and device),
        classes, every row's video id, split, label, class name, status, frame indices and
        checksums, the texts (templates and checksums) and the weights files. Free of row order,
        codec and location."""
        h = hashlib.sha256()
        h.update(json.dumps(_result_spec(self.spec), sort_keys=True).encode())
        h.update(json.dumps(self.classes).encode())
        m = self.manifest.sort_values("video_id")
        sums = [checksum_column(t) for t in self.row_tensors]
        columns = ["video_id", "split", "label", "class_name", "status", "frame_indices", *sums]
        for row in m[columns].itertuples(index=False):
            h.update(json.dumps([_plain(v) for v in row]).encode() + b"\n")
        for name, meta in sorted(self.attrs.get("text", {}).items()):
            h.update(json.dumps([text_name(name), meta["templates"], meta["checksum"]]).encode())
        for name, digest in sorted(self.attrs.get("weights", {}).items()):
            h.update(f"{weights_file(name)}:{digest}\n".encode())
        return h.hexdigest()[:16]

    def info(self) -> dict[str, Any]:
        """Spec, counts per split and status, size on disk and bytes per video."""
        m = self.manifest
        counts = m.groupby(["split", "status"]).size().unstack(fill_value=0).to_dict(orient="index")
        chunk_bytes, total_bytes = self.location.sizes(self.row_tensors)
        n_written = int((m["status"] == "ok").sum())
        per_video = chunk_bytes / n_written if chunk_bytes is not None and n_written else None
        return {
            "location": self.location.describe(),
            "kind": self.location.kind,
            "schema_version": self.attrs["schema_version"],
            "dataset": self.dataset,
            "split_source": self.attrs.get("split_source"),
            "created_at": self.attrs.get("created_at"),
            "spec": self.spec,
            "classes": len(self.classes),
            "rows": self.n_rows,
            "counts": {s: {k: int(v) for k, v in c.items() if v} for s, c in counts.items()},
            "errors": {
                str(k): int(v)
                for k, v in m.loc[m["status"] == "failed", "error"].value_counts().items()
            },
            "text": {k: len(v["templates"]) for k, v in self.attrs.get("text", {}).items()},
            "weights": sorted(self.attrs.get("weights", {})),
            "bytes_on_disk": total_bytes,
            "bytes_per_video": per_video,
            "raw_bytes_per_video": row_bytes(self.spec),
            "fingerprint": self.fingerprint(),
        }


def _result_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec without what cannot change a feature: library versions, codec, device."""
    out = {k: v for k, v in spec.items() if k not in ("versions", "codec")}
    if isinstance(out.get("compute"), Mapping):
        out["compute"] = {k: v for k, v in out["compute"].items() if k != "device"}
    return out


def _plain(value: Any) -> Any:
    """A manifest cell as JSON: missing values as null, arrays as lists of ints."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if value is None or (np.isscalar(value) and pd.isna(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value
