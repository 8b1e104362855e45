"""Stores are accepted only in the form fsar writes: the structural cases of issue #20, store side."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from typer.testing import CliRunner

import cli
from store import CorruptStoreError, checksum, checksum_column, open_store
from store.errors import UnsafeStoreError
from store.pack import pack
from tests.share_fixtures import chunk_file, copy_store, make_store
from tests.store_http import serve

runner = CliRunner()


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("trust") / "good")


@pytest.fixture(autouse=True)
def default_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FSAR_VERIFY_READS", raising=False)
    monkeypatch.delenv("FSAR_CACHE", raising=False)
    monkeypatch.setenv("FSAR_REMOTE_RETRIES", "1")
    monkeypatch.setattr("runtime.memory.keep_freed_memory", lambda: False)


def _cli(app: object, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))  # type: ignore[arg-type]
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _one_line_error(code: int, out: str, *phrases: str) -> None:
    assert code == 2, out
    assert len(out.strip().splitlines()) == 1 and out.startswith("error: "), out
    for phrase in phrases:
        assert phrase in out, out


def _eval(store: Path | str) -> tuple[int, str]:
    args = ("--head", "proto", "--episodes", "20", "--way", "2", "--no-progress")
    return _cli(cli.eval_app, "--store", str(store), *args)


def _forge_row(path: Path, tensor: str, row: int, change) -> None:  # type: ignore[no-untyped-def]
    """Rewrite one row's values and its manifest record as a sender could (checksum matching)."""
    arr = zarr.open_array(path / tensor, mode="r+")
    value = change(np.asarray(arr[row]).astype(np.float32)).astype(arr.dtype)
    arr[row] = value
    with open_store(path, mode="a") as s:
        record = {checksum_column(tensor): checksum(value), "finite": True}
        s.commit([{"row": row, "status": "ok", **record}])


# ---------------------------------------------------------------------- one fingerprint
def _relabel_test_videos(path: Path) -> None:
    """Swap two test classes' labels and class names together, as a sender could."""
    s = open_store(path)
    test = s.select(split="test")
    names = sorted(set(s.manifest["class_name"].iloc[test]))
    swap = {names[0]: names[1], names[1]: names[0]}
    with open_store(path, mode="a") as w:
        w.commit(
            [
                {"row": int(r), "class_name": swap[c], "label": w.classes.index(swap[c])}
                for r, c in zip(test, s.manifest["class_name"].iloc[test], strict=True)
                if c in swap
            ]
        )


def test_relabelling_test_videos_changes_the_fingerprint(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "relabelled")
    _relabel_test_videos(evil)
    code, out = _cli(cli.store_app, "verify", str(evil))
    assert code == 0, out  # every checksum still matches: only the fingerprint tells
    before, after = open_store(good).fingerprint(), open_store(evil).fingerprint()
    assert before != after
    assert f"fingerprint  {after}" in _cli(cli.store_app, "info", str(evil))[1]


def test_resume_refuses_a_relabelled_store(pair_store: Path, tmp_path: Path) -> None:
    from heads.train import TrainConfig, train

    store = copy_store(pair_store, tmp_path / "store")
    config = TrainConfig(store=str(store), head="emp", episodes=8, episodes_per_step=2,
                         val_every=4, val_episodes=10, query=1, out=str(tmp_path / "run"),
                         progress=False, lr=1e-3)  # fmt: skip
    run = train(config.resolved(), stop_at=4)
    before = {p.name: p.read_bytes() for p in Path(run).iterdir() if p.is_file()}
    _relabel_test_videos(store)  # checksums, ids and statuses unchanged
    code, out = _cli(cli.train_app, "--resume", "--out", str(run))
    _one_line_error(code, out, "has changed since", "fingerprint")
    assert {p.name: p.read_bytes() for p in Path(run).iterdir() if p.is_file()} == before


def test_a_study_cell_refuses_a_store_relabelled_since_it_was_planned(
    pair_store: Path, tmp_path: Path
) -> None:
    from heads.study.cell import CellTask, run_cell
    from heads.study.plans import expand, parse_plan

    store = copy_store(pair_store, tmp_path / "store")
    rows = [{"id": "proto", "label": "prototypes", "head": "proto"}]
    plan = parse_plan({"name": "t", "reference": "proto", "eval": {"episodes": 10}, "rows": rows})
    cell = expand(plan, open_store(store), str(store)).cells[0]
    _relabel_test_videos(store)
    with pytest.raises(RuntimeError, match="the study was planned on"):
        run_cell(CellTask(cell, str(store), str(tmp_path / "runs")))


# ---------------------------------------------------------------------- the form of arrays
def test_a_dot_chunk_key_separator_is_refused(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "dots")
    meta_path = evil / "cls" / "layer12" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["chunk_key_encoding"]["configuration"]["separator"] = "."
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptStoreError, match="cls/layer12 has chunk key encoding"):
        open_store(evil)
    for args in (("info", str(evil)), ("verify", str(evil))):
        _one_line_error(*_cli(cli.store_app, *args), "fsar writes")
    with pytest.MonkeyPatch.context() as mp:  # never read as zeros, checks or no checks
        mp.setenv("FSAR_VERIFY_READS", "0")
        _one_line_error(*_eval(evil), "chunk key encoding")


@pytest.mark.parametrize(
    ("field", "value", "phrase"),
    [
        ("fill_value", 1.0, "fill value 1.0"),
        ("codecs", [{"name": "bytes", "configuration": {"endian": "big"}}], "little endian"),
        (
            "codecs",
            [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "zstd", "configuration": {"level": 99, "checksum": False}},
            ],
            "zstd level=99 is outside",
        ),
        ("attributes", {"x": 1}, "has attributes"),
        ("storage_transformers", [{"name": "t"}], "storage transformers"),
        ("extra", 1, "has key 'extra'"),
    ],
)
def test_array_documents_other_than_fsar_writes_are_refused(
    good: Path, tmp_path: Path, field: str, value: object, phrase: str
) -> None:
    evil = copy_store(good, tmp_path / "odd")
    meta_path = evil / "tokens" / "layer04" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta[field] = value
    meta_path.write_text(json.dumps(meta))
    _one_line_error(*_cli(cli.store_app, "info", str(evil)), "tokens/layer04", phrase)


def test_spec_sizes_are_bounded_before_anything_is_built(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "wide")
    meta_path = evil / "zarr.json"
    meta = json.loads(meta_path.read_text())
    spec = meta["attributes"]["spec"]
    spec["dim"] = 32768  # a consistent spec and tensor list, D far beyond any CLIP
    for t in spec["tensors"]:
        if not t["name"].endswith("_in"):
            t["shape_per_row"][-1] = 32768
    meta_path.write_text(json.dumps(meta))
    _one_line_error(*_cli(cli.store_app, "info", str(evil)), "spec dim=32768 is outside 1..4096")


# ---------------------------------------------------------------------- the manifest
def _rewrite_manifest(path: Path, column: str, row: int, value: object) -> int:
    """The manifest with one cell replaced, zstd-compressed as a sender could; returns its size."""
    table = pq.read_table(path / "manifest.parquet")
    cells = table.column(column).to_pylist()
    cells[row] = value
    table = table.set_column(
        table.schema.get_field_index(column),
        column,
        pa.array(cells, table.schema.field(column).type),
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    (path / "manifest.parquet").write_bytes(sink.getvalue())
    return len(sink.getvalue())


@pytest.mark.parametrize(
    ("column", "value"),
    [("error", "x" * (64 << 20)), ("frame_indices", [[0] * (16 << 20)])],
)
def test_a_manifest_cell_inflating_to_megabytes_is_refused_before_reading(
    good: Path, tmp_path: Path, column: str, value: object
) -> None:
    evil = copy_store(good, tmp_path / "bomb")
    size = _rewrite_manifest(evil, column, 3, value)
    assert size < 200_000  # a small file ...
    code, out = _cli(cli.store_app, "info", str(evil))  # ... declaring 64 MB in one column
    _one_line_error(code, out, f"column {column} holds", "refusing to read it")


def test_a_manifest_of_another_schema_is_refused(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "schema")
    table = pq.read_table(evil / "manifest.parquet").append_column("extra", pa.array([1] * 10))
    pq.write_table(table, evil / "manifest.parquet")
    _one_line_error(*_cli(cli.store_app, "info", str(evil)), "has columns", "'extra'")


# ---------------------------------------------------------------------- values
def test_non_finite_rows_are_refused_by_verify_and_reads(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "nan")
    row = int(open_store(good).select(split="test")[0])
    _forge_row(evil, "cls/layer12", row, lambda v: v * np.nan)
    code, out = _cli(cli.store_app, "verify", str(evil))
    assert code == 1 and f"BAD row {row} (" in out and "cls/layer12: holds NaN or inf" in out
    _one_line_error(*_eval(evil), f"row {row} (", "holds NaN or inf values")


def test_the_writer_refuses_to_record_a_non_finite_row(good: Path, tmp_path: Path) -> None:
    from store import ChunkWriter
    from store.errors import NonFiniteError

    path = copy_store(good, tmp_path / "w")
    s = open_store(path)
    big = {n: np.full(s.spec["tensors"][i]["shape_per_row"], 1e5, np.float32)  # > fp16 max
           for i, n in enumerate(s.row_tensors) if n.startswith("tokens/")}  # fmt: skip
    before = chunk_file(s, "tokens/layer04", 1).read_bytes()
    with pytest.raises(NonFiniteError, match=r"row 1 tokens/layer04: \d+ NaN or inf"):
        ChunkWriter(path).write_row(1, big)
    assert chunk_file(s, "tokens/layer04", 1).read_bytes() == before


def test_merge_conflicts_need_a_choice_and_nan_is_never_copied(good: Path, tmp_path: Path) -> None:
    row = int(open_store(good).select(split="test")[0])
    scaled = copy_store(good, tmp_path / "x8")
    _forge_row(scaled, "tokens/layer04", row, lambda v: v * 8)  # cosine 1: only the scale differs
    nan = copy_store(good, tmp_path / "nan")
    _forge_row(nan, "tokens/layer04", row, lambda v: v * np.nan)
    vid = open_store(good).manifest["video_id"].iat[row]
    for other, reason in ((scaled, "scale x8.00"), (nan, "B's copy holds NaN or inf")):
        code, out = _cli(
            cli.store_app, "merge", str(good), str(other), "--out", str(tmp_path / "m")
        )
        _one_line_error(code, out, "1 conflict(s)", f"video {vid} tokens/layer04: {reason}")
        assert not (tmp_path / "m").exists()
    code, out = _cli(
        cli.store_app, "merge", str(good), str(nan), "--out", str(tmp_path / "a"), "--prefer", "A"
    )
    assert code == 0 and "resolved with A's copies" in out, out
    assert open_store(tmp_path / "a").fingerprint() == open_store(good).fingerprint()
    code, out = _cli(
        cli.store_app, "merge", str(good), str(nan), "--out", str(tmp_path / "b"), "--prefer", "B"
    )
    _one_line_error(code, out, f"row {row} ({vid}) holds NaN or inf values; it is not copied")
    assert not (tmp_path / "b").exists()
    code, out = _cli(
        cli.store_app,
        "merge",
        str(good),
        str(scaled),
        "--out",
        str(tmp_path / "c"),
        "--prefer",
        "B",
    )
    assert code == 0, out
    assert open_store(tmp_path / "c").fingerprint() == open_store(scaled).fingerprint()


# ---------------------------------------------------------------------- the last block
def _plant_lastblock(path: Path, config: str) -> None:
    """A last-block file of a few hundred bytes (plus its config) with `config` as its metadata,
    its sha256 recorded as a sender could."""
    from safetensors.numpy import save

    from store.layout import LASTBLOCK_NAME

    data = save({"proj": np.zeros(1, np.float32)}, metadata={"config": config})
    assert len(data) < 300 + 2 * len(config)  # the config, JSON-escaped
    with open_store(path, mode="a") as s:
        s.write_weights_file(LASTBLOCK_NAME, data)


@pytest.mark.parametrize(
    ("config", "phrase"),
    [
        ('{"width": 8192, "heads": 64, "mlp_ratio": 4.0, "dim": 8}', "its config says width 8192"),
        ('{"a":' * 50_000 + "1" + "}" * 50_000, "is not a valid safetensors file"),
        ('{"width": [[[[[[1]]]]]]}', "is not a valid safetensors file"),
    ],
)
def test_a_last_block_is_checked_against_its_spec_before_anything_is_built(
    good: Path, tmp_path: Path, config: str, phrase: str
) -> None:
    evil = copy_store(good, tmp_path / "block")
    _plant_lastblock(evil, config)
    code, out = _cli(cli.store_app, "verify", str(evil))
    assert code == 1 and "BAD store weights/lastblock.safetensors" in out and phrase in out, out
    code, out = _cli(cli.store_app, "pack", str(evil), str(tmp_path / "p.zip"))
    _one_line_error(code, out, phrase, "nothing was packed")
    assert not (tmp_path / "p.zip").exists()
    code, out = _cli(
        cli.eval_app, "--store", str(evil), "--head", "lastlayer", "--episodes", "2",
        "--way", "2", "--no-progress",
    )  # fmt: skip
    _one_line_error(code, out, "lastblock.safetensors", phrase)


def test_a_lock_file_of_any_form_is_one_line_or_ignored(good: Path, tmp_path: Path) -> None:
    """`pack` reads a teammate's lock file: garbage counts as a dead writer's, a FIFO is refused
    (never opened: it would block), a live writer's lock is respected."""
    import os

    from store.layout import LOCK_FILE

    evil = copy_store(good, tmp_path / "locked")
    lock = evil / LOCK_FILE
    for n, body in enumerate(
        [
            b"[" * 100_000,
            b'{"pid": "x", "host": "%s"}' % os.uname().nodename.encode(),
            b"\0" * 10**6,
        ]
    ):
        lock.write_bytes(body)
        os.utime(lock, (0, 0))  # older than a writer between create and write
        code, out = _cli(cli.store_app, "pack", str(evil), str(tmp_path / f"p{n}.zip"))
        assert code == 0, out
    lock.unlink()
    os.mkfifo(lock)
    code, out = _cli(cli.store_app, "pack", str(evil), str(tmp_path / "fifo.zip"))
    _one_line_error(code, out, "is not a regular file")
    lock.unlink()
    with open_store(evil, mode="a"):  # a live writer
        code, out = _cli(cli.store_app, "pack", str(evil), str(tmp_path / "live.zip"))
    _one_line_error(code, out, f"store is being written by pid {os.getpid()}")


# ---------------------------------------------------------------------- packed files
def test_a_zip_naming_one_file_twice_is_refused(good: Path, tmp_path: Path) -> None:
    packed = tmp_path / "good.zip"
    pack(good, packed)
    evil = tmp_path / "twice.zip"
    with zipfile.ZipFile(packed) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("./zarr.json", src.read("zarr.json"))
    with pytest.raises(UnsafeStoreError, match="'./zarr.json' is not a plain relative path"):
        open_store(evil)
    code, out = _cli(cli.store_app, "unpack", str(evil), str(tmp_path / "out"))
    _one_line_error(code, out, "'./zarr.json' is not a plain relative path")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- remote answers
@pytest.mark.parametrize(
    ("body", "headers", "phrase"),
    [
        (b"[]", {}, "zarr.json is not a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, {}, "zarr.json is not a JSON document"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, {}, "nests deeper than 16 levels"),
        (gzip.compress(b" " * (64 << 20)), {"Content-Encoding": "gzip"}, "larger than its key can hold"),
    ],
)  # fmt: skip
def test_remote_root_documents_are_bounded_and_checked(
    good: Path, tmp_path: Path, body: bytes, headers: dict[str, str], phrase: str
) -> None:
    copy_store(good, tmp_path / "www" / "s")
    with serve(tmp_path / "www") as (base, faults):
        faults.bodies["/s/zarr.json"] = (body, headers)
        code, out = _cli(cli.store_app, "info", base + "/s")
    _one_line_error(code, out, phrase)
    assert faults.sent["/s/zarr.json"] == len(body)  # a 64 KB gzip answer inflating to 64 MB


# ---------------------------------------------------------------------- a full disk
_SMALL_DISK = """
import json, subprocess, sys
mnt, out, commands = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", mnt]).returncode:
    sys.exit(77)
def run_all():
    results = []
    for args in commands:
        r = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True)
        results.append({"rc": r.returncode, "out": r.stdout + r.stderr,
                        "left": sorted(p for p in __import__("os").listdir(mnt))})
        subprocess.run(["rm", "-rf", *[f"{mnt}/{p}" for p in results[-1]["left"]]])
    return results
full = run_all()
subprocess.run(["mount", "-o", "remount,size=16m", mnt], check=True)
json.dump({"full": full, "rerun": run_all()}, open(out, "w"))
"""


@pytest.mark.slow
def test_a_full_disk_is_one_line_leaves_nothing_and_the_rerun_works(
    good: Path, tmp_path: Path
) -> None:
    """Each store command that builds something, on a 32 KB tmpfs (in a mount namespace of its
    own), then again once the filesystem has room."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("no unshare: test_an_injected_full_disk covers this")
    packed = tmp_path / "p.zip"
    pack(good, packed)
    mnt = tmp_path / "small"
    mnt.mkdir()
    commands = [
        ["store", "unpack", str(packed), f"{mnt}/u"],
        ["store", "subset", str(good), "--out", f"{mnt}/s", "--splits", "test"],
        ["store", "merge", str(good), str(good), "--out", f"{mnt}/m"],
        ["store", "pack", str(good), f"{mnt}/p.zip"],
    ]
    result = tmp_path / "result.json"
    proc = subprocess.run(
        ["unshare", "-Urm", sys.executable, "-c", _SMALL_DISK, str(mnt), str(result),
         json.dumps(commands)],
        capture_output=True, text=True, cwd=Path(cli.__file__).parent, timeout=600,
    )  # fmt: skip
    if proc.returncode == 77 or (proc.returncode and "unshare" in proc.stderr):
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()[:200]})")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(result.read_text())
    for args, full, rerun in zip(commands, got["full"], got["rerun"], strict=True):
        _one_line_error(full["rc"], full["out"], "no space left on the device", "nothing was kept")
        assert full["left"] == [], (args, full)  # not even a temp folder
        built = {"unpack": "u", "subset": "s", "merge": "m", "pack": "p.zip"}[args[1]]
        assert rerun["rc"] == 0 and rerun["left"] == [built], (args, rerun)


def test_an_injected_full_disk_is_one_line_and_leaves_nothing(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import zarr.storage

    packed = tmp_path / "p.zip"
    pack(good, packed)
    calls = {"n": 0}
    real_set = zarr.storage.LocalStore.set

    async def full_after_ten(self, key, value):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full_after_ten)
    out = tmp_path / "out"
    out.mkdir()
    code, text = _cli(cli.store_app, "subset", str(good), "--out", str(out / "s"))
    _one_line_error(code, text, "no space left on the device")
    assert list(out.iterdir()) == []

    def no_space(*_args: object, **_kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("store.pack.shutil.copyfileobj", no_space)
    code, text = _cli(cli.store_app, "unpack", str(packed), str(out / "u"))
    _one_line_error(code, text, "no space left on the device")
    assert list(out.iterdir()) == []


def test_writes_a_failed_batch_left_in_flight_never_leave_a_folder(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zarr writes an array's zarr.json and its parents' together; when the array's fails (a full
    disk), the parents' writes are still running: the command waits for them before it removes
    its temp folder, or they would create it again (seen on a 32 KB tmpfs)."""
    import asyncio
    import errno

    import zarr.storage

    real_set, real_parent = zarr.storage.LocalStore.set, zarr.storage.LocalStore.set_if_not_exists

    async def array_document_fails(self, key, value):  # type: ignore[no-untyped-def]
        if key == "cls/layer08/zarr.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        await real_set(self, key, value)

    async def slow_parent(self, key, value):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.5)  # still writing when the failure reaches the command
        await real_parent(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", array_document_fails)
    monkeypatch.setattr(zarr.storage.LocalStore, "set_if_not_exists", slow_parent)
    out = tmp_path / "out"
    out.mkdir()
    code, text = _cli(cli.store_app, "subset", str(good), "--out", str(out / "s"))
    _one_line_error(code, text, f"{out / 's'}: no space left on the device")

    async def writes_done() -> None:  # whatever the command left running has finished
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.wait(others) if others else None

    from zarr.core.sync import sync

    sync(writes_done())
    assert list(out.iterdir()) == []
