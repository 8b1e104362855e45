"""A store at a URL (http(s)://, s3://, gs://): an fsspec filesystem under a read-only zarr store.

Answers are bounded and retried a bounded number of times, a missing chunk is an error, and chunks may
be cached on disk by fsspec's `simplecache` (`cache=`, `FSAR_CACHE`); a cached body that fails is dropped.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fsspec.asyn import sync
from fsspec.implementations.cached import SimpleCacheFileSystem
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from runtime.values import env_number

from ..errors import (
    CorruptStoreError,
    MissingChunkError,
    NotAStoreError,
    RemoteStoreError,
    StoreError,
)
from ..form import check_root_document, parse_json
from ..safety import MAX_FILE_BYTES, ChunkLimits
from ._common import Location, one_line
from ._http import BoundedHTTPFileSystem, TooLargeError

CACHE_ENV = "FSAR_CACHE"
RETRIES_ENV = "FSAR_REMOTE_RETRIES"
TIMEOUT_ENV = "FSAR_REMOTE_TIMEOUT"
DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT_S = 30.0
EXIT_WAIT_S = 2.0  # reads cancelled at exit get this long to end
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def redact(url: str) -> str:
    """The URL without user name and password."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def _finish_pending_reads() -> None:
    """At exit, cancel the reads still in flight on zarr's event loop and let them end.

    A batch read whose first chunk fails returns its error at once while its other chunks are still
    being fetched (or waiting to retry); zarr's own exit handler then closes its loop with them
    pending, and asyncio logs "Task was destroyed but it is pending!" for each, turning the one-line
    error into many (tests/test_user_errors.py runs it repeatedly). Registered after zarr's handler
    (zarr is imported above), so it runs first."""
    from zarr.core import sync as zarr_sync

    loop = zarr_sync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout=EXIT_WAIT_S)
    except Exception:  # a read that does not end in time: exit anyway (its line may show)
        pass


atexit.register(_finish_pending_reads)


def _is_chunk_key(key: str) -> bool:
    base = key.rsplit("/", 1)[-1]
    return base != "zarr.json" and not base.startswith(".")


def remote_filesystem(url: str, timeout: float) -> tuple[Any, str]:
    """fsspec's filesystem for the URL (on fsspec's own event loop) and the store's root in it."""
    import fsspec

    scheme = url.split("://", 1)[0].lower()
    try:
        if scheme in ("http", "https"):
            import aiohttp

            timeout_kw = {"timeout": aiohttp.ClientTimeout(total=timeout)}
            return BoundedHTTPFileSystem(client_kwargs=timeout_kw), url
        # s3fs would ask each object's size first (a HEAD per chunk) to split large reads
        options = {"max_concurrency": 1} if scheme in ("s3", "s3a") else {}
        return fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
    except ImportError as exc:
        extra = _EXTRAS.get(scheme)
        hint = f": pip install 'fsar[{extra}]'" if extra else ""
        raise StoreError(
            f"reading {scheme}:// stores needs an optional library ({one_line(exc)}){hint}"
        ) from exc
    except ValueError as exc:  # unknown protocol
        raise StoreError(f"cannot read {redact(url)}: {one_line(exc)}") from exc


class RemoteStore(Store):
    """A read-only zarr store over an fsspec filesystem, never listed (names come from root attributes).

    Each read is bounded by `limits.cap(key)`, retried on transport errors, checked by `limits`
    (a missing chunk is an error); chunks go through `cache` when there is one, and a cached body
    that fails a check is dropped and fetched once more. The filesystem runs on fsspec's own loop,
    which also closes its connections when the process ends.
    """

    supports_writes = False
    supports_deletes = False
    supports_listing = False

    def __init__(self, url: str, limits: ChunkLimits) -> None:
        self.url = url.rstrip("/")
        self.shown = redact(self.url)
        self.limits = limits
        self.retries = int(env_number(RETRIES_ENV, DEFAULT_RETRIES, whole=True, low=1, high=10**6))
        timeout = float(env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, whole=False, low=0, high=10**6))
        self.fs, root = remote_filesystem(self.url, timeout)
        self.path = root.rstrip("/")
        self.cache: SimpleCacheFileSystem | None = None
        super().__init__(read_only=True)

    def use_cache(self, folder: Path) -> None:
        """Keep fetched chunks under `folder` (fsspec's simplecache: one file per chunk)."""
        self.cache = SimpleCacheFileSystem(fs=self.fs, cache_storage=str(folder))

    def __str__(self) -> str:
        return self.shown

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteStore) and other.url == self.url

    def key_url(self, key: str) -> str:
        return f"{self.shown}/{key}"

    async def fetch(self, key: str, *, plain: bool = False) -> bytes | None:
        """The object's bytes (None when absent), bounded, retried; chunks through the cache."""
        cached = self.cache is not None and not plain and _is_chunk_key(key)
        data = await self._fetch_once(key, plain, cached)
        if plain:
            return data
        try:
            self._check(key, data)
        except CorruptStoreError:
            if not (cached and data is not None and self.drop_cached([key])):
                raise
            data = await self._fetch_once(key, plain, cached, after_drop=True)
            try:
                self._check(key, data)
            except CorruptStoreError:
                self.drop_cached([key])
                raise
        return data

    def _check(self, key: str, data: bytes | None) -> None:
        if data is None and _is_chunk_key(key):
            raise MissingChunkError(f"chunk missing on the server: {self.key_url(key)} (not found)")
        self.limits.check(key, data)

    async def _fetch_once(
        self, key: str, plain: bool, cached: bool, after_drop: bool = False
    ) -> bytes | None:
        fs = self.cache if cached else self.fs
        cap = MAX_FILE_BYTES if plain else self.limits.cap(key)
        bounded = {"cap": cap} if isinstance(self.fs, BoundedHTTPFileSystem) else {}
        last: BaseException | None = None
        for attempt in range(self.retries):
            try:
                read = fs._cat_file(f"{self.path}/{key}", **bounded)
                data = await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(read, self.fs.loop)
                )
            except FileNotFoundError:
                return None
            except TooLargeError as exc:
                raise CorruptStoreError(
                    f"{self.key_url(key)} is larger than its key can hold ({exc.args[0]} bytes); "
                    "refusing it"
                ) from None
            except Exception as exc:  # connection refused, timeout, 5xx, cut body
                last = exc
                if attempt + 1 < self.retries:
                    await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
                continue
            if len(data) > cap:  # other protocols: the client library read it whole
                raise CorruptStoreError(f"{self.key_url(key)} is larger than its key can hold")
            return data
        assert last is not None
        note = " (its cached copy failed its checks and was dropped)" if after_drop else ""
        raise RemoteStoreError(
            f"cannot read {self.key_url(key)} after {self.retries} tries ({one_line(last)}){note}"
        ) from last

    def drop_cached(self, keys: Iterable[str]) -> bool:
        """Remove cached bodies of `keys`; True when one was there."""
        if self.cache is None:
            return False
        dropped = False
        for key in keys:
            local = Path(self.cache.storage[-1]) / self.cache.hash_name(f"{self.path}/{key}")
            if local.is_file():
                local.unlink(missing_ok=True)
                dropped = True
        return dropped

    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        if (
            byte_range is not None
        ):  # zarr asks for ranges only inside shards, which fsar never writes
            raise StoreError(
                f"{self.key_url(key)}: fsar stores are read chunk by chunk, not in ranges"
            )
        data = await self.fetch(key)
        if data is None:
            return None
        return (prototype or default_buffer_prototype()).buffer.from_bytes(data)

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        return [await self.get(k, prototype, r) for k, r in key_ranges]

    async def exists(self, key: str) -> bool:
        try:
            return await self.fetch(key) is not None
        except MissingChunkError:
            return False

    async def set(self, key: str, value: Buffer, byte_range: Any = None) -> None:
        raise StoreError(f"{self.shown} is a remote store: it is read-only")

    async def delete(self, key: str) -> None:
        raise StoreError(f"{self.shown} is a remote store: it is read-only")

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
        limits = ChunkLimits(redact(url.rstrip("/")))
        store = RemoteStore(url, limits)
        if cache:
            store.use_cache(_cache_folder(Path(cache).expanduser(), store))
        self.remote = store
        super().__init__(store.shown, store, None, False, limits)

    def read_file(self, rel: str) -> bytes:
        data = sync(self.remote.fs.loop, self.remote.fetch, rel, plain=True)
        if data is None:
            raise FileNotFoundError(rel)
        return data

    def forget(self, keys: Iterable[str]) -> bool:
        return self.remote.drop_cached(keys)


def _cache_folder(cache: Path, store: RemoteStore) -> Path:
    """One cache folder per store instance (URL and creation time): a store re-created at the
    same URL starts afresh."""
    root = sync(store.fs.loop, store.fetch, "zarr.json")
    if root is None:
        raise NotAStoreError(f"not a store: {store.shown} (no zarr.json there)")
    what = f"{store.shown}: zarr.json"
    created = check_root_document(parse_json(root, what), store.shown).get("created_at", "")
    tag = hashlib.sha256(f"{store.url}\n{created}".encode()).hexdigest()[:16]
    folder = cache / tag
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "SOURCE").write_text(store.shown + "\n")
    return folder
