"""Checks that keep a store received from someone else inert: metadata is data, never code.

Every array is checked before any of its chunks is decoded: numeric dtype only (no object/string
dtypes), codecs from a fixed allow-list (no `numcodecs.pickle` or other pickling filters), and chunk
sizes a real store can have. The spec's tensor list must follow from its own fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import zarr

from .errors import CorruptStoreError, UnsafeStoreError
from .layout import ALLOWED_DTYPES, row_tensors

# Codecs that only move or (de)compress bytes of numeric data.
ALLOWED_CODECS = frozenset(
    {"bytes", "zstd", "blosc", "gzip", "crc32c", "transpose", "sharding_indexed"}
)
MAX_CHUNK_BYTES = 1 << 30  # one video's tensor is a few MB; 1 GiB is beyond any real store
MAX_NDIM = 8


def _codec_names(codecs: Iterable[Any]) -> list[str]:
    names: list[str] = []
    for codec in codecs:
        if isinstance(codec, Mapping):
            names.append(str(codec.get("name")))
            config = codec.get("configuration") or {}
            if isinstance(config, Mapping):
                names += _codec_names(config.get("codecs", []))
                names += _codec_names(config.get("index_codecs", []))
        else:
            names.append(repr(codec))
    return names


def check_array(arr: zarr.Array, name: str, where: str) -> None:
    """Refuse an array whose metadata could run code or allocate absurd memory."""
    meta = arr.metadata.to_dict()
    if meta.get("zarr_format") != 3:
        raise UnsafeStoreError(f"{where}: {name} is not a zarr v3 array; refusing it")
    dtype = str(arr.dtype)
    if dtype not in ALLOWED_DTYPES:
        raise UnsafeStoreError(
            f"{where}: {name} has dtype {dtype}, only float16/float32 are allowed (no object arrays)"
        )
    bad = [c for c in _codec_names(meta.get("codecs", [])) if c not in ALLOWED_CODECS]
    if bad:
        raise UnsafeStoreError(
            f"{where}: {name} uses codec {bad[0]}, not one of {', '.join(sorted(ALLOWED_CODECS))}"
        )
    if arr.ndim > MAX_NDIM or any(int(s) < 0 for s in arr.shape):
        raise CorruptStoreError(f"{where}: {name} has an impossible shape {arr.shape}")
    chunk_bytes = int(np.prod(arr.chunks, dtype=object)) * np.dtype(dtype).itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise CorruptStoreError(
            f"{where}: {name} has chunks of {chunk_bytes} bytes ({arr.chunks}); refusing absurd shapes"
        )


def check_spec(spec: Mapping[str, Any], where: str) -> None:
    """The spec's `tensors` must be what its fields imply, with per-row sizes a store can hold."""
    try:
        implied = {t["name"]: t for t in row_tensors(spec)}
        listed = {t["name"]: t for t in spec["tensors"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptStoreError(f"{where}: root attribute spec is malformed ({exc!r})") from exc
    for name, entry in listed.items():
        want = implied.get(name)
        if want is None:
            raise CorruptStoreError(f"{where}: spec lists tensor {name!r} its fields do not imply")
        if (
            list(entry.get("shape_per_row", [])) != want["shape_per_row"]
            or entry.get("dtype") != want["dtype"]
        ):
            raise CorruptStoreError(
                f"{where}: spec says {name} is {entry.get('dtype')} {entry.get('shape_per_row')}, "
                f"its fields imply {want['dtype']} {want['shape_per_row']}"
            )
        shape = want["shape_per_row"]
        if want["dtype"] not in ALLOWED_DTYPES:
            raise UnsafeStoreError(f"{where}: spec dtype {want['dtype']!r} is not float16/float32")
        if not all(isinstance(s, int) and s > 0 for s in shape):
            raise CorruptStoreError(f"{where}: {name} has an impossible shape {shape}")
        nbytes = int(np.prod(shape, dtype=object)) * np.dtype(want["dtype"]).itemsize
        if nbytes > MAX_CHUNK_BYTES:
            raise CorruptStoreError(
                f"{where}: {name} would be {nbytes} bytes per video ({shape}); refusing absurd shapes"
            )
