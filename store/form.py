"""The exact form fsar writes: the root document and each array's zarr.json, checked before zarr parses them.

A store opens only when every document is what fsar writes for its spec (JSON bounded in depth, chunk
key encoding "/", one video per chunk, the dtype, a codec chain from a fixed list with bounded
parameters); anything else is refused in one line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import CorruptStoreError, UnsafeStoreError
from .safety import MAX_CHUNK_BYTES

MAX_JSON_DEPTH = 16  # root attributes nest four levels; arrays three
BYTES_CODEC = {"name": "bytes", "configuration": {"endian": "little"}}
KEY_ENCODING = {"name": "default", "configuration": {"separator": "/"}}
ROOT_KEYS = {"zarr_format", "node_type", "attributes", "consolidated_metadata"}
ARRAY_KEYS = {
    "zarr_format",
    "node_type",
    "shape",
    "data_type",
    "chunk_grid",
    "chunk_key_encoding",
    "fill_value",
    "codecs",
    "attributes",
    "dimension_names",
    "storage_transformers",
}
OPTIONAL_ARRAY_KEYS = {"attributes", "dimension_names", "storage_transformers"}
# What each compressor's configuration may hold: a set of values or an inclusive (low, high) range.
COMPRESSORS: dict[str, dict[str, Any]] = {
    "zstd": {"level": (-7, 22), "checksum": {False, True}},
    "blosc": {
        "cname": {"zstd"},
        "clevel": (0, 9),
        "shuffle": {"noshuffle", "shuffle", "bitshuffle"},
        "typesize": {2, 4},
        "blocksize": {0},
    },
}
SPEC_CODECS = {"zstd": "zstd", "blosc-zstd": "blosc", "none": "none"}  # spec codec -> compressor


def json_depth(doc: Any) -> int:
    """Nesting depth of a parsed JSON document (a scalar is 0), without recursion."""
    depth, todo = 0, [(doc, 0)]
    while todo:
        node, level = todo.pop()
        if isinstance(node, Mapping):
            todo += [(v, level + 1) for v in node.values()]
        elif isinstance(node, list):
            todo += [(v, level + 1) for v in node]
        depth = max(depth, level)
    return depth


def parse_json(data: bytes, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON document of bounded depth, or CorruptStoreError naming `what`."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise CorruptStoreError(f"{what} is not a JSON document") from None
    if json_depth(doc) > max_depth:
        raise CorruptStoreError(f"{what} nests deeper than {max_depth} levels; refusing it")
    return doc


def check_root_document(doc: Any, where: str) -> Mapping[str, Any]:
    """The root zarr.json must be a zarr v3 group document; returns its attributes."""
    what = f"{where}: zarr.json"
    if not isinstance(doc, Mapping):
        raise CorruptStoreError(f"{what} is not a JSON object")
    extra = sorted(set(doc) - ROOT_KEYS)
    if extra:
        raise CorruptStoreError(f"{what} has key {extra[0]!r}, which fsar does not write")
    if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise CorruptStoreError(f"{what} is not a zarr v3 group")
    if doc.get("consolidated_metadata") is not None:
        raise CorruptStoreError(f"{what} has consolidated metadata, which fsar does not write")
    attrs = doc.get("attributes", {})
    if not isinstance(attrs, Mapping):
        raise CorruptStoreError(f"{what}: attributes are not a JSON object")
    return attrs


@dataclass(frozen=True)
class ArrayForm:
    """What fsar writes for one array: shape, chunk shape, dtype, dimension names, compressor."""

    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    dimension_names: tuple[str, ...] | None
    compressors: frozenset[str]  # allowed compressors: `none`, `zstd`, `blosc`

    @property
    def chunk_bytes(self) -> int:
        size = {"float16": 2, "float32": 4}[self.dtype]
        for c in self.chunks:
            size *= c
        return size


def check_array_document(doc: Any, form: ArrayForm, where: str) -> str:
    """Refuse an array document that is not exactly `form`; returns its compressor name."""
    what = f"{where}: {form.name}"
    if not isinstance(doc, Mapping):
        raise CorruptStoreError(f"{what}: zarr.json is not a JSON object")
    extra = sorted(set(doc) - ARRAY_KEYS)
    missing = sorted(ARRAY_KEYS - OPTIONAL_ARRAY_KEYS - set(doc))
    if extra or missing:
        key = (extra or missing)[0]
        raise CorruptStoreError(
            f"{what}: zarr.json {'has' if extra else 'lacks'} key {key!r} (fsar writes zarr v3 arrays)"
        )
    if doc["zarr_format"] != 3 or doc["node_type"] != "array":
        raise UnsafeStoreError(f"{what} is not a zarr v3 array; refusing it")
    if doc["data_type"] != form.dtype:
        raise UnsafeStoreError(
            f"{what} has dtype {doc['data_type']!r}: only float16/float32 are allowed "
            f"(no object arrays), the spec says {form.dtype}"
        )
    if form.chunk_bytes > MAX_CHUNK_BYTES:
        raise CorruptStoreError(
            f"{what} would have chunks of {form.chunk_bytes} bytes ({form.chunks}); refusing absurd shapes"
        )
    _expect(what, "shape", doc["shape"], list(form.shape), "the spec says")
    grid = {"name": "regular", "configuration": {"chunk_shape": list(form.chunks)}}
    _expect(what, "chunk grid", doc["chunk_grid"], grid, "one video per chunk is")
    _expect(what, "chunk key encoding", doc["chunk_key_encoding"], KEY_ENCODING, "fsar writes")
    if type(doc["fill_value"]) not in (int, float) or doc["fill_value"] != 0:
        raise CorruptStoreError(f"{what} has fill value {doc['fill_value']!r}, fsar writes 0")
    _expect(what, "attributes", doc.get("attributes", {}), {}, "fsar writes")
    _expect(what, "storage transformers", doc.get("storage_transformers", []), [], "fsar writes")
    names = doc.get("dimension_names")
    want = None if form.dimension_names is None else list(form.dimension_names)
    if names is not None:
        _expect(what, "dimension names", names, want, "fsar writes")
    return _compressor(doc["codecs"], form, what)


def _expect(what: str, field: str, have: Any, want: Any, says: str) -> None:
    if have != want or type(have) is not type(want):
        shown = tuple(have) if isinstance(have, list) else have
        wanted = tuple(want) if isinstance(want, list) else want
        raise CorruptStoreError(f"{what} has {field} {shown}, {says} {wanted}")


def _compressor(codecs: Any, form: ArrayForm, what: str) -> str:
    """`none`, `zstd` or `blosc`: the chain must be bytes (little endian), then at most one of them."""
    if not isinstance(codecs, list) or not 1 <= len(codecs) <= 2:
        raise UnsafeStoreError(
            f"{what} has codecs {codecs!r}; fsar writes bytes, then zstd or blosc"
        )
    names = [c.get("name") if isinstance(c, Mapping) else repr(c) for c in codecs]
    unknown = [n for n in names if n not in ("bytes", *COMPRESSORS)]
    if unknown:
        raise UnsafeStoreError(f"{what} uses codec {unknown[0]}, not one of blosc, bytes, zstd")
    if codecs[0] != BYTES_CODEC:
        raise UnsafeStoreError(
            f"{what} uses codecs {' + '.join(map(str, names))}; fsar writes bytes (little endian) "
            "first, then zstd, blosc or nothing"
        )
    if len(codecs) == 1:
        name = "none"
    else:
        name = str(names[1])
        _check_configuration(codecs[1].get("configuration"), COMPRESSORS.get(name, {}), what, name)
    if name not in form.compressors:
        allowed = ", ".join(sorted(form.compressors))
        raise UnsafeStoreError(f"{what} uses compressor {name}; its spec says {allowed}")
    return name


def _check_configuration(config: Any, allowed: Mapping[str, Any], what: str, name: str) -> None:
    if not isinstance(config, Mapping) or set(config) != set(allowed):
        raise UnsafeStoreError(f"{what}: {name} configuration {config!r} is not what fsar writes")
    for key, rule in allowed.items():
        value = config[key]
        if isinstance(rule, tuple):
            ok = type(value) is int and rule[0] <= value <= rule[1]
        else:
            ok = type(value) is type(next(iter(rule))) and value in rule
        if not ok:
            raise UnsafeStoreError(f"{what}: {name} {key}={value!r} is outside what fsar writes")


def row_forms(
    tensors: Sequence[Mapping[str, Any]], n_rows: int, codec: Mapping[str, Any], dims: Any
) -> list[ArrayForm]:
    """The form of every per-row array of a spec (`dims(name)` gives its dimension names)."""
    compressor = SPEC_CODECS.get(str(codec.get("name", "zstd")))
    if compressor is None:
        raise CorruptStoreError(f"spec codec {codec.get('name')!r} is not zstd, blosc-zstd or none")
    return [
        ArrayForm(
            str(t["name"]),
            (n_rows, *t["shape_per_row"]),
            (1, *t["shape_per_row"]),
            str(t["dtype"]),
            tuple(dims(t["name"])),
            frozenset({compressor}),
        )
        for t in tensors
    ]


def text_form(path: str, classes: int, templates: int, dim: int) -> ArrayForm:
    """A text array: (classes, templates, dim) float32 in one chunk (fsar writes it uncompressed)."""
    shape = (classes, templates, dim)
    return ArrayForm(path, shape, shape, "float32", None, frozenset({"none", "zstd", "blosc"}))
