"""The store's root group: its document checked, then opened by zarr; its root attributes bounded.

Also decides whether reads check row checksums by default (`FSAR_VERIFY_READS`, `written_here`).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from typing import Any, Literal

import zarr

from runtime.values import env_flag

from .errors import CorruptStoreError, NotAStoreError, SchemaVersionError, StoreError
from .form import check_root_document, parse_json
from .layout import SCHEMA_VERSION
from .location import HINT, Location, one_line

VERIFY_ENV = "FSAR_VERIFY_READS"
MAX_TEMPLATES = 10_000
MAX_CLASSES = 100_000
MAX_NAME = 512  # characters of a class name, template, dataset or split source
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")  # text and weights names


def open_group(location: Location, mode: Literal["r", "r+"]) -> zarr.Group:
    """The root group, once its document is a zarr v3 group of bounded size and depth; else
    NotAStoreError / CorruptStoreError in one line."""
    where = location.describe()
    data = location.read_metadata("zarr.json")
    if data is None:
        raise NotAStoreError(f"not a store: {where} {HINT}")
    check_root_document(parse_json(data, f"{where}: zarr.json"), where)
    try:
        return zarr.open_group(location.zarr_store, mode=mode, zarr_format=3)
    except StoreError:
        raise
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError) as exc:
        raise NotAStoreError(f"not a store: {location.describe()} {HINT}") from exc
    except Exception as exc:  # metadata zarr cannot parse (wrong types, unknown fields)
        raise CorruptStoreError(
            f"{location.describe()}: zarr.json is damaged ({one_line(exc)})"
        ) from exc


def written_here(location: Location, attrs: Mapping[str, Any]) -> bool:
    """True for a directory store that this machine created at the path it has now."""
    mark = attrs.get("written_on")
    return (
        location.local is not None
        and isinstance(mark, Mapping)
        and mark.get("host") == socket.gethostname()
        and mark.get("path") == os.path.realpath(location.local)
    )


def verify_by_default(location: Location, attrs: Mapping[str, Any]) -> bool:
    """Whether reads check row checksums: env FSAR_VERIFY_READS (0/1), else unless written here."""
    chosen = env_flag(VERIFY_ENV)
    return chosen if chosen is not None else not written_here(location, attrs)


def validate_attrs(attrs: Mapping[str, Any], where: str) -> None:
    """Root attributes must have the types fsar writes, within bounds; a newer schema names the
    upgrade."""
    version = attrs.get("schema_version")
    if type(version) is not int or not isinstance(attrs.get("spec"), Mapping):
        raise NotAStoreError(f"not a store: {where} {HINT}")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} has store schema {version}, this fsar reads up to {SCHEMA_VERSION}: upgrade fsar"
        )
    if version < 1:
        raise CorruptStoreError(f"{where}: schema_version {version} is not one fsar writes")
    _check_names(attrs.get("classes"), where, "classes", MAX_CLASSES, unique=True)
    _check_tensor_names(attrs.get("tensors"), where)
    _check_text(attrs.get("text", {}), where)
    weights = attrs.get("weights", {})
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and FILE_NAME.match(k) and isinstance(v, str) and len(v) <= 128
        for k, v in weights.items()
    ):
        raise CorruptStoreError(f"{where}: root attribute weights is malformed")
    for key in ("dataset", "split_source", "created_at"):
        value = attrs.get(key, "")
        if not isinstance(value, str) or len(value) > MAX_NAME:
            raise CorruptStoreError(f"{where}: root attribute {key} is malformed")


def _check_names(names: Any, where: str, what: str, most: int, unique: bool = False) -> None:
    if (
        not isinstance(names, list)
        or len(names) > most
        or not all(isinstance(c, str) and 0 < len(c) <= MAX_NAME for c in names)
        or (unique and len(set(names)) != len(names))
    ):
        raise CorruptStoreError(f"{where}: root attribute {what} is malformed")


def _check_tensor_names(tensors: Any, where: str) -> None:
    if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
        raise CorruptStoreError(f"{where}: root attribute tensors is malformed")
    for name in tensors:
        if name.startswith("/") or ".." in name.split("/"):
            raise CorruptStoreError(f"{where}: tensor name {name!r} leaves the store")
    _check_names(tensors, where, "tensors", 10_000, unique=True)


def _check_text(text: Any, where: str) -> None:
    if not isinstance(text, Mapping) or not all(
        isinstance(k, str)
        and FILE_NAME.match(k)
        and isinstance(v, Mapping)
        and isinstance(v.get("checksum"), str)
        and len(v["checksum"]) <= 128
        and isinstance(v.get("templates"), list)
        and 0 < len(v["templates"]) <= MAX_TEMPLATES
        and all(isinstance(t, str) and len(t) <= MAX_NAME for t in v["templates"])
        for k, v in text.items()
    ):
        raise CorruptStoreError(f"{where}: root attribute text is malformed")
