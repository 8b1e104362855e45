"""Reading an open store: root attributes, manifest, arrays, rows by index, texts, last block.

Reads check every row against its manifest checksum unless `verify_reads` is off (see `store.root`);
a chunk that is missing is always an error, never zeros.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import zarr

from .errors import CorruptStoreError, RemoteStoreError, StoreError, UnsafeStoreError
from .form import ArrayForm, check_array_document, parse_json, row_forms, text_form
from .layout import (
    LASTBLOCK_FILE,
    LASTBLOCK_NAME,
    MANIFEST_FILE,
    MAX_ROWS,
    TEXT_DEFAULT,
    TSFSAR_INIT_FILE,
    TSFSAR_INIT_NAME,
    check_tsfsar_init,
    checksum_column,
    dimension_names,
    text_name,
    weights_file,
)
from .location import Location, one_line
from .lock import StoreLock
from .manifest import read_manifest
from .root import validate_attrs, verify_by_default
from .safety import check_spec
from .weights_format import check_lastblock, weights_from_bytes


def checksum(array: np.ndarray) -> str:
    """Checksum of an array's uncompressed bytes (C order)."""
    data = np.ascontiguousarray(array)
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()


_Store = TypeVar("_Store", bound="StoreReader")


class StoreReader:
    """An open store's reading side: attributes, manifest, arrays, rows, texts, last block."""

    def __init__(
        self,
        location: Location,
        group: zarr.Group,
        mode: str,
        lock: StoreLock | None,
        verify: bool | None = None,
    ) -> None:
        self.location = location
        self.mode = mode
        self._group = group
        self._lock = lock
        self._arrays: dict[str, zarr.Array] = {}
        attrs = dict(group.attrs)
        validate_attrs(attrs, location.describe())
        self.attrs: dict[str, Any] = attrs
        self.spec: dict[str, Any] = attrs["spec"]
        check_spec(self.spec, location.describe())
        self.classes: list[str] = list(attrs["classes"])
        self.row_tensors: list[str] = [t["name"] for t in self.spec["tensors"]]
        # Check row checksums on every read (stores received from elsewhere), see `written_here`.
        self.verify_reads: bool = verify_by_default(location, attrs) if verify is None else verify
        self.manifest: pd.DataFrame = self._load_manifest()
        self._check_arrays()

    # ------------------------------------------------------------------ basics
    @property
    def tensors(self) -> list[str]:
        """Every array path in the store (per-row arrays, then text arrays)."""
        return list(self.attrs["tensors"])

    @property
    def n_rows(self) -> int:
        return len(self.manifest)

    @property
    def dataset(self) -> str:
        return str(self.attrs.get("dataset", ""))

    @property
    def text_names(self) -> list[str]:
        return list(self.attrs.get("text", {}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location.describe()!r}, rows={self.n_rows}, mode={self.mode!r})"

    def __enter__(self: _Store) -> _Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _load_manifest(self) -> pd.DataFrame:
        try:
            data = self.location.read_file(MANIFEST_FILE)
        except FileNotFoundError:
            raise CorruptStoreError(
                f"{self.location.describe()} has no {MANIFEST_FILE}; the store is incomplete"
            ) from None
        manifest = read_manifest(
            data,
            self.location.describe(),
            self.row_tensors,
            indices_per_row=int(self.spec["views"]) * int(self.spec["frames"]),
        )
        labels = manifest["label"].to_numpy()
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise CorruptStoreError(
                f"manifest of {self.location.describe()}: a label is outside 0..{len(self.classes) - 1}"
            )
        named = np.asarray(self.classes, dtype=object)[labels] if len(labels) else labels
        if len(labels) and not (named == manifest["class_name"].to_numpy()).all():
            raise CorruptStoreError(
                f"manifest of {self.location.describe()}: labels and class names disagree"
            )
        return manifest

    def array_forms(self) -> dict[str, ArrayForm]:
        """What fsar writes for every array this store's spec and texts imply."""
        forms = row_forms(
            self.spec["tensors"], self.n_rows, self.spec.get("codec", {}), dimension_names
        )
        out = {f.name: f for f in forms}
        for name, meta in self.attrs.get("text", {}).items():
            path = text_name(name)
            out[path] = text_form(path, len(self.classes), len(meta["templates"]), self.spec["dim"])
        return out

    def array(self, name: str) -> zarr.Array:
        """The array `name`, opened once its document is exactly what fsar writes for it."""
        form = self.array_forms().get(name)
        if form is None or name not in self.attrs["tensors"]:
            raise StoreError(
                f"{self.location.describe()} has no tensor {name!r} (it has: {', '.join(self.tensors)})"
            )
        if name not in self._arrays:
            self._arrays[name] = self._open_array(form)
        return self._arrays[name]

    def _open_array(self, form: ArrayForm) -> zarr.Array:
        where, name = self.location.describe(), form.name
        data = self.location.read_metadata(f"{name}/zarr.json")
        if data is None:
            raise CorruptStoreError(f"{where}: array {name} is missing (no {name}/zarr.json)")
        codec = check_array_document(parse_json(data, f"{where}: {name}/zarr.json"), form, where)
        try:
            arr = zarr.open_array(
                self.location.zarr_store,
                path=name,
                mode="r" if self.mode == "r" else "r+",
                zarr_format=3,
            )
        except StoreError:
            raise
        except Exception as exc:  # changed since it was checked, or metadata zarr cannot parse
            raise CorruptStoreError(
                f"{where}: array {name} is unreadable ({one_line(exc)})"
            ) from exc
        parsed = json.loads(json.dumps(arr.metadata.to_dict(), default=str))
        check_array_document(parsed, form, where)  # what zarr parsed, in case the file changed
        self.location.limits.register(name, form.chunk_bytes, codec)
        return arr

    def _check_arrays(self) -> None:
        """Every array the root attributes list must be one the spec and texts imply, in the form
        fsar writes: refuse absurd or executable metadata before anything is read."""
        n = len(self.manifest)
        if n > MAX_ROWS:
            raise CorruptStoreError(f"{self.location.describe()}: {n} rows is beyond any dataset")
        forms = self.array_forms()
        listed = set(self.tensors)
        for name in sorted(listed ^ set(forms)):
            why = (
                f"lists {name!r}, which neither its spec nor its texts imply"
                if name in listed
                else f"does not list {name!r}, which its spec or texts imply"
            )
            raise CorruptStoreError(f"{self.location.describe()}: root attribute tensors {why}")
        for name in self.tensors:
            self.array(name)

    # ------------------------------------------------------------------ selection
    def select(
        self,
        split: str | Sequence[str] | None = None,
        status: str | None = "ok",
        classes: Iterable[str] | None = None,
    ) -> np.ndarray:
        """Row indices (ascending) matching the split(s), status and class names."""
        m = self.manifest
        keep = np.ones(len(m), dtype=bool)
        if split is not None:
            splits = [split] if isinstance(split, str) else list(split)
            keep &= m["split"].isin(splits).to_numpy()
        if status is not None:
            keep &= (m["status"] == status).to_numpy()
        if classes is not None:
            keep &= m["class_name"].isin(list(classes)).to_numpy()
        return np.flatnonzero(keep)

    # ------------------------------------------------------------------ reading
    def read(
        self,
        rows: Sequence[int] | np.ndarray,
        names: Sequence[str],
        *,
        view: int | None = None,
        as_torch: bool = False,
        verify: bool | None = None,
    ) -> dict[str, Any]:
        """Read rows (any order, repeats allowed) of the named tensors; touches only their chunks.

        `view` picks one view (the view axis is dropped). `verify` (default: `self.verify_reads`)
        checks each row against its manifest checksum; with `view`, whole rows are read in batches
        (the chunk holds every view anyway), checked, then sliced.
        """
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_rows):
            raise IndexError(f"rows out of range 0..{self.n_rows - 1}")
        verify = self.verify_reads if verify is None else verify
        uniq, inverse = np.unique(idx, return_inverse=True)
        out: dict[str, Any] = {}
        for name in names:
            arr = self.array(name)
            if verify and name in self.row_tensors:
                data = self._read_view_verified(arr, name, uniq, view)
            else:
                data = self._read_unique(arr, name, uniq, view)
                if name in self.row_tensors:
                    self._check_finite(name, uniq, data)
            data = data[inverse] if not (len(uniq) == len(idx) and (uniq == idx).all()) else data
            if as_torch:
                import torch

                data = torch.from_numpy(np.ascontiguousarray(data))
            out[name] = data
        return out

    def _read_unique(
        self, arr: zarr.Array, name: str, uniq: np.ndarray, view: int | None
    ) -> np.ndarray:
        try:
            if len(uniq) and uniq[-1] - uniq[0] + 1 == len(uniq):  # contiguous: plain slice
                sel = slice(int(uniq[0]), int(uniq[-1]) + 1)
                return arr[sel] if view is None else arr[sel, view]
            return arr.oindex[uniq] if view is None else arr.oindex[uniq, view]
        except (RemoteStoreError, UnsafeStoreError):
            raise  # already names the URL or path
        except Exception as exc:  # a damaged chunk: find and name it
            for r in uniq:
                try:
                    arr[int(r)]
                except Exception as row_exc:
                    vid = self.manifest["video_id"].iat[int(r)]
                    raise CorruptStoreError(
                        f"{self.location.describe()}: row {int(r)} ({vid}) {name} is unreadable "
                        f"({one_line(row_exc)}); run fsar-store verify"
                    ) from exc
            raise

    def _read_view_verified(
        self, arr: zarr.Array, name: str, uniq: np.ndarray, view: int | None
    ) -> np.ndarray:
        """Whole rows, checked; with `view`, read in batches of ~64 MB and sliced."""
        if view is None:
            return self._read_verified(arr, name, uniq)
        per_row = int(np.prod(arr.chunks[1:], dtype=object)) * arr.dtype.itemsize
        step = max(1, (64 << 20) // max(1, per_row))  # whole rows, at most ~64 MB at a time
        parts = []
        for start in range(0, len(uniq), step):
            whole = self._read_verified(arr, name, uniq[start : start + step])
            parts.append(np.ascontiguousarray(whole[:, view]))
        if not parts:
            return np.empty((0, *arr.shape[2:]), dtype=arr.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _read_verified(self, arr: zarr.Array, name: str, rows: np.ndarray) -> np.ndarray:
        """Whole rows, each checked against its checksum and for NaN/inf. Rows that fail and whose
        chunks came from a local cache are dropped from it and fetched once more; what fails then
        is an error (and is not kept in the cache)."""
        data = self._read_unique(arr, name, rows, None)
        bad = self._bad_rows(name, rows, data)
        if bad and self.location.forget(_chunk_keys(arr, rows[[pos for pos, _ in bad]])):
            data = self._read_unique(arr, name, rows, None)
            bad = self._bad_rows(name, rows, data)
            self.location.forget(_chunk_keys(arr, rows[[pos for pos, _ in bad]]))
        if bad:
            self._refuse_row(name, int(rows[bad[0][0]]), bad[0][1])
        return data

    def _bad_rows(self, name: str, rows: np.ndarray, data: np.ndarray) -> list[tuple[int, str]]:
        """(position in `rows`, problem) of every row that fails its recorded checksum, has none,
        or holds NaN or inf values."""
        sums = self.manifest[checksum_column(name)].to_numpy()
        status = self.manifest["status"].to_numpy()
        bad = []
        for pos, r in enumerate(rows):
            if status[int(r)] != "ok" or not isinstance(sums[int(r)], str):
                bad.append((pos, f"has no recorded checksum (status {status[int(r)]})"))
            elif checksum(data[pos]) != sums[int(r)]:
                bad.append((pos, "fails its checksum"))
            elif not np.isfinite(data[pos]).all():
                bad.append((pos, "holds NaN or inf values"))
        return bad

    def _check_finite(self, name: str, rows: np.ndarray, data: np.ndarray) -> None:
        """Unverified reads: rows not recorded finite when written (schema 1) are checked here."""
        recorded = self.manifest["finite"].to_numpy(dtype=bool, na_value=False)[rows]
        for pos in np.flatnonzero(~recorded):
            if not np.isfinite(data[pos]).all():
                self._refuse_row(name, int(rows[pos]), "holds NaN or inf values")

    def _refuse_row(self, name: str, row: int, problem: str) -> None:
        vid = self.manifest["video_id"].iat[row]
        raise CorruptStoreError(
            f"{self.location.describe()}: row {row} ({vid}) {name} {problem}; run fsar-store verify"
        )

    def text(
        self, name: str = TEXT_DEFAULT, verify: bool | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """Class text embeddings (C, M, D) float32 and their templates (checked like rows)."""
        meta = self.attrs.get("text", {})
        if name not in meta:
            have = ", ".join(meta) or "none"
            raise StoreError(
                f"{self.location.describe()} has no {text_name(name)} (it has: {have})"
            )
        templates = list(meta[name]["templates"])
        arr = self.array(text_name(name))  # its form was checked: (classes, templates, dim)
        try:
            data = np.asarray(arr[...])
        except (RemoteStoreError, UnsafeStoreError, CorruptStoreError):
            raise
        except Exception as exc:
            raise CorruptStoreError(
                f"{self.location.describe()}: {text_name(name)} is unreadable ({one_line(exc)})"
            ) from exc
        problem = None
        if (self.verify_reads if verify is None else verify) and checksum(data) != meta[name][
            "checksum"
        ]:
            problem = "fails its checksum"
        elif not np.isfinite(data).all():
            problem = "holds NaN or inf values"
        if problem:
            raise CorruptStoreError(
                f"{self.location.describe()}: {text_name(name)} {problem}; run fsar-store verify"
            )
        return data, templates

    def read_weights(
        self, name: str, hint: str = ""
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Tensors and config of `weights/<name>` (safetensors), checked against its recorded
        sha256 and parsed without pickle; `hint` says how to get a missing file."""
        path = weights_file(name)
        want = self.attrs.get("weights", {}).get(name)
        try:
            data = self.location.read_file(path) if want is not None else None
        except FileNotFoundError:
            data = None
        if data is None:
            raise StoreError(f"{self.location.describe()} has no {path}{hint}")
        if hashlib.sha256(data).hexdigest() != want:
            raise CorruptStoreError(f"{self.location.describe()}: {path} fails its checksum")
        try:
            return weights_from_bytes(data)
        except ValueError as exc:
            raise CorruptStoreError(
                f"{self.location.describe()}: {path} is not a valid safetensors file"
            ) from exc

    def read_lastblock(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Weights and config of the last ViT block (recipe `emp+last`), parsed without pickle,
        refused unless they are the spec's block with every tensor its config implies."""
        tensors, config = self.read_weights(LASTBLOCK_NAME, ": extract with --recipe emp+last")
        try:
            check_lastblock(tensors, config, self.spec)
        except ValueError as exc:
            raise CorruptStoreError(
                f"{self.location.describe()}: {LASTBLOCK_FILE}: {exc}"
            ) from None
        return tensors, config

    def read_tsfsar_init(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """TS-FSAR's side-network init (recipes with `ts`): tensors of `tsfsar_init_shapes` and
        the config they were computed with."""
        tensors, config = self.read_weights(TSFSAR_INIT_NAME, ": extract with a recipe with ts")
        try:
            check_tsfsar_init(tensors, config)
        except ValueError as exc:
            raise CorruptStoreError(
                f"{self.location.describe()}: {TSFSAR_INIT_FILE}: {exc}"
            ) from None
        return tensors, config


def _chunk_keys(arr: zarr.Array, rows: np.ndarray) -> list[str]:
    """Store keys of the chunks holding `rows` (one chunk per row)."""
    rest = (0,) * (arr.ndim - 1)
    return [f"{arr.path}/{arr.metadata.encode_chunk_key((int(r), *rest))}" for r in rows]
