"""Bounds that keep a store received from someone else inert: sizes are checked before anything is read.

`check_spec` bounds every size the spec declares; `ChunkLimits` bounds every read (a chunk larger than
its array's chunk could be, or whose compressed header declares another size, is refused before it is
read whole or decompressed). Array documents themselves are checked by `store.form`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import CorruptStoreError, MissingChunkError, UnsafeStoreError
from .layout import ALLOWED_DTYPES, row_tensors

MAX_CHUNK_BYTES = 1 << 30  # one video's tensor is a few MB; 1 GiB is beyond any real store
MAX_METADATA_BYTES = 16 << 20  # a zarr.json (root attributes list classes and templates)
MAX_FILE_BYTES = 1 << 30  # manifest, last-block weights
# What a spec may declare (open_clip's largest ViTs are well inside): checked before anything is built.
SPEC_BOUNDS = {
    "frames": 512,
    "views": 64,
    "tokens": 4096,
    "dim": 4096,
    "width": 8192,
    "image_size": 4096,
}
MAX_LAYERS = 128
_ZSTD_MAGIC = 0xFD2FB528


def _zstd_content_size(data: bytes) -> int | None:
    """Uncompressed size a zstd frame declares in its header (None when it declares none)."""
    if len(data) < 6 or struct.unpack_from("<I", data)[0] != _ZSTD_MAGIC:
        return None
    descriptor = data[4]
    fcs_flag, single = descriptor >> 6, (descriptor >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(data) < pos + size:
        return None
    value = int.from_bytes(data[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def _blosc_size(data: bytes) -> int | None:
    if len(data) < 16:
        return None
    nbytes, _block, cbytes = struct.unpack_from("<III", data, 4)
    return nbytes if cbytes == len(data) else None


class ChunkLimits:
    """What each array's chunks may hold, learned when its metadata is checked; bounds every read.

    A location's stores call `cap(key)` before reading a key (bytes they may read at most) and
    `check(key, data)` after: a chunk whose compressed header declares another size than its array's
    chunk shape is refused before zarr decompresses it, and a chunk of a known array that is absent
    is an error (zarr would silently read it as zeros).
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self._arrays: dict[str, tuple[int, str]] = {}  # array path -> (raw chunk bytes, codec)

    def register(self, name: str, chunk_bytes: int, codec: str) -> None:
        """Array `name` (checked by `store.form`) has chunks of `chunk_bytes` under `codec`."""
        self._arrays[name] = (chunk_bytes, codec)

    def _array_of(self, key: str) -> str | None:
        """The registered array whose chunk `key` is (any key under its folder but its zarr.json),
        whatever the chunk key encoding."""
        if key.endswith("zarr.json"):
            return None
        head = key
        while "/" in head:
            head = head.rsplit("/", 1)[0]
            if head in self._arrays:
                return head
        return None

    def cap(self, key: str) -> int:
        """Most bytes a read of `key` may return (compression never grows data by more than this)."""
        if key == "zarr.json" or key.endswith("/zarr.json"):
            return MAX_METADATA_BYTES
        name = self._array_of(key)
        if name is None:
            return MAX_CHUNK_BYTES
        raw, _ = self._arrays[name]
        return raw + raw // 64 + 4096

    def too_large(self, key: str, size: int) -> None:
        if size > self.cap(key):
            raise CorruptStoreError(
                f"{self.where}: {key} holds {size} bytes, more than its array's chunks can "
                f"({self.cap(key)}); refusing it"
            )

    def check(self, key: str, data: bytes | None) -> None:
        """Refuse a missing chunk of a known array, or one whose header declares another size."""
        name = self._array_of(key)
        if name is None:
            if data is not None:
                self.too_large(key, len(data))
            return
        if data is None:
            raise MissingChunkError(f"{self.where}: chunk {key} is missing")
        self.too_large(key, len(data))
        raw, codec = self._arrays[name]
        declared = {"none": len(data), "zstd": None, "blosc": None}[codec]
        if codec == "zstd":
            declared = _zstd_content_size(data)
        elif codec == "blosc":
            declared = _blosc_size(data)
        if declared is None:
            raise CorruptStoreError(
                f"{self.where}: chunk {key} is not a {codec} frame (an error page, or damaged); "
                "refusing to decompress it"
            )
        if declared != raw:
            raise CorruptStoreError(
                f"{self.where}: chunk {key} declares {declared} uncompressed bytes, its array's "
                f"chunks hold {raw}; refusing to decompress it"
            )


def check_spec(spec: Mapping[str, Any], where: str) -> None:
    """The spec's `tensors` must be what its fields imply, with per-row sizes a store can hold, and
    every size it declares inside `SPEC_BOUNDS`."""
    try:
        implied = {t["name"]: t for t in row_tensors(spec)}
        listed = {t["name"]: t for t in spec["tensors"]}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptStoreError(f"{where}: root attribute spec is malformed ({exc!r})") from exc
    missing = sorted(set(implied) - set(listed))
    if missing:
        raise CorruptStoreError(
            f"{where}: spec does not list tensor {missing[0]!r} its fields imply"
        )
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
    _check_spec_bounds(spec, where)


def _check_spec_bounds(spec: Mapping[str, Any], where: str) -> None:
    for field, most in SPEC_BOUNDS.items():
        value = spec.get(field)
        if type(value) is not int or not 1 <= value <= most:
            raise CorruptStoreError(
                f"{where}: spec {field}={value!r} is outside 1..{most}; refusing absurd sizes"
            )
    layers = spec.get("layers")
    if (
        not isinstance(layers, list)
        or len(layers) > MAX_LAYERS  # empty for recipes without emp
        or any(type(k) is not int or not 1 <= k <= MAX_LAYERS for k in layers)
        or len(set(layers)) != len(layers)
    ):
        raise CorruptStoreError(f"{where}: spec layers={layers!r} is not a list of distinct layers")
