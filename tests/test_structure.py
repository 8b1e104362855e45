"""Property tests that generate structure: zarr.json documents, manifests and zip member lists.

Each generated input gives a correct answer or one StoreError line, writes nothing outside its
folder and stays within bounded memory. Seeded (derandomize) so CI sees the same cases every run.
"""

from __future__ import annotations

import io
import json
import shutil
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("hypothesis")  # a dev requirement: make install brings it

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from store import StoreError, open_store  # noqa: E402
from store.pack import pack, unpack  # noqa: E402
from tests.share_fixtures import copy_store, make_store  # noqa: E402

PEAK_BYTES = 64 << 20  # Python-side allocations of one open and read of a tiny store
SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ROW = 3
TENSOR = "tokens/layer04"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("structure") / "good")


@pytest.fixture(scope="module")
def want(good: Path) -> np.ndarray:
    return open_store(good).read([ROW], [TENSOR])[TENSOR]


@pytest.fixture(autouse=True)
def checked_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FSAR_VERIFY_READS", raising=False)


_SCRATCH: dict[str, Path] = {}


@contextmanager
def changed(
    good: Path, factory: pytest.TempPathFactory, rel: str
) -> Iterator[tuple[Path, Path, Path]]:
    """A copy of `good` (made once per file changed) whose `rel` the block may change; restored
    afterwards. Yields (folder holding the copy, the copy, the file)."""
    if rel not in _SCRATCH:
        _SCRATCH[rel] = copy_store(good, factory.mktemp("scratch") / "s")
    store = _SCRATCH[rel]
    original = (good / rel).read_bytes()
    try:
        yield store.parent, store, store / rel
    finally:
        (store / rel).write_bytes(original)


def packed(good: Path) -> Path:
    if "zip" not in _SCRATCH:
        _SCRATCH["zip"] = good.parent / "good.zip"
        pack(good, _SCRATCH["zip"])
    return _SCRATCH["zip"]


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _answer_or_one_line(
    root: Path, target: Path, want: np.ndarray, act: Callable[[], np.ndarray | None]
) -> bool:
    """`act()` reads the store at `target`: the right values (or nothing to compare) or a one-line
    StoreError; nothing appears in `root` outside `target`, and Python allocations stay under
    PEAK_BYTES. True when it answered."""
    before = {p for p in _tree(root) if not p.startswith(target.name)}
    tracemalloc.start()
    try:
        got, answered = act(), True
    except StoreError as exc:
        assert "\n" not in str(exc).strip(), str(exc)
        got, answered = None, False
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < PEAK_BYTES, peak
    if got is not None:
        np.testing.assert_array_equal(got, want)
    assert {p for p in _tree(root) if not p.startswith(target.name)} == before
    return answered


def _read(path: Path) -> np.ndarray:
    """Row ROW as stored, checksums off: only the store's form stands between a change and a
    wrong answer (a chunk read as zeros, say)."""
    with open_store(path, verify=False) as s:
        return s.read([ROW], [TENSOR])[TENSOR]


# ---------------------------------------------------------------------- zarr.json documents
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
codecs = st.sampled_from(
    [
        {"name": "bytes", "configuration": {"endian": "little"}},
        {"name": "bytes", "configuration": {"endian": "big"}},
        {"name": "bytes"},
        {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
        {"name": "zstd", "configuration": {"level": 3, "checksum": True}},
        {"name": "zstd", "configuration": {"level": 1000, "checksum": False}},
        {"name": "blosc", "configuration": {"typesize": 2, "cname": "zstd", "clevel": 5,
                                             "shuffle": "shuffle", "blocksize": 0}},
        {"name": "gzip", "configuration": {"level": 1}},
        {"name": "transpose", "configuration": {"order": [4, 3, 2, 1, 0]}},
        {"name": "crc32c"},
        {"name": "numcodecs.pickle"},
    ]
)  # fmt: skip
shapes = st.lists(st.integers(-2, 2**62) | st.sampled_from([1, 2, 5, 8, 10]), max_size=6)
edits = st.one_of(
    st.tuples(st.sampled_from(["shape", "data_type", "fill_value", "chunk_key_encoding",
                               "dimension_names", "attributes", "zarr_format", "node_type",
                               "storage_transformers", "codecs", "chunk_grid", "extra"]),
              json_values),
    st.tuples(st.just("shape"), shapes),
    st.tuples(st.just("chunk_grid"), shapes.map(
        lambda s: {"name": "regular", "configuration": {"chunk_shape": s}})),
    st.tuples(st.just("chunk_key_encoding"), st.sampled_from(["/", ".", "", "//", 1]).map(
        lambda sep: {"name": "default", "configuration": {"separator": sep}})),
    st.tuples(st.just("codecs"), st.lists(codecs, max_size=3)),
    st.tuples(st.just("data_type"), st.sampled_from(["float16", "float32", "float64", "int8",
                                                     "string", "bool", "|O"])),
    st.tuples(st.just("-delete"), st.sampled_from(["shape", "codecs", "fill_value",
                                                   "dimension_names", "storage_transformers"])),
)  # fmt: skip


@SETTINGS
@given(changes=st.lists(edits, min_size=1, max_size=2))
@example(changes=[("chunk_key_encoding", {"name": "default", "configuration": {"separator": "."}})])
@example(changes=[("chunk_key_encoding", {"name": "v2", "configuration": {"separator": "."}})])
@example(changes=[("fill_value", 1.0)])
def test_array_documents(
    good: Path, want: np.ndarray, tmp_path_factory: pytest.TempPathFactory, changes: list
) -> None:
    with changed(good, tmp_path_factory, f"{TENSOR}/zarr.json") as (root, store, path):
        doc = json.loads(path.read_text())
        for key, value in changes:
            if key == "-delete":
                doc.pop(value, None)
            else:
                doc[key] = value
        path.write_text(json.dumps(doc))
        _answer_or_one_line(root, store, want, lambda: _read(store))


@SETTINGS
@given(doc=json_values | st.integers(1, 3000).map(lambda n: "[" * n + "]" * n))
def test_root_documents(
    good: Path, want: np.ndarray, tmp_path_factory: pytest.TempPathFactory, doc: Any
) -> None:
    with changed(good, tmp_path_factory, "zarr.json") as (root, store, path):
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        _answer_or_one_line(root, store, want, lambda: _read(store))


# ---------------------------------------------------------------------- manifests
def _column_edit(table: pa.Table, draw: st.DrawFn) -> pa.Table:
    name = draw(st.sampled_from(table.column_names))
    index = table.schema.get_field_index(name)
    kind = draw(st.sampled_from(["drop", "add", "retype", "cell", "rows"]))
    if kind == "drop":
        return table.remove_column(index)
    if kind == "add":
        return table.append_column(draw(st.text(max_size=6)), pa.array([1] * table.num_rows))
    if kind == "retype":
        return table.set_column(
            index, name, pa.array([str(v) for v in table.column(name).to_pylist()])
        )
    if kind == "rows":
        order = draw(st.lists(st.integers(0, table.num_rows - 1), max_size=2 * table.num_rows))
        return table.take(pa.array(order, pa.int64()))
    cells = table.column(name).to_pylist()
    row = draw(st.integers(0, len(cells) - 1))
    cells[row] = draw(
        st.none()
        | st.integers(-(2**31), 2**31 - 1)
        | st.text(max_size=12)
        | st.integers(1, 1 << 24).map(lambda n: "x" * n)
        | st.integers(1, 1 << 22).map(lambda n: [[0] * n])
        | st.sampled_from(["ok", "failed", "pending", cells[0]])
    )
    try:
        return table.set_column(index, name, pa.array(cells, table.schema.field(name).type))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
        return table.set_column(index, name, pa.array([str(c) for c in cells]))


@st.composite
def manifests(draw: st.DrawFn, table: pa.Table) -> bytes:
    for _ in range(draw(st.integers(1, 3))):
        table = _column_edit(table, draw)
    sink = io.BytesIO()
    pq.write_table(
        table,
        sink,
        compression=draw(st.sampled_from(["none", "zstd", "snappy", "gzip"])),
        row_group_size=draw(st.integers(1, 20)),
        use_dictionary=draw(st.booleans()),
    )
    return sink.getvalue()


@SETTINGS
@given(data=st.data())
def test_manifests(
    good: Path, want: np.ndarray, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    vid = open_store(good).manifest["video_id"].iat[ROW]
    with changed(good, tmp_path_factory, "manifest.parquet") as (root, store, path):
        path.write_bytes(data.draw(manifests(pq.read_table(path))))

        def read_and_check() -> np.ndarray | None:
            with open_store(store) as s:
                s.verify()  # problems are listed, never raised as anything but a StoreError
                m = s.manifest
                if len(m) <= ROW or m["video_id"].iat[ROW] != vid or m["status"].iat[ROW] != "ok":
                    return None
                return s.read([ROW], [TENSOR], verify=True)[TENSOR]

        _answer_or_one_line(root, store, want, read_and_check)


# ---------------------------------------------------------------------- zip member lists
names = st.text(alphabet="ab/.\\:\x00 ", min_size=0, max_size=10)
members = st.lists(
    st.tuples(names, st.sampled_from(["file", "dir", "link", "deflated"])), max_size=5
)


@pytest.mark.filterwarnings("ignore:Duplicate name")
@SETTINGS
@given(extra=members, keep=st.booleans())
def test_zip_member_lists(
    good: Path, want: np.ndarray, tmp_path_factory: pytest.TempPathFactory, extra: list, keep: bool
) -> None:
    root = tmp_path_factory.mktemp("zip")
    evil = root / "evil.zip"
    with zipfile.ZipFile(packed(good)) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist() if keep else []:
            dst.writestr(info, src.read(info))
        for name, kind in extra:
            info = zipfile.ZipInfo(name + ("/" if kind == "dir" else ""))
            if kind == "link":
                info.external_attr = 0o120777 << 16
            if kind == "deflated":
                info.compress_type = zipfile.ZIP_DEFLATED
            try:
                dst.writestr(info, b"{}" if kind != "dir" else b"")
            except ValueError:  # a name zipfile itself will not write
                pass
    dest = root / "out"
    _answer_or_one_line(root, evil, want, lambda: _read(evil))
    unpacked = _answer_or_one_line(root, dest, want, lambda: _read_unpacked(evil, dest))
    assert dest.exists() == unpacked  # a refused file leaves nothing behind
    shutil.rmtree(root)


def _read_unpacked(file: Path, dest: Path) -> np.ndarray:
    unpack(file, dest).close()
    return _read(dest)
