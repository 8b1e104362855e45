"""Where a store lives: a local directory, a packed zip file, or a URL (http(s)://, s3://, gs://).

One backend per module (`_local`, `_zip`, `_remote`), each reading through its `ChunkLimits`.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from ..errors import NotAStoreError, StoreError
from ..safety import ChunkLimits
from ._common import HINT, Location, is_url, one_line, safe_member
from ._local import DirLocation, SafeLocalStore
from ._remote import CACHE_ENV, RemoteLocation, RemoteStore, redact
from ._zip import ZIP_DAMAGE, ZIP_FORMAT_DAMAGE, SafeZipStore, ZipLocation, check_zip_members

__all__ = [
    "CACHE_ENV",
    "HINT",
    "ZIP_DAMAGE",
    "ZIP_FORMAT_DAMAGE",
    "DirLocation",
    "Location",
    "RemoteLocation",
    "RemoteStore",
    "SafeLocalStore",
    "SafeZipStore",
    "ZipLocation",
    "check_zip_members",
    "is_url",
    "one_line",
    "resolve",
    "safe_member",
]


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
                raise StoreError(f"{redact(text)} is a remote store: it opens read-only")
            chosen = (
                ("--cache", cache) if cache is not None else (CACHE_ENV, os.environ.get(CACHE_ENV))
            )
            return RemoteLocation(text, cache_folder(*chosen))
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


def cache_folder(option: str, folder: str | Path | None) -> Path | None:
    """The folder `option` (--cache or FSAR_CACHE) names for fetched chunks, created if need be;
    None when unset or empty. A path that is not a folder fsar can write is a StoreError naming it."""
    if folder is None or not str(folder).strip():
        return None
    shown = f"{option} {folder}" if option.startswith("-") else f"{option}={str(folder)!r}"
    try:
        path = Path(folder).expanduser()
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(20, "not a folder")
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except (OSError, RuntimeError) as error:  # (RuntimeError: ~user that does not exist)
        why = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise StoreError(
            f"{shown}: cannot keep a cache there ({why}); give a folder fsar can write, or unset it"
        ) from None
    return path
