"""The store format: round trips, integrity, concurrent writers, the lock, crashes, CLI errors."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import cli
from store import (
    SCHEMA_VERSION,
    ChunkWriter,
    CorruptStoreError,
    StoreLockedError,
    checksum_column,
    create_store,
    done_update,
    open_store,
    spec_differences,
)
from store.random_store import random_lastblock, random_spec, write_random_store

runner = CliRunner()
CLASSES = ["brush hair", "catch", "chew", "climb", "dive", "golf"]


def _videos(n_per_class: int = 3) -> pd.DataFrame:
    rows = []
    for c, name in enumerate(CLASSES):
        split = "train" if c < 3 else ("val" if c < 4 else "test")
        for k in range(n_per_class):
            vid = f"videos/{name.replace(' ', '_')}/clip{k}"
            rows.append(
                {"video_id": vid, "relpath": vid + ".avi", "class_name": name, "split": split}
            )
    return pd.DataFrame(rows)


def _row_tokens(spec: dict, row: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + row)
    shape = (spec["views"], spec["frames"], spec["tokens"], spec["dim"])
    out = {
        f"tokens/layer{k:02d}": rng.standard_normal(shape).astype(np.float16)
        for k in spec["layers"]
    }
    if spec["recipe"] == "emp+last":
        wshape = (*shape[:3], spec["width"])
        out["tokens/layer12_in"] = rng.standard_normal(wshape).astype(np.float16)
    return out


def _fill(path: Path, spec: dict, rows: list[int]) -> None:
    writer = ChunkWriter(path)
    with open_store(path, mode="a") as s:
        s.commit(
            [
                done_update(
                    r,
                    writer.write_row(r, _row_tokens(spec, r)),
                    n_frames=40,
                    fps=30.0,
                    frame_indices=[[1, 2, 3, 4]] * spec["views"],
                    decoder="test",
                )
                for r in rows
            ]
        )


@pytest.fixture
def spec() -> dict:
    return random_spec(frames=4, views=2, dim=16, width=24, patches=4, recipe="emp+last")


@pytest.fixture
def store_path(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "store"
    create_store(path, spec, CLASSES, _videos(), dataset="toy", split_source="test").close()
    return path


def test_create_presizes_arrays_and_marks_rows_pending(store_path: Path, spec: dict) -> None:
    s = open_store(store_path)
    n = len(_videos())
    assert s.n_rows == n and (s.manifest["status"] == "pending").all()
    assert s.array("tokens/layer04").shape == (n, 2, 4, 5, 16)
    assert s.array("tokens/layer04").chunks == (1, 2, 4, 5, 16)  # one video = one chunk
    assert s.array("cls/layer12").shape == (n, 2, 4, 16)
    assert s.array("tokens/layer12_in").shape == (n, 2, 4, 5, 24)
    assert s.tensors == [
        "tokens/layer04",
        "tokens/layer08",
        "tokens/layer12",
        "cls/layer04",
        "cls/layer08",
        "cls/layer12",
        "tokens/layer12_in",
    ]
    # Labels index the global class list (train, val, test order); video ids are kept verbatim.
    m = s.manifest
    assert m.loc[m["video_id"] == "videos/dive/clip1", "label"].item() == CLASSES.index("dive")
    assert list(m["row"]) == list(range(n))
    # Plain zarr and pyarrow read it without fsar.
    import pyarrow.parquet as pq
    import zarr

    root = zarr.open_group(str(store_path), mode="r")
    assert root.attrs["schema_version"] == 1 and root.attrs["classes"] == CLASSES
    assert root.attrs["spec"]["recipe"] == "emp+last"
    assert set(pq.read_table(store_path / "manifest.parquet").column_names) >= {
        "video_id",
        "relpath",
        "class_name",
        "label",
        "split",
        "row",
        "status",
        "error",
        "n_frames",
        "fps",
        "frame_indices",
        "decoder",
        "checksum_tokens_layer04",
        "extracted_at",
    }


def test_round_trip_any_subset_and_order(store_path: Path, spec: dict) -> None:
    n = len(_videos())
    _fill(store_path, spec, list(range(n)))
    s = open_store(store_path)
    rows = [7, 2, 2, 15, 0]
    got = s.read(rows, ["tokens/layer08", "cls/layer08", "tokens/layer12_in"], verify=True)
    for i, r in enumerate(rows):
        want = _row_tokens(spec, r)
        assert np.array_equal(got["tokens/layer08"][i], want["tokens/layer08"])
        assert np.array_equal(got["tokens/layer12_in"][i], want["tokens/layer12_in"])
        assert np.array_equal(got["cls/layer08"][i], want["tokens/layer08"][..., 0, :])
    one_view = s.read([3, 1], ["cls/layer12"], view=1)["cls/layer12"]
    assert one_view.shape == (2, 4, 16)
    assert np.array_equal(one_view[0], _row_tokens(spec, 3)["tokens/layer12"][1, :, 0, :])
    t = s.read([4], ["cls/layer04"], as_torch=True)["cls/layer04"]
    assert tuple(t.shape) == (1, 2, 4, 16) and str(t.dtype) == "torch.float16"
    m = s.manifest.iloc[5]
    assert (
        m["status"] == "ok"
        and m["n_frames"] == 40
        and list(map(list, m["frame_indices"])) == [[1, 2, 3, 4]] * 2
    )
    assert s.verify() == []


def test_select_by_split_class_status(store_path: Path, spec: dict) -> None:
    _fill(store_path, spec, [0, 1, 9, 10, 16])
    s = open_store(store_path)
    assert list(s.select(split="train")) == [0, 1]
    assert list(s.select(split="val")) == [9, 10]
    assert list(s.select(split=["val", "test"], status="ok")) == [9, 10, 16]
    assert list(s.select(classes=["catch"], status="pending")) == [3, 4, 5]
    assert len(s.select(status=None)) == s.n_rows


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_is_reported_by_verify_with_row_and_tensor(
    store_path: Path, spec: dict
) -> None:
    _fill(store_path, spec, list(range(6)))
    _flip_byte(store_path / "tokens" / "layer08" / "c" / "4" / "0" / "0" / "0" / "0")
    problems = open_store(store_path).verify()
    assert [(p.row, p.tensor) for p in problems] == [(4, "tokens/layer08")]
    result = runner.invoke(cli.store_app, ["verify", str(store_path)])
    assert result.exit_code == 1
    assert "row 4 (videos/catch/clip1) tokens/layer08" in result.output
    with pytest.raises(CorruptStoreError, match=r"row 4 \(videos/catch/clip1\) tokens/layer08"):
        open_store(store_path).read([3, 4], ["tokens/layer08"], verify=True)


def test_verify_cli_passes_on_a_good_store(tmp_path: Path) -> None:
    write_random_store(tmp_path / "s", random_spec(), {"train": 2, "test": 2}, 3).close()
    result = subprocess.run(
        [sys.executable, "-m", "cli", "store", "verify", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        cwd=Path(cli.__file__).parent,
    )
    assert result.returncode == 0, result.stderr
    assert "verify: ok (12 rows x 6 tensors" in result.stdout


def _worker_write(path: str, rows: list[int], spec: dict) -> None:
    writer = ChunkWriter(path)
    for r in rows:
        writer.write_row(r, _row_tokens(spec, r))


def test_workers_in_separate_processes_lose_nothing(store_path: Path, spec: dict) -> None:
    n = len(_videos())
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_write, args=(str(store_path), list(range(w, n, 3)), spec))
        for w in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    s = open_store(store_path)
    got = s.read(range(n), ["tokens/layer04", "tokens/layer12_in"])
    for r in range(n):
        want = _row_tokens(spec, r)
        assert np.array_equal(got["tokens/layer04"][r], want["tokens/layer04"])
        assert np.array_equal(got["tokens/layer12_in"][r], want["tokens/layer12_in"])


_HOLD_LOCK = """
import sys
from store import open_store
s = open_store(sys.argv[1], mode="a")
print("locked", flush=True)
sys.stdin.read()  # holds the lock until killed
"""


def test_second_writer_refused_then_allowed_after_stale_lock(store_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(store_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(cli.__file__).parent,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            open_store(store_path, mode="a")
        open_store(store_path).close()  # readers are never blocked
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (store_path / "fsar.lock").exists()  # the crash left its lock behind
    with open_store(store_path, mode="a") as s:  # ...which is detected as stale
        assert s.mode == "a"
    assert not (store_path / "fsar.lock").exists()


_CRASH_AFTER_CHUNK = """
import os, sys
import numpy as np
from store import ChunkWriter, open_store
path = sys.argv[1]
s = open_store(path, mode="a")
w = ChunkWriter(path)
shape = (2, 4, 5, 16)
sums = w.write_row(3, {f"tokens/layer{k:02d}": np.ones(shape, np.float16) for k in (4, 8, 12)}
                   | {"tokens/layer12_in": np.ones((2, 4, 5, 24), np.float16)})
# a torn manifest write: the temp file exists, the rename never happened
open(os.path.join(path, ".manifest.parquet.tmp-1"), "wb").write(b"PAR1 torn")
os.kill(os.getpid(), 9)
"""


def test_crash_between_chunk_write_and_commit_leaves_row_not_ok(
    store_path: Path, spec: dict
) -> None:
    _fill(store_path, spec, [0, 1])
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_AFTER_CHUNK, str(store_path)], cwd=Path(cli.__file__).parent
    )
    assert proc.returncode == -signal.SIGKILL
    s = open_store(store_path, mode="a")  # opens, and the stale lock is taken over
    assert list(s.manifest["status"].iloc[:4]) == ["ok", "ok", "pending", "pending"]
    assert s.verify() == []  # pending rows are not claimed, so nothing is wrong
    s.close()


def test_commit_refuses_ok_without_checksums(store_path: Path) -> None:
    with open_store(store_path, mode="a") as s:
        with pytest.raises(ValueError, match="without checksums"):
            s.commit([{"row": 0, "status": "ok"}])
        assert open_store(store_path).manifest["status"].iloc[0] == "pending"


def test_text_and_lastblock_round_trip(store_path: Path) -> None:
    emb = np.random.default_rng(0).standard_normal((len(CLASSES), 16, 16)).astype(np.float32)
    templates = [f"t{i} {{}}" for i in range(16)]
    with open_store(store_path, mode="a") as s:
        weights, config = random_lastblock(s.spec)
        s.write_text("emp16", emb, templates)
        s.write_lastblock(weights, config)
        wide = dict(config, width=config["width"] * 341)  # a config the file does not back
        s.write_lastblock({k: v[..., :1] for k, v in weights.items()}, wide)
    s = open_store(store_path)
    got, tmpl = s.text("emp16")
    assert np.array_equal(got, emb) and tmpl == templates
    with pytest.raises(CorruptStoreError, match="lastblock.safetensors: its config says width"):
        s.read_lastblock()
    with open_store(store_path, mode="a") as w:
        w.write_lastblock(weights, config)
    got_weights, cfg = open_store(store_path).read_lastblock()
    assert cfg == config and all(np.array_equal(got_weights[k], v) for k, v in weights.items())
    assert "text/emp16" in s.tensors
    (store_path / "weights" / "lastblock.safetensors").write_bytes(b"\0" * 64)
    assert [p.tensor for p in open_store(store_path).verify()] == ["weights/lastblock.safetensors"]


def test_fingerprint_ignores_row_order_and_codec(tmp_path: Path, spec: dict) -> None:
    vids = _videos()
    a, b = tmp_path / "a", tmp_path / "b"
    create_store(a, spec, CLASSES, vids, dataset="toy", split_source="t").close()
    spec_b = dict(spec, codec={"name": "none"})
    create_store(
        b, spec_b, CLASSES, vids.iloc[::-1].reset_index(drop=True), dataset="toy", split_source="t"
    ).close()
    n = len(vids)
    _fill(a, spec, list(range(n)))
    wb = ChunkWriter(b)
    with open_store(b, mode="a") as s:
        s.commit(
            [
                done_update(
                    n - 1 - r,
                    wb.write_row(n - 1 - r, _row_tokens(spec, r)),
                    frame_indices=[[1, 2, 3, 4]] * spec["views"],  # the frames a head sees
                )
                for r in range(n)
            ]
        )
    fa, fb = open_store(a).fingerprint(), open_store(b).fingerprint()
    assert fa == fb
    _fill(a, spec, [0])  # same values: unchanged
    assert open_store(a).fingerprint() == fa
    with open_store(a, mode="a") as s:
        s.commit([{"row": 0, "status": "failed", "error": "timeout"}])
    assert open_store(a).fingerprint() != fa


def test_spec_differences_names_fields(spec: dict) -> None:
    other = json.loads(json.dumps(spec))
    other["frames"] = 16
    other["preprocess"]["name"] = "emp"
    other["versions"] = {"torch": "9.9"}  # not an identity field
    diffs = spec_differences(spec, other)
    assert [d.split(":")[0] for d in diffs] == ["preprocess", "frames"]


def test_info_reports_counts_and_sizes(tmp_path: Path) -> None:
    s = write_random_store(
        tmp_path / "s", random_spec(dim=32, patches=4, frames=4), {"train": 2, "test": 1}, 4
    )
    with s:
        s.commit([{"row": 0, "status": "failed", "error": "truncated"}])
    info = open_store(tmp_path / "s").info()
    assert info["counts"] == {"test": {"ok": 4}, "train": {"failed": 1, "ok": 7}}
    assert info["errors"] == {"truncated": 1}
    raw = (3 * 4 * 5 * 32 + 3 * 4 * 32) * 2
    assert info["raw_bytes_per_video"] == raw
    assert 0 < info["bytes_per_video"] < raw * 1.2  # random data barely compresses
    result = runner.invoke(cli.store_app, ["info", str(tmp_path / "s")])
    assert result.exit_code == 0
    assert "train  failed=1  ok=7" in result.output and "failed       truncated: 1" in result.output


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "store not found: {p} (make extract writes stores/<dataset>)"),
        (lambda p: p.mkdir(), "not a store: {p} (make extract writes stores/<dataset>)"),
        (
            lambda p: (
                p.mkdir(),
                (p / "zarr.json").write_text(
                    '{"zarr_format": 3, "node_type": "group", "attributes": {}}'
                ),
            ),
            "not a store: {p} (make extract writes stores/<dataset>)",
        ),
    ],
)
def test_cli_errors_for_non_stores(tmp_path: Path, make, message: str) -> None:
    p = tmp_path / "store"
    make(p)
    for cmd in ("info", "verify"):
        result = runner.invoke(cli.store_app, [cmd, str(p)])
        assert result.exit_code == 2
        assert result.output.strip().splitlines() == [f"error: {message.format(p=p)}"]


def test_newer_schema_is_refused_in_one_line(tmp_path: Path) -> None:
    write_random_store(tmp_path / "s", random_spec(), {"train": 1}, 2).close()
    meta_path = tmp_path / "s" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["schema_version"] = 99
    meta_path.write_text(json.dumps(meta))
    result = runner.invoke(cli.store_app, ["info", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {tmp_path / 's'} has store schema 99, this fsar reads up to {SCHEMA_VERSION}: upgrade fsar"
    )


def test_create_refuses_non_empty_directory(tmp_path: Path, spec: dict) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep me")
    from store import StoreError

    with pytest.raises(StoreError, match="exists and is not empty"):
        create_store(tmp_path / "x", spec, CLASSES, _videos(), dataset="toy", split_source="t")
    assert (tmp_path / "x" / "file").read_text() == "keep me"


def test_manifest_write_is_atomic_under_kill(store_path: Path, spec: dict) -> None:
    """Kill a committer in a loop; every surviving manifest parses and is the old or new one."""
    code = """
import sys
from store import open_store, checksum_column
s = open_store(sys.argv[1], mode="a")
i = 0
while True:
    s.commit([{"row": i % s.n_rows, "error": f"note {i}"}])
    i += 1
    print(i, flush=True)
"""
    for commits in (1, 4, 16):  # killed at some point after its n-th commit, mid-loop
        p = subprocess.Popen(
            [sys.executable, "-c", code, str(store_path)],
            cwd=Path(cli.__file__).parent,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert p.stdout is not None
            for line in p.stdout:  # the child's own report of each commit, however slow it runs
                if int(line) >= commits:
                    break
            else:
                pytest.fail(f"the committer exited with {p.wait()} before commit {commits}")
        finally:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        s = open_store(store_path)  # must parse
        assert s.n_rows == len(_videos())
        assert s.manifest["error"].notna().any()
    assert checksum_column("tokens/layer04") in s.manifest.columns
