"""Reads never compute on damaged or absurd data: checksums by default, missing chunks, size caps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numcodecs
import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from store import CorruptStoreError, StoreLockedError, open_store
from store.errors import UnsafeStoreError
from store.merge import merge, subset
from store.pack import pack, unpack
from tests.share_fixtures import chunk_file, copy_store, make_store
from tests.store_http import serve

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("integrity") / "good")


@pytest.fixture(autouse=True)
def default_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FSAR_VERIFY_READS", raising=False)
    monkeypatch.delenv("FSAR_CACHE", raising=False)
    # fsar-eval keeps freed memory for speed; not in the long-lived test process
    monkeypatch.setattr("runtime.memory.keep_freed_memory", lambda: False)


def _store_cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(cli.store_app, list(args))
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _eval(store: Path | str, *extra: str) -> tuple[int, str]:
    result = runner.invoke(
        cli.eval_app,
        ["--store", str(store), "--head", "proto", "--episodes", "20", "--way", "2",
         "--no-progress", *extra],
    )  # fmt: skip
    assert not isinstance(result.exception, Exception), result.exception
    return result.exit_code, result.output


def _rewrite_chunk(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Decode a zstd chunk, change its values, encode it again: a valid chunk with other data."""
    codec = numcodecs.Zstd(level=3)
    values = np.frombuffer(codec.decode(path.read_bytes()), dtype=np.float16).copy()
    path.write_bytes(codec.encode(change(values).tobytes()))


# ---------------------------------------------------------------------- checksums on read
def test_reads_check_checksums_unless_written_here(good: Path, tmp_path: Path) -> None:
    assert not open_store(good).verify_reads  # created on this machine at this path
    copied = copy_store(good, tmp_path / "copied")
    assert open_store(copied).verify_reads  # same files, another path: received from elsewhere
    packed = tmp_path / "p.zip"
    pack(good, packed)
    assert open_store(packed).verify_reads
    assert unpack(packed, tmp_path / "unpacked").verify_reads
    assert subset(good, tmp_path / "sub", splits=["test"]).out.exists()
    assert open_store(tmp_path / "sub").verify_reads
    merge(good, tmp_path / "sub", tmp_path / "merged")
    assert open_store(tmp_path / "merged").verify_reads
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FSAR_VERIFY_READS", "0")
        assert not open_store(copied).verify_reads
        mp.setenv("FSAR_VERIFY_READS", "1")
        assert open_store(good).verify_reads
    assert not open_store(copied, verify=False).verify_reads


def test_changed_chunk_values_are_refused_not_evaluated(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")
    s = open_store(evil)
    row = int(s.select(split="test")[0])
    vid = s.manifest["video_id"].iat[row]
    _rewrite_chunk(chunk_file(s, "cls/layer12", row), lambda v: v * 2)
    for view in (None, 0):
        with pytest.raises(CorruptStoreError, match=rf"row {row} \({vid}\) cls/layer12 fails"):
            open_store(evil).read([row], ["cls/layer12"], view=view)
    code, out = _eval(evil)
    assert code == 2 and f"row {row} ({vid}) cls/layer12 fails its checksum" in out
    assert "accuracy" not in out
    with pytest.MonkeyPatch.context() as mp:  # the opt-out reads it as it is
        mp.setenv("FSAR_VERIFY_READS", "0")
        code, out = _eval(evil)
        assert code == 0 and "accuracy" in out


def test_changed_chunk_over_http_is_refused(good: Path, tmp_path: Path) -> None:
    root = tmp_path / "www"
    served = copy_store(good, root / "s")
    row = int(open_store(served).select(split="test")[0])
    _rewrite_chunk(chunk_file(open_store(served), "cls/layer12", row), lambda v: -v)
    with serve(root) as (base, _faults):
        code, out = _eval(base + "/s")
    assert code == 2 and f"row {row} (" in out and "cls/layer12 fails its checksum" in out


def test_missing_chunk_is_an_error_never_zeros(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")
    s = open_store(evil)
    row = int(s.select(split="test")[1])
    vid = s.manifest["video_id"].iat[row]
    chunk_file(s, "cls/layer12", row).unlink()
    for verify in (True, False):  # even with checksums off, never zeros
        with pytest.raises(CorruptStoreError, match=rf"row {row} \({vid}\) cls/layer12 .*missing"):
            open_store(evil, verify=verify).read([row], ["cls/layer12"], view=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FSAR_VERIFY_READS", "0")
        code, out = _eval(evil)
    assert code == 2 and f"row {row} ({vid}) cls/layer12" in out and "missing" in out
    code, out = _store_cli("verify", str(evil))
    assert code == 1 and f"BAD row {row} ({vid}) cls/layer12" in out


def test_rows_of_zeros_are_written_as_chunks(tmp_path: Path) -> None:
    from store import ChunkWriter
    from store.random_store import random_spec, write_random_store

    spec = random_spec()
    path = tmp_path / "zeros"
    s = write_random_store(path, spec, {"train": 1}, 2)
    zeros = {n: np.zeros((1, 4, 5, 32), np.float16) for n in ("tokens/layer04", "tokens/layer08", "tokens/layer12")}  # fmt: skip
    sums = ChunkWriter(path).write_row(1, zeros)
    s.commit([{"row": 1, "status": "ok", **sums}])
    s.close()
    data = open_store(path, verify=True).read([1], ["cls/layer04"])["cls/layer04"]
    assert not data.any()


# ---------------------------------------------------------------------- sizes checked before reading
def _packed_with(
    good: Path, packed: Path, out: Path, name: str, data: bytes, **member: object
) -> Path:
    """`good` packed into `packed`, copied to `out` with one more member (zipfile's options)."""
    pack(good, packed)
    with zipfile.ZipFile(packed) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr(name, data, **member)  # type: ignore[arg-type]
    return out


def test_compressed_zip_member_is_refused_before_inflating(good: Path, tmp_path: Path) -> None:
    packed = tmp_path / "good.zip"
    bomb = _packed_with(
        good,
        packed,
        tmp_path / "bomb.zip",
        "text/big",
        b"\0" * (64 << 20),
        compress_type=zipfile.ZIP_DEFLATED,
    )
    assert bomb.stat().st_size < packed.stat().st_size + (1 << 20)
    with pytest.raises(UnsafeStoreError, match="'text/big' is compressed"):
        open_store(bomb)
    for args in (("info", str(bomb)), ("unpack", str(bomb), str(tmp_path / "out"))):
        code, out = _store_cli(*args)
        assert code == 2 and "is compressed; packed stores hold stored" in out
    assert not (tmp_path / "out").exists()


def test_zip_with_a_file_and_a_directory_of_one_name_is_refused(good: Path, tmp_path: Path) -> None:
    evil = _packed_with(
        good,
        tmp_path / "good.zip",
        tmp_path / "clash.zip",
        "tokens/layer04",
        b"a file where a directory is",
    )
    code, out = _store_cli("unpack", str(evil), str(tmp_path / "out"))
    assert code == 2 and "'tokens/layer04' is both a file and a directory" in out
    assert not (tmp_path / "out").exists()
    code, out = _store_cli("info", str(evil))
    assert code == 2 and "both a file and a directory" in out


def test_huge_declared_text_shape_is_refused_before_allocating(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")
    meta_path = evil / "text" / "emp16" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [10**5, 16, 10**4]  # 64 GB as a whole, small chunks
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [5, 16, 8]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptStoreError, match=r"text/emp16 has shape \(100000, 16, 10000\)"):
        open_store(evil)
    code, out = _store_cli("verify", str(evil))  # the store does not open: one line, exit 2
    assert code == 2 and "text/emp16 has shape (100000, 16, 10000)" in out
    assert len(out.strip().splitlines()) == 1


def test_chunk_declaring_another_size_is_never_decompressed(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")
    s = open_store(evil)
    bomb = numcodecs.Zstd(level=19).encode(b"\0" * (64 << 20))  # 64 MB in under 4 KB
    assert len(bomb) < 4000
    chunk_file(s, "tokens/layer04", 2).write_bytes(bomb)
    big = chunk_file(s, "tokens/layer08", 3)
    big.write_bytes(os.urandom(1 << 20))  # far more bytes than a chunk of this array can hold
    s = open_store(evil, verify=False)
    with pytest.raises(CorruptStoreError, match=r"row 2 .*declares 67108864 uncompressed bytes"):
        s.read([2], ["tokens/layer04"])
    with pytest.raises(CorruptStoreError, match=r"row 3 .*holds 1048576 bytes, more than"):
        s.read([3], ["tokens/layer08"])
    problems = {(p.row, p.tensor) for p in open_store(evil).verify()}
    assert problems == {(2, "tokens/layer04"), (3, "tokens/layer08")}


def test_remote_answer_is_streamed_and_cut_off(good: Path, tmp_path: Path) -> None:
    root = tmp_path / "www"
    copy_store(good, root / "s")
    with serve(root) as (base, faults):
        s = open_store(base + "/s")
        path = "/s/cls/layer12/c/4/0/0/0"
        faults.by_path[path] = "flood"
        with pytest.raises(CorruptStoreError, match=r"row 4 .*cls/layer12.*larger than its key"):
            s.read([4], ["cls/layer12"])
        assert faults.requests[path] <= 2  # refused, not retried (read, then read to name the row)
        assert faults.sent[path] < 32 << 20  # the client hung up early (the server offers 256 MB)


# ---------------------------------------------------------------------- no write leaves the store
def test_no_write_follows_a_link_out_of_the_store(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(evil / "weights")
    (evil / "weights").symlink_to(outside, target_is_directory=True)
    with open_store(evil, mode="a") as s:
        with pytest.raises(UnsafeStoreError, match="weights is a link .*refusing to write"):
            s.write_lastblock({"proj": np.ones((12, 8))}, {"width": 12})
        shutil.rmtree(evil / "text")
        (evil / "text").symlink_to(outside, target_is_directory=True)
        with pytest.raises(UnsafeStoreError, match="outside the store"):
            s.write_text("emp16", np.ones((5, 1, 8)), ["{}"])
        (evil / "manifest.parquet").rename(outside / "m.parquet")
        (evil / "manifest.parquet").symlink_to(outside / "m.parquet")
        before = (outside / "m.parquet").read_bytes()
        s.commit([{"row": 0, "error": "note"}])  # replaces the link, never writes through it
    assert list(outside.iterdir()) == [outside / "m.parquet"]
    assert (outside / "m.parquet").read_bytes() == before
    assert not (evil / "manifest.parquet").is_symlink()


_HOLD = """
import sys
from store import open_store
s = open_store(sys.argv[1], mode="a")
print("locked", flush=True)
sys.stdin.read()
"""


def test_pack_ignores_a_lock_left_by_a_killed_writer(good: Path, tmp_path: Path) -> None:
    store = copy_store(good, tmp_path / "s")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(store)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            pack(store, tmp_path / "live.zip")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (store / "fsar.lock").exists()
    code, out = _store_cli("pack", str(store), str(tmp_path / "p.zip"))
    assert code == 0, out
    assert open_store(tmp_path / "p.zip").fingerprint() == open_store(good).fingerprint()


def test_unpack_verifies_every_row(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")
    s = open_store(evil)
    _rewrite_chunk(chunk_file(s, "tokens/layer08", 5), lambda v: v + 1)
    bad_zip = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad_zip, "w") as zf:  # a valid zip (CRCs match) of a damaged store
        for path in sorted(evil.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(evil).as_posix())
    code, out = _store_cli("unpack", str(bad_zip), str(tmp_path / "out"))
    assert (
        code == 2 and "row 5" in out and "tokens/layer08" in out and "nothing was unpacked" in out
    )
    assert not (tmp_path / "out").exists()
