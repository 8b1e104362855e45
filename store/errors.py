"""Errors a user can act on. Each message is one line; the CLI prints it and exits 2."""

from __future__ import annotations

from runtime.errors import FsarError


class StoreError(FsarError):
    """Base class: something about a store the user can fix."""


class NotAStoreError(StoreError):
    """The path exists (or not) but holds no fsar store."""


class SchemaVersionError(StoreError):
    """The store was written by a newer fsar."""


class StoreLockedError(StoreError):
    """Another writer holds the store's lock."""


class SpecMismatchError(StoreError):
    """Two specs (store vs run, store vs store, store vs checkpoint) differ in identity fields."""


class CorruptStoreError(StoreError):
    """A chunk, manifest or attribute does not match what the store says it holds."""


class RemoteStoreError(StoreError):
    """A remote store cannot be reached (server down, timeout, HTTP error) after bounded retries."""


class UnsafeStoreError(CorruptStoreError):
    """A store or packed file holds something that could escape it or run code (links, `..`, pickle)."""


class MissingChunkError(CorruptStoreError):
    """A chunk the manifest says exists is absent on the server (HTTP 404)."""


class NonFiniteError(StoreError):
    """A row holds NaN or inf values: never written, never read into a result."""


class DiskFullError(StoreError):
    """The disk filled up while a store, packed file or manifest was written; nothing was kept."""
