"""`FeatureStore`: create, open, write, read, select, verify and describe a store.

The driver creates the store (all rows `pending`, arrays pre-sized, chunk = one video) and is the only
writer of the manifest and root attributes. Workers write their own rows' chunks through `ChunkWriter`.
A row becomes `ok` only when the driver commits it after its chunks are written.

Reads check every row against its manifest checksum by default, except for a directory store written
on this machine at its current path (`written_here`); `verify=` or env `FSAR_VERIFY_READS=0|1` decide
otherwise. A chunk that is missing is always an error, never zeros.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import zarr
import zarr.codecs
import zarr.storage

from .errors import (
    CorruptStoreError,
    NotAStoreError,
    RemoteStoreError,
    SchemaVersionError,
    StoreError,
    UnsafeStoreError,
)
from .layout import (
    ALLOWED_DTYPES,
    CHECKSUM_ALGORITHM,
    LASTBLOCK_NAME,
    LOCK_FILE,
    MANIFEST_FILE,
    MAX_ROWS,
    SCHEMA_VERSION,
    SPEC_IDENTITY_FIELDS,
    TEXT_DEFAULT,
    TSFSAR_INIT_FILE,
    TSFSAR_INIT_NAME,
    check_tsfsar_init,
    checksum_column,
    cls_source,
    manifest_columns,
    row_bytes,
    row_tensors,
    schema_version_for,
    spec_field,
    text_name,
    weights_file,
)
from .location import HINT, DirLocation, Location, one_line, resolve, safe_member
from .lock import StoreLock
from .manifest import manifest_to_bytes, new_manifest, read_manifest
from .safety import check_array, check_spec
from .weights_format import weights_from_bytes, weights_to_bytes

DEFAULT_CODEC: dict[str, Any] = {"name": "zstd", "level": 3}
VERIFY_ENV = "FSAR_VERIFY_READS"
WRITE_CONFIG = {"write_empty_chunks": True}  # a row of zeros is still a chunk: missing means lost
MAX_TEMPLATES = 10_000


def checksum(array: np.ndarray) -> str:
    """Checksum of an array's uncompressed bytes (C order)."""
    data = np.ascontiguousarray(array)
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()


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


def _now() -> pd.Timestamp:
    return pd.Timestamp(datetime.now(timezone.utc))


def _open_group(location: Location, mode: Literal["r", "r+"]) -> zarr.Group:
    try:
        return zarr.open_group(location.zarr_store, mode=mode, zarr_format=3)
    except StoreError:
        raise
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError) as exc:
        raise NotAStoreError(f"not a store: {location.describe()} {HINT}") from exc
    except Exception as exc:  # metadata zarr cannot parse (wrong types, unknown fields)
        raise CorruptStoreError(
            f"{location.describe()}: zarr.json is damaged ({one_line(exc)})"
        ) from exc


def written_here(location: Location, attrs: Mapping[str, Any]) -> bool:
    """True for a directory store that this machine created at the path it has now."""
    mark = attrs.get("written_on")
    return (
        location.local is not None
        and isinstance(mark, Mapping)
        and mark.get("host") == socket.gethostname()
        and mark.get("path") == os.path.realpath(location.local)
    )


def verify_by_default(location: Location, attrs: Mapping[str, Any]) -> bool:
    """Whether reads check row checksums: env FSAR_VERIFY_READS (0/1), else unless written here."""
    env = os.environ.get(VERIFY_ENV, "").strip().lower()
    if env in ("0", "off", "no", "false"):
        return False
    if env in ("1", "on", "yes", "true"):
        return True
    return not written_here(location, attrs)


def _validate_attrs(attrs: Mapping[str, Any], where: str) -> None:
    version = attrs.get("schema_version")
    if not isinstance(version, int) or "spec" not in attrs:
        raise NotAStoreError(f"not a store: {where} {HINT}")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} has store schema {version}, this fsar reads up to {SCHEMA_VERSION}: upgrade fsar"
        )
    spec = attrs["spec"]
    if not isinstance(spec, Mapping) or not isinstance(attrs.get("classes"), list):
        raise CorruptStoreError(f"{where}: root attributes spec/classes are malformed")
    if not isinstance(attrs.get("tensors"), list) or not all(
        isinstance(t, str) for t in attrs["tensors"]
    ):
        raise CorruptStoreError(f"{where}: root attribute tensors is malformed")
    for name in attrs["tensors"]:
        if name.startswith("/") or ".." in name.split("/"):
            raise CorruptStoreError(f"{where}: tensor name {name!r} leaves the store")
    classes = attrs["classes"]
    if not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise CorruptStoreError(f"{where}: root attribute classes is malformed")
    text = attrs.get("text", {})
    if not isinstance(text, Mapping) or not all(
        isinstance(v, Mapping)
        and isinstance(v.get("checksum"), str)
        and isinstance(v.get("templates"), list)
        and 0 < len(v["templates"]) <= MAX_TEMPLATES
        and all(isinstance(t, str) for t in v["templates"])
        for v in text.values()
    ):
        raise CorruptStoreError(f"{where}: root attribute text is malformed")
    weights = attrs.get("weights", {})
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weights.items()
    ):
        raise CorruptStoreError(f"{where}: root attribute weights is malformed")


class FeatureStore:
    """An open store. Use `create_store` / `open_store` rather than the constructor."""

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
        _validate_attrs(attrs, location.describe())
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
        return f"FeatureStore({self.location.describe()!r}, rows={self.n_rows}, mode={self.mode!r})"

    def __enter__(self) -> FeatureStore:
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
        manifest = read_manifest(data, self.location.describe(), self.row_tensors)
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

    def array(self, name: str) -> zarr.Array:
        if name not in self.attrs["tensors"]:
            raise StoreError(
                f"{self.location.describe()} has no tensor {name!r} (it has: {', '.join(self.tensors)})"
            )
        if name not in self._arrays:
            try:
                self._arrays[name] = zarr.open_array(
                    self.location.zarr_store, path=name, mode="r" if self.mode == "r" else "r+"
                )
            except StoreError:
                raise
            except Exception as exc:  # absent, or metadata zarr cannot parse
                raise CorruptStoreError(
                    f"{self.location.describe()}: array {name} is missing or unreadable "
                    f"({one_line(exc)})"
                ) from exc
            check_array(self._arrays[name], name, self.location.describe())
            self.location.limits.register(name, self._arrays[name])
        return self._arrays[name]

    def _check_arrays(self) -> None:
        """Shapes and dtypes must match the spec: refuse absurd or executable metadata early."""
        n = len(self.manifest)
        if n > MAX_ROWS:
            raise CorruptStoreError(f"{self.location.describe()}: {n} rows is beyond any dataset")
        for entry in self.spec["tensors"]:
            arr = self.array(entry["name"])
            want = (n, *entry["shape_per_row"])
            dtype = str(arr.dtype)
            if dtype not in ALLOWED_DTYPES:
                raise CorruptStoreError(
                    f"{self.location.describe()}: {entry['name']} has dtype {dtype}, expected float16/float32"
                )
            if tuple(arr.shape) != want or tuple(arr.chunks) != (1, *entry["shape_per_row"]):
                raise CorruptStoreError(
                    f"{self.location.describe()}: {entry['name']} has shape {arr.shape} chunks "
                    f"{arr.chunks}, the spec says {want} with one row per chunk"
                )

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
            if verify and name in self.row_tensors and view is not None:
                data = self._read_view_verified(arr, name, uniq, view)
            else:
                data = self._read_unique(arr, name, uniq, view)
                if verify and name in self.row_tensors:
                    self._verify_rows(name, uniq, data)
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
        self, arr: zarr.Array, name: str, uniq: np.ndarray, view: int
    ) -> np.ndarray:
        per_row = int(np.prod(arr.chunks[1:], dtype=object)) * arr.dtype.itemsize
        step = max(1, (64 << 20) // max(1, per_row))  # whole rows, at most ~64 MB at a time
        parts = []
        for start in range(0, len(uniq), step):
            part = uniq[start : start + step]
            whole = self._read_unique(arr, name, part, None)
            self._verify_rows(name, part, whole)
            parts.append(np.ascontiguousarray(whole[:, view]))
        if not parts:
            return np.empty((0, *arr.shape[2:]), dtype=arr.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _verify_rows(self, name: str, uniq: np.ndarray, data: np.ndarray) -> None:
        sums = self.manifest[checksum_column(name)].to_numpy()
        status = self.manifest["status"].to_numpy()
        for pos, r in enumerate(uniq):
            want = sums[int(r)]
            problem = None
            if status[int(r)] != "ok" or not isinstance(want, str):
                problem = f"has no recorded checksum (status {status[int(r)]})"
            elif checksum(data[pos]) != want:
                problem = "fails its checksum"
            if problem is not None:
                vid = self.manifest["video_id"].iat[int(r)]
                raise CorruptStoreError(
                    f"{self.location.describe()}: row {int(r)} ({vid}) {name} {problem}; "
                    "run fsar-store verify"
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
        arr = self.array(text_name(name))
        want = (len(self.classes), len(templates), int(self.spec["dim"]))
        if tuple(arr.shape) != want or tuple(arr.chunks) != want:
            raise CorruptStoreError(
                f"{self.location.describe()}: {text_name(name)} has shape {arr.shape} chunks {arr.chunks}, "
                f"expected {want} (classes, templates, dim) in one chunk"
            )
        try:
            data = np.asarray(arr[...])
        except (RemoteStoreError, UnsafeStoreError, CorruptStoreError):
            raise
        except Exception as exc:
            raise CorruptStoreError(
                f"{self.location.describe()}: {text_name(name)} is unreadable ({one_line(exc)})"
            ) from exc
        if (self.verify_reads if verify is None else verify) and checksum(data) != meta[name][
            "checksum"
        ]:
            raise CorruptStoreError(
                f"{self.location.describe()}: {text_name(name)} fails its checksum; run fsar-store verify"
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
        """Weights and config of the last ViT block (recipe `emp+last`), parsed without pickle."""
        return self.read_weights(LASTBLOCK_NAME, ": extract with --recipe emp+last")

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

    # ------------------------------------------------------------------ writing (driver)
    def _require_writer(self) -> None:
        if self.mode != "a":
            raise StoreError(f"{self.location.describe()} is open read-only")

    def commit(self, updates: Sequence[Mapping[str, Any]]) -> None:
        """Apply manifest updates (each names its `row`) and rewrite the manifest atomically."""
        self._require_writer()
        allowed = set(manifest_columns(self.row_tensors)) - {"video_id", "row"}
        m = self.manifest
        for upd in updates:
            r = int(upd["row"])
            if upd.get("status") == "ok":
                missing = [t for t in self.row_tensors if not upd.get(checksum_column(t))]
                if missing:
                    raise ValueError(f"row {r} committed ok without checksums for {missing}")
            for key, value in upd.items():
                if key == "row":
                    continue
                if key not in allowed:
                    raise ValueError(f"unknown manifest column {key!r}")
                if key == "frame_indices" and value is not None:
                    value = [list(map(int, v)) for v in value]
                if key == "extracted_at" and value is not None:
                    value = pd.Timestamp(value)
                m.at[r, key] = value
        self._writer().write_file(MANIFEST_FILE, manifest_to_bytes(m, self.row_tensors))

    def _writer(self) -> DirLocation:
        if not isinstance(self.location, DirLocation):
            raise StoreError(
                f"{self.location.describe()} is not a local directory: it cannot be written"
            )
        return self.location

    def _set_attrs(self, **updates: Any) -> None:
        self._group.attrs.update(updates)
        self.attrs.update(updates)

    def write_text(self, name: str, embeddings: np.ndarray, templates: Sequence[str]) -> None:
        """Add or replace `text/<name>`: (C, M, D) embeddings of every class under M templates."""
        self._require_writer()
        emb = np.asarray(embeddings, dtype=np.float32)
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
        self._set_attrs(text=text, tensors=tensors)

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
        self._set_attrs(weights=weights)

    # ------------------------------------------------------------------ integrity
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


# ---------------------------------------------------------------------- factories
def create_store(
    path: str | Path,
    spec: Mapping[str, Any],
    classes: Sequence[str],
    videos: pd.DataFrame,
    *,
    dataset: str,
    split_source: str,
    written_here: bool = True,
) -> FeatureStore:
    """Create a store with every row `pending` and arrays pre-sized; returns it open for writing.

    `videos` needs columns `video_id`, `relpath`, `class_name`, `split` (optionally `status`/`error`
    for rows known to have failed already, e.g. `missing`). `written_here` records this machine and
    path in the root attributes, so that reads here skip checksums (merge and subset pass False:
    their rows come from elsewhere).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file, not a store directory: choose another path")
    if path.exists() and any(path.iterdir()):
        raise StoreError(
            f"{path} exists and is not empty: open it to resume, or choose another path"
        )
    if len(videos) == 0:
        raise StoreError("no videos to store")
    spec = dict(spec)
    spec.setdefault("dtype", "float16")
    spec.setdefault("codec", dict(DEFAULT_CODEC))
    spec["checksum"] = CHECKSUM_ALGORITHM
    spec["tensors"] = row_tensors(spec)
    path.mkdir(parents=True, exist_ok=True)
    location = resolve(path, mode="w")
    lock = StoreLock(path / LOCK_FILE)
    lock.acquire()
    try:
        group = zarr.open_group(
            location.zarr_store, mode="a", zarr_format=3
        )  # dir held only the lock
        n = len(videos)
        compressors = make_compressors(spec["codec"])
        for entry in spec["tensors"]:
            shape = tuple(entry["shape_per_row"])
            group.create_array(
                entry["name"],
                shape=(n, *shape),
                chunks=(1, *shape),
                dtype=entry["dtype"],
                fill_value=0,
                compressors=compressors,
                dimension_names=_dimension_names(entry["name"]),
            )
        names = [t["name"] for t in spec["tensors"]]
        manifest = new_manifest(videos, classes, names)
        assert isinstance(location, DirLocation)
        location.write_file(MANIFEST_FILE, manifest_to_bytes(manifest, names))
        mark = {"host": socket.gethostname(), "path": os.path.realpath(path)}
        group.attrs.update(
            {
                **({"written_on": mark} if written_here else {}),
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
        return FeatureStore(location, group, "a", lock)
    except BaseException:
        lock.release()
        raise


def _dimension_names(name: str) -> list[str]:
    if cls_source(name) is not None:
        return ["video", "view", "frame", "channel"]
    return ["video", "view", "frame", "token", "channel"]


def open_store(
    path: str | Path,
    mode: Literal["r", "a"] = "r",
    *,
    cache: str | Path | None = None,
    verify: bool | None = None,
) -> FeatureStore:
    """Open read-only (`r`, any number of readers) or as the single writer (`a`, takes the lock).

    `path` is a directory, a packed file (`fsar-store pack`) or a URL (http(s)://, s3://, gs://);
    `cache` (default: env `FSAR_CACHE`) keeps a remote store's fetched chunks on local disk.
    `verify` sets `verify_reads` (default: see `verify_by_default`).
    """
    if mode not in ("r", "a"):
        raise ValueError("mode must be 'r' or 'a'")
    location = resolve(path, mode=mode, cache=cache)
    lock = None
    if mode == "a":
        if location.local is None:
            raise StoreError(f"{location.describe()} is not a local directory: it opens read-only")
        lock = StoreLock(location.local / LOCK_FILE)
        lock.acquire()
    try:
        group = _open_group(location, "r" if mode == "r" else "r+")
        return FeatureStore(location, group, mode, lock, verify)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


class ChunkWriter:
    """A worker's handle: writes its own rows' chunks, never the manifest, takes no lock."""

    def __init__(self, path: str | Path) -> None:
        self.location = resolve(path, mode="a")
        group = _open_group(self.location, "r+")
        attrs = dict(group.attrs)
        _validate_attrs(attrs, self.location.describe())
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
        their `tokens/` arrays when not given. Returns the manifest checksum columns written.
        """
        data = dict(tensors)
        for name in self._entries:
            source = cls_source(name)
            if source is not None and name not in data and source in data:
                data[name] = np.asarray(data[source])[..., 0, :]
        missing = set(self._entries) - set(data)
        if missing:
            raise ValueError(f"row {row}: missing tensors {sorted(missing)}")
        sums = {}
        for name, value in data.items():
            entry = self._entries.get(name)
            if entry is None:
                raise ValueError(f"the store has no per-row tensor {name!r}")
            value = np.ascontiguousarray(value, dtype=entry["dtype"])
            if list(value.shape) != entry["shape_per_row"]:
                raise ValueError(
                    f"{name}: shape {value.shape}, the spec says {entry['shape_per_row']}"
                )
            self._arrays[name][row] = value
            sums[checksum_column(name)] = checksum(value)
        return sums


def done_update(row: int, sums: Mapping[str, str], **fields: Any) -> dict[str, Any]:
    """A manifest update marking a row `ok` (after its chunks are written)."""
    return {"row": row, "status": "ok", "error": None, "extracted_at": _now(), **sums, **fields}
