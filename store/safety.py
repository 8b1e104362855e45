"""Checks that keep a store received from someone else inert: metadata is data, never code.

Every array is checked before any of its chunks is decoded: numeric dtype only (no object/string
dtypes), the codec chains fsar writes (bytes, then zstd, blosc or nothing: no pickling filters, no
codec whose output size is unknown), and chunk sizes a real store can have. `ChunkLimits` then bounds
every read: a chunk larger than its array's chunk could be, or whose compressed header declares another
size, is refused before it is read whole or decompressed. The spec's tensor list must follow from its
own fields.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import zarr

from .errors import CorruptStoreError, MissingChunkError, UnsafeStoreError
from .layout import ALLOWED_DTYPES, row_tensors

# Codec chains fsar writes: numeric bytes, then zstd, blosc or nothing. Both compressors record the
# uncompressed size in their header, so a chunk's size is known before it is decompressed.
ALLOWED_CODECS = frozenset({"bytes", "zstd", "blosc"})
CODEC_CHAINS = {("bytes",): "none", ("bytes", "zstd"): "zstd", ("bytes", "blosc"): "blosc"}
MAX_CHUNK_BYTES = 1 << 30  # one video's tensor is a few MB; 1 GiB is beyond any real store
MAX_METADATA_BYTES = 16 << 20  # a zarr.json (root attributes list classes and templates)
MAX_FILE_BYTES = 1 << 30  # manifest, last-block weights
MAX_NDIM = 8
_ZSTD_MAGIC = 0xFD2FB528


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
    names = _codec_names(meta.get("codecs", []))
    bad = [c for c in names if c not in ALLOWED_CODECS]
    if bad:
        raise UnsafeStoreError(
            f"{where}: {name} uses codec {bad[0]}, not one of {', '.join(sorted(ALLOWED_CODECS))}"
        )
    if tuple(names) not in CODEC_CHAINS:
        raise UnsafeStoreError(
            f"{where}: {name} uses codecs {' + '.join(names)}; fsar stores use bytes, then zstd, "
            "blosc or nothing"
        )
    if arr.ndim > MAX_NDIM or any(int(s) < 0 for s in arr.shape):
        raise CorruptStoreError(f"{where}: {name} has an impossible shape {arr.shape}")
    if arr.ndim != len(arr.chunks) or any(int(c) < 1 for c in arr.chunks):
        raise CorruptStoreError(f"{where}: {name} has impossible chunks {arr.chunks}")
    chunk_bytes = int(np.prod(arr.chunks, dtype=object)) * np.dtype(dtype).itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise CorruptStoreError(
            f"{where}: {name} has chunks of {chunk_bytes} bytes ({arr.chunks}); refusing absurd shapes"
        )


def chunk_codec(arr: zarr.Array) -> str:
    """`none`, `zstd` or `blosc`: the compressor of an array that passed `check_array`."""
    return CODEC_CHAINS[tuple(_codec_names(arr.metadata.to_dict().get("codecs", [])))]


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

    def register(self, name: str, arr: zarr.Array) -> None:
        raw = int(np.prod(arr.chunks, dtype=object)) * np.dtype(str(arr.dtype)).itemsize
        self._arrays[name] = (raw, chunk_codec(arr))

    def _array_of(self, key: str) -> str | None:
        head, sep, _ = key.partition("/c/")
        return head if sep and head in self._arrays else None

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
        if declared != raw:
            raise CorruptStoreError(
                f"{self.where}: chunk {key} declares {declared} uncompressed bytes, its array's "
                f"chunks hold {raw}; refusing to decompress it"
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
