"""Where a store lives: a local directory, a packed zip file, or a URL (http(s)://, s3://, gs://).

`resolve(uri)` picks the kind. A `Location` gives zarr a store object and gives fsar plain file reads
for the files that are not zarr arrays (the manifest, the last-block weights). Remote stores never list
directories (array names come from the root attribute `tensors`), retry a bounded number of times, and
can keep fetched chunks in a local cache directory (`cache=` or `FSAR_CACHE`); a chunk is cached by
writing a temp file and renaming it, so a partial download is never read back. Every kind reads
through the location's `ChunkLimits`: no read returns more bytes than its key can hold (remote
objects are streamed and cut off), and a chunk of a known array that is absent is an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import stat
import tempfile
import threading
import time
import zipfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import zarr.storage
from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from .errors import (
    CorruptStoreError,
    MissingChunkError,
    NotAStoreError,
    RemoteStoreError,
    StoreError,
    UnsafeStoreError,
)
from .safety import MAX_FILE_BYTES, ChunkLimits

HINT = "(make extract writes stores/<dataset>)"
CACHE_ENV = "FSAR_CACHE"
RETRIES_ENV = "FSAR_REMOTE_RETRIES"
TIMEOUT_ENV = "FSAR_REMOTE_TIMEOUT"
DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT_S = 30.0
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def is_url(text: str) -> bool:
    return bool(_URL.match(text))


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line, for errors built from library exceptions."""
    text = " ".join(str(exc).split()) or "no details"
    return f"{type(exc).__name__}: {text[:300]}"


def safe_member(name: str) -> bool:
    """True when a relative path (zip member, store key) stays inside its root."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return False
    if re.match(r"^[A-Za-z]:", name):  # a Windows drive
        return False
    return all(part not in ("..",) for part in PurePosixPath(name).parts)


def _inside(root_real: str, path: Path) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real + os.sep)


class Location(ABC):
    """Base: a store's address, its zarr store object and its plain-file reader."""

    kind: Literal["dir", "zip", "remote"] = "dir"

    def __init__(
        self,
        uri: str,
        zarr_store: Store,
        local: Path | None,
        writable: bool,
        limits: ChunkLimits,
    ) -> None:
        self.uri = uri
        self.zarr_store = zarr_store
        self.local = local  # the directory, when the store is a local directory
        self.writable = writable
        self.limits = limits  # shared with zarr_store: what each key may hold

    @abstractmethod
    def read_file(self, rel: str) -> bytes:
        """Read a non-array file of the store; FileNotFoundError when it is absent."""

    def describe(self) -> str:
        return self.uri

    def sizes(self, row_tensors: Sequence[str]) -> tuple[int | None, int | None]:
        """(bytes of the per-row tensors' chunks, bytes of the whole store), None where unknown."""
        return None, None


# ---------------------------------------------------------------------- local directory
class SafeLocalStore(zarr.storage.LocalStore):
    """A LocalStore that refuses keys whose real path (after links) leaves the store directory,
    reads no file larger than its key can hold, and never reads a missing chunk as zeros."""

    limits: ChunkLimits

    def _check(self, key: str) -> None:
        if not safe_member(key) or not _inside(self._root_real, self.root / key):
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
        if not safe_member(rel) or not _inside(os.path.realpath(self.local), path):
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
            if parent.is_symlink() or not _inside(root_real, parent):
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
        except BaseException:
            tmp.unlink(missing_ok=True)
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


# ---------------------------------------------------------------------- packed zip file
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
    """Refuse members that would land outside a directory when unpacked, links, compressed members
    (a few MB could inflate to gigabytes) and a name used both as a file and as a directory."""
    seen: set[str] = set()
    files: set[str] = set()
    dirs: set[str] = set()
    for info in zf.infolist():
        name = info.filename
        if not safe_member(name.rstrip("/") or name):
            raise UnsafeStoreError(f"{where}: member {name!r} would land outside the store")
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


# ---------------------------------------------------------------------- remote (fsspec)
def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def _is_chunk_key(key: str) -> bool:
    base = key.rsplit("/", 1)[-1]
    return base != "zarr.json" and not base.startswith(".")


class _TooLarge(Exception):
    """An object grew past its cap while being streamed (not retried)."""


class Fetcher:
    """Whole-object reads from an fsspec filesystem with bounded retries and an optional cache.

    Objects are streamed in blocks and cut off past the bytes their key can hold (`limits`), so a
    server answering one chunk with gigabytes costs at most one chunk's worth of memory.
    """

    block = 1 << 20

    def __init__(
        self,
        url: str,
        *,
        retries: int | None = None,
        timeout: float | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.shown = _redact(self.url)
        self.retries = max(1, int(retries or os.environ.get(RETRIES_ENV) or DEFAULT_RETRIES))
        self.timeout = float(timeout or os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
        self.cache_dir: Path | None = None
        self.limits = ChunkLimits(self.shown)
        self.fs, self.root = self._filesystem()
        self._stream = self.url.split("://", 1)[0].lower() in ("http", "https")

    def _filesystem(self) -> tuple[Any, str]:
        import fsspec

        scheme = self.url.split("://", 1)[0].lower()
        try:
            if scheme in ("http", "https"):
                import aiohttp

                fs = fsspec.filesystem(
                    "http",
                    client_kwargs={"timeout": aiohttp.ClientTimeout(total=self.timeout)},
                    skip_instance_cache=True,
                )
                return fs, self.url
            return fsspec.core.url_to_fs(self.url)
        except ImportError as exc:
            extra = _EXTRAS.get(scheme)
            hint = f": pip install 'fsar[{extra}]'" if extra else ""
            raise StoreError(
                f"reading {scheme}:// stores needs an optional library ({one_line(exc)}){hint}"
            ) from exc
        except ValueError as exc:  # unknown protocol
            raise StoreError(f"cannot read {self.shown}: {one_line(exc)}") from exc

    def key_url(self, key: str) -> str:
        return f"{self.shown}/{key}"

    def _cache_path(self, key: str) -> Path | None:
        if self.cache_dir is None or not safe_member(key):
            return None
        return self.cache_dir / key

    def fetch(self, key: str, *, missing_ok: bool, plain: bool = False) -> bytes | None:
        """The object's bytes; None (missing_ok) or FileNotFoundError/MissingChunkError on 404.

        Chunks (array keys other than metadata) are cached; `plain` files (manifest, weights) are not.
        """
        chunk = not plain and _is_chunk_key(key)
        cap = MAX_FILE_BYTES if plain else self.limits.cap(key)
        cached = self._cache_path(key) if chunk else None
        if cached is not None and cached.is_file() and cached.stat().st_size <= cap:
            return cached.read_bytes()
        path = f"{self.root.rstrip('/')}/{key}"
        last: BaseException | None = None
        for attempt in range(self.retries):
            try:
                data = self._read_capped(path, cap)
                break
            except _TooLarge:
                raise CorruptStoreError(
                    f"{self.key_url(key)} is larger than its key can hold ({cap} bytes); refusing it"
                ) from None
            except FileNotFoundError:
                if missing_ok:
                    return None
                if chunk:
                    raise MissingChunkError(
                        f"chunk missing on the server: {self.key_url(key)} (not found)"
                    ) from None
                raise
            except Exception as exc:  # connection refused, timeout, 5xx, truncated body
                last = exc
                if attempt + 1 < self.retries:
                    time.sleep(min(2.0, 0.2 * 2**attempt))
        else:
            assert last is not None
            raise RemoteStoreError(
                f"cannot read {self.key_url(key)} after {self.retries} tries ({one_line(last)})"
            ) from last
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=f".{cached.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, cached)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return data

    def _read_capped(self, path: str, cap: int) -> bytes:
        """The object's bytes, streamed; `_TooLarge` as soon as they pass `cap`."""
        if self._stream:
            from fsspec.asyn import sync

            return sync(self.fs.loop, self._http_capped, path, cap)
        parts: list[bytes] = []
        total = 0
        with self.fs.open(path, "rb") as fh:
            while block := fh.read(min(self.block, cap + 1 - total)):
                parts.append(bytes(block))
                total += len(block)
                if total > cap:
                    raise _TooLarge
        return b"".join(parts)

    async def _http_capped(self, url: str, cap: int) -> bytes:
        session = await self.fs.set_session()
        async with session.get(self.fs.encode_url(url)) as response:
            if response.status == 404:
                raise FileNotFoundError(url)
            response.raise_for_status()
            if int(response.headers.get("Content-Length") or 0) > cap:
                raise _TooLarge
            parts: list[bytes] = []
            total = 0
            async for block in response.content.iter_chunked(self.block):
                parts.append(block)
                total += len(block)
                if total > cap:
                    raise _TooLarge
        return b"".join(parts)


def _slice(data: bytes, byte_range: ByteRequest | None) -> bytes:
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return data[max(0, len(data) - byte_range.suffix) :]
    raise TypeError(f"unexpected byte range {byte_range!r}")


class RemoteStore(Store):
    """Read-only zarr store over a `Fetcher`; never lists (names come from root attributes)."""

    supports_writes = False
    supports_deletes = False
    supports_listing = False

    def __init__(self, fetcher: Fetcher) -> None:
        super().__init__(read_only=True)
        self.fetcher = fetcher
        self._lock = threading.Lock()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteStore) and other.fetcher.url == self.fetcher.url

    def __str__(self) -> str:
        return self.fetcher.shown

    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        prototype = prototype or default_buffer_prototype()
        data = await asyncio.to_thread(self.fetcher.fetch, key, missing_ok=not _is_chunk_key(key))
        self.fetcher.limits.check(key, data)
        if data is None:
            return None
        return prototype.buffer.from_bytes(_slice(data, byte_range))

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        return [await self.get(k, prototype, r) for k, r in key_ranges]

    async def exists(self, key: str) -> bool:
        try:
            data = await asyncio.to_thread(self.fetcher.fetch, key, missing_ok=True)
        except MissingChunkError:
            return False
        return data is not None

    async def set(self, key: str, value: Buffer) -> None:
        raise StoreError(f"{self.fetcher.shown} is a remote store: it is read-only")

    async def delete(self, key: str) -> None:
        raise StoreError(f"{self.fetcher.shown} is a remote store: it is read-only")

    async def list(self) -> AsyncIterator[str]:
        raise StoreError("remote stores are not listed: array names come from root attributes")
        yield ""  # pragma: no cover

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        raise StoreError("remote stores are not listed: array names come from root attributes")
        yield ""  # pragma: no cover

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        raise StoreError("remote stores are not listed: array names come from root attributes")
        yield ""  # pragma: no cover


class RemoteLocation(Location):
    kind = "remote"

    def __init__(self, url: str, cache: str | Path | None) -> None:
        fetcher = Fetcher(url)
        try:
            root = fetcher.fetch("zarr.json", missing_ok=False, plain=True)
        except FileNotFoundError:
            raise NotAStoreError(f"not a store: {fetcher.shown} (no zarr.json there)") from None
        try:
            created = json.loads(root or b"{}").get("attributes", {}).get("created_at", "")
        except ValueError:
            raise NotAStoreError(f"not a store: {fetcher.shown} (zarr.json is not JSON)") from None
        if cache:
            # One cache folder per store instance: a store re-created at the same URL starts afresh.
            tag = hashlib.sha256(f"{fetcher.url}\n{created}".encode()).hexdigest()[:16]
            fetcher.cache_dir = Path(cache).expanduser() / tag
            fetcher.cache_dir.mkdir(parents=True, exist_ok=True)
            (fetcher.cache_dir / "SOURCE").write_text(fetcher.shown + "\n")
        self.fetcher = fetcher
        super().__init__(fetcher.shown, RemoteStore(fetcher), None, False, fetcher.limits)

    def read_file(self, rel: str) -> bytes:
        data = self.fetcher.fetch(rel, missing_ok=True, plain=True)
        if data is None:
            raise FileNotFoundError(rel)
        return data


# ---------------------------------------------------------------------- resolve
def resolve(
    uri: str | Path,
    mode: Literal["r", "a", "w"] = "r",
    *,
    cache: str | Path | None = None,
) -> Location:
    """Turn a user-given path, packed file or URL into a Location (foundation error texts)."""
    text = str(uri)
    if is_url(text):
        if text.lower().startswith("file://"):
            text = urlsplit(text).path
        else:
            if mode != "r":
                raise StoreError(f"{_redact(text)} is a remote store: it opens read-only")
            return RemoteLocation(text, cache if cache is not None else os.environ.get(CACHE_ENV))
    path = Path(text)
    if mode != "w":
        if not path.exists():
            raise NotAStoreError(f"store not found: {text} {HINT}")
        if path.is_file() and zipfile.is_zipfile(path):
            if mode != "r":
                raise StoreError(
                    f"{text} is a packed store: it opens read-only (fsar-store unpack it to write)"
                )
            return ZipLocation(text, path)
        if not path.is_dir() or not (path / "zarr.json").is_file():
            raise NotAStoreError(f"not a store: {text} {HINT}")
    store = SafeLocalStore(path, read_only=(mode == "r"))
    store.limits = ChunkLimits(text)
    return DirLocation(text, store, path, mode != "r", store.limits)
