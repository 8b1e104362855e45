"""A packed store: one zip file of stored (uncompressed) members, read in place and never unpacked.

Members that could leave a directory, links and compressed members are refused before anything is
read; member sizes are checked against what their key can hold before a member is read.
"""

from __future__ import annotations

import stat
import zipfile
from collections.abc import Sequence
from pathlib import Path

import zarr.storage
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from ..errors import CorruptStoreError, NotAStoreError, UnsafeStoreError
from ..safety import MAX_FILE_BYTES, ChunkLimits
from ._common import HINT, Location, one_line, safe_member

# What zipfile raises for a damaged archive (headers, offsets, CRCs, sizes, odd flags), and
# with reads from disk as well.
ZIP_FORMAT_DAMAGE = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    ValueError,
    NotImplementedError,
)
ZIP_DAMAGE = (*ZIP_FORMAT_DAMAGE, OSError)


def check_zip_members(zf: zipfile.ZipFile, where: str) -> None:
    """Refuse members that would land outside a directory when unpacked, names that are not plain
    (`./x`, `a//b`: two members could name one file), links, compressed members (a few MB could
    inflate to gigabytes) and a name used both as a file and as a directory."""
    seen: set[str] = set()
    files: set[str] = set()
    dirs: set[str] = set()
    for info in zf.infolist():
        name = info.filename
        if not safe_member(name.rstrip("/") or name):
            raise UnsafeStoreError(f"{where}: member {name!r} would land outside the store")
        if any(part in ("", ".") for part in name.rstrip("/").split("/")):
            raise UnsafeStoreError(
                f"{where}: member {name!r} is not a plain relative path (fsar-store pack writes "
                "names like tokens/layer04/zarr.json)"
            )
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeStoreError(f"{where}: member {name!r} is a symbolic link; refusing it")
        if name in seen:
            raise UnsafeStoreError(f"{where}: member {name!r} appears twice")
        seen.add(name)
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise UnsafeStoreError(
                f"{where}: member {name!r} is compressed; packed stores hold stored (uncompressed) "
                "members only (fsar-store pack writes them)"
            )
        parts = name.rstrip("/").split("/")
        (dirs if info.is_dir() else files).add("/".join(parts))
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    clash = sorted(files & dirs)
    if clash:
        raise UnsafeStoreError(f"{where}: member {clash[0]!r} is both a file and a directory")


class SafeZipStore(zarr.storage.ZipStore):
    """A read-only ZipStore bounded by `ChunkLimits`: sizes are checked before a member is read."""

    limits: ChunkLimits

    def _get(
        self,
        key: str,
        prototype: BufferPrototype,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        try:
            if not self._is_open:
                self._sync_open()
            try:
                info = self._zf.getinfo(key)
            except KeyError:
                info = None
            if info is not None and byte_range is None:
                self.limits.too_large(key, info.file_size)
            data = super()._get(key, prototype, byte_range)
        except ZIP_DAMAGE as exc:
            raise CorruptStoreError(
                f"{self.limits.where}: member {key} is damaged ({one_line(exc)})"
            ) from exc
        if byte_range is None:
            self.limits.check(key, None if data is None else data.to_bytes())
        return data


class ZipLocation(Location):
    kind = "zip"

    def __init__(self, uri: str, path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as zf:
                check_zip_members(zf, uri)
                names = set(zf.namelist())
        except ZIP_DAMAGE as exc:
            raise NotAStoreError(f"not a store: {uri} (damaged zip: {one_line(exc)})") from exc
        if "zarr.json" not in names:
            raise NotAStoreError(f"not a store: {uri} {HINT}")
        self.path = path
        limits = ChunkLimits(uri)
        store = SafeZipStore(path, mode="r")
        store.limits = limits
        super().__init__(uri, store, None, False, limits)

    def read_file(self, rel: str) -> bytes:
        with zipfile.ZipFile(self.path) as zf:
            try:
                info = zf.getinfo(rel)
                if info.file_size > MAX_FILE_BYTES:
                    raise CorruptStoreError(f"{self.uri}: member {rel} is too large")
                return zf.read(info)
            except KeyError:
                raise FileNotFoundError(rel) from None
            except ZIP_DAMAGE as exc:
                raise CorruptStoreError(
                    f"{self.uri}: member {rel} is damaged ({one_line(exc)})"
                ) from exc

    def sizes(self, row_tensors: Sequence[str]) -> tuple[int | None, int | None]:
        prefixes = tuple(f"{name}/c/" for name in row_tensors)
        with zipfile.ZipFile(self.path) as zf:
            chunks = sum(i.compress_size for i in zf.infolist() if i.filename.startswith(prefixes))
        return chunks, self.path.stat().st_size
