"""Checking an open store: rows against their checksums, texts and weights, its fingerprint and info.

`verify` re-hashes what a store holds; `fingerprint` names what it holds; `info` summarises it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .errors import RemoteStoreError, StoreError, UnsafeStoreError
from .layout import (
    LASTBLOCK_NAME,
    SPEC_IDENTITY_FIELDS,
    TSFSAR_INIT_NAME,
    checksum_column,
    row_bytes,
    spec_field,
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
                    got = checksum(arrays[name][r])
                except (RemoteStoreError, UnsafeStoreError):
                    raise
                except Exception as exc:
                    problems.append(Problem(r, vid, name, f"unreadable chunk ({one_line(exc)})"))
                    continue
                if got != want:
                    problems.append(Problem(r, vid, name, "checksum mismatch"))
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
        """Hash of the identity spec, classes and every ok row's checksums (order and codec free)."""
        m = self.manifest
        ok = m[m["status"] == "ok"].sort_values("video_id")
        cols = [checksum_column(t) for t in self.row_tensors]
        h = hashlib.sha256()
        ident = {f: spec_field(self.spec, f) for f in SPEC_IDENTITY_FIELDS}
        h.update(json.dumps(ident, sort_keys=True).encode())
        h.update(json.dumps(self.classes).encode())
        for vid, *sums in ok[["video_id", *cols]].itertuples(index=False):
            h.update(f"{vid}\t{chr(9).join(map(str, sums))}\n".encode())
        for name in sorted(self.attrs.get("text", {})):
            h.update(f"{text_name(name)}:{self.attrs['text'][name]['checksum']}\n".encode())
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
