"""Where a store lives: a local directory (the sharing layer adds packed files and URLs).

A `Location` gives zarr a store object and gives fsar plain file reads for the files that are not
zarr arrays (the manifest, the last-block weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zarr.storage
from zarr.abc.store import Store

from .errors import NotAStoreError

HINT = "(make extract writes stores/<dataset>)"


@dataclass
class Location:
    uri: str
    zarr_store: Store
    local: Path | None  # the directory, when the store is a local directory
    writable: bool

    def read_file(self, rel: str) -> bytes:
        """Read a non-array file of the store; FileNotFoundError when it is absent."""
        if self.local is None:
            raise FileNotFoundError(rel)
        return (self.local / rel).read_bytes()

    def has_file(self, rel: str) -> bool:
        try:
            self.read_file(rel)
        except FileNotFoundError:
            return False
        return True

    def describe(self) -> str:
        return self.uri


def resolve(uri: str | Path, mode: Literal["r", "a", "w"] = "r") -> Location:
    """Turn a user-given path into a Location, with the foundation issue's error texts."""
    text = str(uri)
    path = Path(text)
    if mode != "w":
        if not path.exists():
            raise NotAStoreError(f"store not found: {text} {HINT}")
        if not path.is_dir() or not (path / "zarr.json").is_file():
            raise NotAStoreError(f"not a store: {text} {HINT}")
    store = zarr.storage.LocalStore(path, read_only=(mode == "r"))
    return Location(uri=text, zarr_store=store, local=path, writable=mode != "r")
