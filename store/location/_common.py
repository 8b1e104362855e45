"""What every store location shares: the `Location` base, path safety and one-line error text.

A `Location` gives zarr a store object and gives fsar plain reads of the files that are not arrays.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Literal

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ..safety import ChunkLimits

HINT = "(make extract writes stores/<dataset>)"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


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


def inside(root_real: str, path: Path) -> bool:
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

    def read_metadata(self, key: str) -> bytes | None:
        """A metadata document's bytes through the store (bounded by `limits`); None when absent."""
        if not self.zarr_store._is_open:  # as zarr itself does before a first read
            sync(self.zarr_store._open())
        data = sync(self.zarr_store.get(key, default_buffer_prototype()))
        return None if data is None else data.to_bytes()

    @abstractmethod
    def read_file(self, rel: str) -> bytes:
        """Read a non-array file of the store; FileNotFoundError when it is absent."""

    def describe(self) -> str:
        return self.uri

    def forget(self, keys: Iterable[str]) -> bool:
        """Drop locally cached copies of `keys` so that the next read fetches them again; True
        when there was one (only a remote store with a cache has any)."""
        return False

    def sizes(self, row_tensors: Sequence[str]) -> tuple[int | None, int | None]:
        """(bytes of the per-row tensors' chunks, bytes of the whole store), None where unknown."""
        return None, None
