"""The store's root group: opening it through a location and checking its root attributes.

Also decides whether reads check row checksums by default (`FSAR_VERIFY_READS`, `written_here`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any, Literal

import zarr

from .errors import CorruptStoreError, NotAStoreError, SchemaVersionError, StoreError
from .layout import SCHEMA_VERSION
from .location import HINT, Location, one_line

VERIFY_ENV = "FSAR_VERIFY_READS"
MAX_TEMPLATES = 10_000


def open_group(location: Location, mode: Literal["r", "r+"]) -> zarr.Group:
    """The root group, or NotAStoreError / CorruptStoreError in one line."""
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
    env = os.environ.get(VERIFY_ENV, "").strip().lower()
    if env in ("0", "off", "no", "false"):
        return False
    if env in ("1", "on", "yes", "true"):
        return True
    return not written_here(location, attrs)


def validate_attrs(attrs: Mapping[str, Any], where: str) -> None:
    """Root attributes must have the types fsar writes; a newer schema names the upgrade."""
    version = attrs.get("schema_version")
    if not isinstance(version, int) or "spec" not in attrs:
        raise NotAStoreError(f"not a store: {where} {HINT}")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} has store schema {version}, this fsar reads up to {SCHEMA_VERSION}: upgrade fsar"
        )
    spec = attrs["spec"]
    if not isinstance(spec, Mapping) or not isinstance(attrs.get("classes"), list):
        raise CorruptStoreError(f"{where}: root attributes spec/classes are malformed")
    _check_tensor_names(attrs.get("tensors"), where)
    classes = attrs["classes"]
    if not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise CorruptStoreError(f"{where}: root attribute classes is malformed")
    _check_text(attrs.get("text", {}), where)
    weights = attrs.get("weights", {})
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weights.items()
    ):
        raise CorruptStoreError(f"{where}: root attribute weights is malformed")


def _check_tensor_names(tensors: Any, where: str) -> None:
    if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
        raise CorruptStoreError(f"{where}: root attribute tensors is malformed")
    for name in tensors:
        if name.startswith("/") or ".." in name.split("/"):
            raise CorruptStoreError(f"{where}: tensor name {name!r} leaves the store")


def _check_text(text: Any, where: str) -> None:
    if not isinstance(text, Mapping) or not all(
        isinstance(v, Mapping)
        and isinstance(v.get("checksum"), str)
        and isinstance(v.get("templates"), list)
        and 0 < len(v["templates"]) <= MAX_TEMPLATES
        and all(isinstance(t, str) for t in v["templates"])
        for v in text.values()
    ):
        raise CorruptStoreError(f"{where}: root attribute text is malformed")
