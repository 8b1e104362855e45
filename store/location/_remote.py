"""A store at a URL (http(s)://, s3://, gs://) through fsspec: bounded retries and reads, no listing.

A missing chunk is an error, never zeros; chunks may be cached on disk (`cache=`, `FSAR_CACHE`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from ..errors import (
    CorruptStoreError,
    MissingChunkError,
    NotAStoreError,
    RemoteStoreError,
    StoreError,
)
from ..safety import MAX_FILE_BYTES, ChunkLimits
from ._common import Location, one_line, safe_member

CACHE_ENV = "FSAR_CACHE"
RETRIES_ENV = "FSAR_REMOTE_RETRIES"
TIMEOUT_ENV = "FSAR_REMOTE_TIMEOUT"
DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT_S = 30.0
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def redact(url: str) -> str:
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
        self.shown = redact(self.url)
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
