"""Where a store lives: a local directory, a packed zip file, or a URL (http(s)://, s3://, gs://).

`resolve(uri)` picks the kind. A `Location` gives zarr a store object and gives fsar plain file reads
for the files that are not zarr arrays (the manifest, the last-block weights). Remote stores never list
directories (array names come from the root attribute `tensors`), retry a bounded number of times, and
can keep fetched chunks in a local cache directory (`cache=` or `FSAR_CACHE`); a chunk is cached by
writing a temp file and renaming it, so a partial download is never read back.
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

    def __init__(self, uri: str, zarr_store: Store, local: Path | None, writable: bool) -> None:
        self.uri = uri
        self.zarr_store = zarr_store
        self.local = local  # the directory, when the store is a local directory
        self.writable = writable

    @abstractmethod
    def read_file(self, rel: str) -> bytes:
        """Read a non-array file of the store; FileNotFoundError when it is absent."""

    def has_file(self, rel: str) -> bool:
        try:
            self.read_file(rel)
        except FileNotFoundError:
            return False
        return True

    def describe(self) -> str:
        return self.uri

    def sizes(self, row_tensors: Sequence[str]) -> tuple[int | None, int | None]:
        """(bytes of the per-row tensors' chunks, bytes of the whole store), None where unknown."""
        return None, None


# ---------------------------------------------------------------------- local directory
class SafeLocalStore(zarr.storage.LocalStore):
    """A LocalStore that refuses keys whose real path (after links) leaves the store directory."""

    def _check(self, key: str) -> None:
        if not safe_member(key) or not _inside(self._root_real, self.root / key):
            raise UnsafeStoreError(
                f"{self.root}: {key} is a link (or path) leading outside the store; refusing it"
            )

    @property
    def _root_real(self) -> str:
        return os.path.realpath(self.root)

    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        self._check(key)
        return await super().get(key, prototype, byte_range)

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            self._check(key)
        return await super().get_partial_values(prototype, key_ranges)

    async def set(self, key: str, value: Buffer) -> None:
        self._check(key)
        await super().set(key, value)


class DirLocation(Location):
    kind = "dir"

    def read_file(self, rel: str) -> bytes:
        assert self.local is not None
        path = self.local / rel
        if not safe_member(rel) or not _inside(os.path.realpath(self.local), path):
            raise UnsafeStoreError(
                f"{self.uri}: {rel} is a link (or path) leading outside the store; refusing it"
            )
        return path.read_bytes()

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
def check_zip_members(zf: zipfile.ZipFile, where: str) -> None:
    """Refuse members that would land outside a directory when unpacked, and links."""
    seen: set[str] = set()
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


class ZipLocation(Location):
    kind = "zip"

    def __init__(self, uri: str, path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as zf:
                check_zip_members(zf, uri)
                names = set(zf.namelist())
        except zipfile.BadZipFile as exc:
            raise NotAStoreError(f"not a store: {uri} (damaged zip: {one_line(exc)})") from exc
        if "zarr.json" not in names:
            raise NotAStoreError(f"not a store: {uri} {HINT}")
        self.path = path
        super().__init__(uri, zarr.storage.ZipStore(path, mode="r"), None, False)

    def read_file(self, rel: str) -> bytes:
        with zipfile.ZipFile(self.path) as zf:
            try:
                return zf.read(rel)
            except KeyError:
                raise FileNotFoundError(rel) from None
            except zipfile.BadZipFile as exc:
                raise CorruptStoreError(f"{self.uri}: member {rel} is damaged ({exc})") from exc

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


class Fetcher:
    """Whole-object reads from an fsspec filesystem with bounded retries and an optional cache."""

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
        self.fs, self.root = self._filesystem()

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
        cached = self._cache_path(key) if chunk else None
        if cached is not None and cached.is_file():
            return cached.read_bytes()
        path = f"{self.root.rstrip('/')}/{key}"
        last: BaseException | None = None
        for attempt in range(self.retries):
            try:
                data = bytes(self.fs.cat_file(path))
                break
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
        super().__init__(fetcher.shown, RemoteStore(fetcher), None, False)

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
    return DirLocation(uri=text, zarr_store=store, local=path, writable=mode != "r")
