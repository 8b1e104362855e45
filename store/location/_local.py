"""A store in a local directory: zarr's LocalStore held inside its folder, files written atomically.

Reads never follow a link out of the directory, never return more bytes than a key can hold, and a
missing chunk is an error; writes go through a temp file and a rename, never through a link.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import zarr.storage
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from ..errors import CorruptStoreError, DiskFullError, UnsafeStoreError
from ..safety import MAX_FILE_BYTES, ChunkLimits
from ._common import Location, inside, safe_member


class SafeLocalStore(zarr.storage.LocalStore):
    """A LocalStore that refuses keys whose real path (after links) leaves the store directory,
    reads no file larger than its key can hold, and never reads a missing chunk as zeros."""

    limits: ChunkLimits

    def _check(self, key: str) -> None:
        if not safe_member(key) or not inside(self._root_real, self.root / key):
            raise UnsafeStoreError(
                f"{self.root}: {key} is a link (or path) leading outside the store; refusing it"
            )

    @property
    def _root_real(self) -> str:
        return os.path.realpath(self.root)

    def with_read_only(self, read_only: bool = False) -> SafeLocalStore:
        store = super().with_read_only(read_only)
        store.limits = self.limits
        return store

    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        self._check(key)
        try:
            size = os.stat(self.root / key).st_size
        except (FileNotFoundError, NotADirectoryError):
            size = None
        if size is not None and byte_range is None:
            self.limits.too_large(key, size)
        data = await super().get(key, prototype, byte_range)
        if byte_range is None:
            self.limits.check(key, None if data is None else data.to_bytes())
        return data

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def set(self, key: str, value: Buffer) -> None:
        self._check(key)
        await super().set(key, value)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        self._check(key)
        await super().set_if_not_exists(key, value)

    async def delete(self, key: str) -> None:
        self._check(key)
        await super().delete(key)

    async def delete_dir(self, prefix: str) -> None:
        self._check(prefix)
        await super().delete_dir(prefix)


class DirLocation(Location):
    kind = "dir"

    def read_file(self, rel: str) -> bytes:
        assert self.local is not None
        path = self.local / rel
        if not safe_member(rel) or not inside(os.path.realpath(self.local), path):
            raise UnsafeStoreError(
                f"{self.uri}: {rel} is a link (or path) leading outside the store; refusing it"
            )
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            raise CorruptStoreError(f"{self.uri}: {rel} is larger than {MAX_FILE_BYTES} bytes")
        try:
            return path.read_bytes()
        except IsADirectoryError:
            raise CorruptStoreError(f"{self.uri}: {rel} is a directory, not a file") from None

    def write_file(self, rel: str, data: bytes) -> None:
        """Replace a plain file atomically (temp file, fsync, rename); never through a link.

        A folder on the way that is a link leading outside the store is refused, the temp file is
        created exclusively without following links, and the rename replaces a link at `rel` itself.
        """
        assert self.local is not None
        root_real = os.path.realpath(self.local)
        path = self.local / rel
        if not safe_member(rel):
            raise UnsafeStoreError(f"{self.uri}: {rel} would be written outside the store")
        for parent in reversed(path.parents):
            if len(parent.parts) <= len(self.local.parts):
                continue
            if parent.is_symlink() or not inside(root_real, parent):
                raise UnsafeStoreError(
                    f"{self.uri}: {parent.relative_to(self.local)} is a link (or path) leading "
                    "outside the store; refusing to write through it"
                )
            parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)  # a stale temp file (or link) of a dead process with our pid
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(tmp, flags, 0o644)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(
                    f"{self.uri}: no space left on the device while writing {rel}; it keeps "
                    "its previous content (free some space and run it again)"
                ) from None
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass

    def sizes(self, row_tensors: Sequence[str]) -> tuple[int | None, int | None]:
        assert self.local is not None
        chunks = sum(_dir_size(self.local / name / "c") for name in row_tensors)
        return chunks, _dir_size(self.local)


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total
