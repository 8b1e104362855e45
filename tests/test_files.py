"""runtime.files, the gate for files: regular files only, bounded sizes and depth, atomic writes."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from runtime import files
from runtime.files import DiskFullError, FileRefused


# ---------------------------------------------------------------------------------------- reads
def test_reads_regular_files_up_to_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_bytes(b"x" * 100)
    assert files.read_bytes(path, 100) == b"x" * 100
    with pytest.raises(FileRefused, match=r"a.json holds 100 bytes, more than 99"):
        files.read_bytes(path, 99)
    with pytest.raises(FileRefused, match="does not exist"):
        files.read_bytes(tmp_path / "missing", 10)


def test_links_fifos_devices_and_folders_are_refused_without_reading(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    link = tmp_path / "config.json"
    link.symlink_to(outside)
    with pytest.raises(FileRefused, match="config.json is a link"):
        files.read_bytes(link, 1 << 20, "run config")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opened for reading, a FIFO would block until a writer came
    with pytest.raises(FileRefused, match="not a regular file"):
        files.read_bytes(fifo, 1 << 20)
    with pytest.raises(FileRefused, match="not a regular file"):
        files.read_bytes("/dev/zero", 1 << 20)
    with pytest.raises(FileRefused, match="not a regular file"):
        files.read_bytes(tmp_path, 1 << 20)


def test_json_nested_ten_thousand_deep_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 10_000 + "]" * 10_000)
    with pytest.raises(FileRefused, match=r"deep.json nests JSON more than 64 levels deep"):
        files.read_json(path, "config")
    # brackets inside strings do not count
    text = json.dumps({"a": "[[[[{{{{" * 100, "b": [[1]]})
    assert files.json_depth(text) == 3
    assert files.parse_json(text, "x")["b"] == [[1]]
    with pytest.raises(FileRefused, match="not valid JSON"):
        files.parse_json("{", "x")


# --------------------------------------------------------------------------------------- writes
def test_write_file_replaces_atomically_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    files.write_file(path, "one")
    files.write_file(path, b"two")
    files.write_file(path, lambda f: f.write(b"three"))
    assert path.read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_write_file_refuses_links_and_writes_nothing_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / "curves.png").symlink_to(outside)
    with pytest.raises(FileRefused, match="curves.png is a link"):
        files.write_file(run / "curves.png", b"png")
    with pytest.raises(FileRefused, match="metrics.jsonl is a link"):
        (run / "metrics.jsonl").symlink_to(outside)
        files.append_line(run / "metrics.jsonl", "{}")
    assert outside.read_bytes() == b"precious"
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path: Path) -> None:
    path = tmp_path / "last.safetensors"
    path.write_bytes(b"old")

    def fails(f) -> None:
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="the disk is full .*last.safetensors"):
        files.write_file(path, fails)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]

    def interrupted(f) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_file(path, interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]


def test_log_tail_drops_a_cut_last_record_and_is_bounded(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    for i in range(1000):
        files.append_line(log, json.dumps({"episode": i}))
    with open(log, "a") as f:
        f.write('{"episode": 10')  # a kill mid-record
    lines, cut = files.read_log_tail(log, 1 << 20)
    assert cut and len(lines) == 1000 and json.loads(lines[-1]) == {"episode": 999}
    lines, cut = files.read_log_tail(log, 200)  # the tail only, starting at a whole line
    assert cut and 0 < len(lines) < 20 and json.loads(lines[-1]) == {"episode": 999}
    assert all(json.loads(line) for line in lines)
    assert files.drop_cut_line(log) == len('{"episode": 10')
    assert files.read_log_tail(log, 1 << 20)[1] is False
    assert files.drop_cut_line(log) == 0
    files.append_line(log, json.dumps({"episode": 1000}))
    lines, cut = files.read_log_tail(log, 1 << 20)
    assert not cut and len(lines) == 1001 and json.loads(lines[-1]) == {"episode": 1000}
    # a window that begins exactly at a line's start keeps that line
    size = log.stat().st_size
    last = (lines[-1] + "\n").encode()
    assert files.read_log_tail(log, len(last))[0] == [lines[-1]]
    assert size > len(last)


# -------------------------------------------------------------------------------------- folders
def test_building_renames_when_done_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "store"
    with files.building(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "zarr.json").write_text("{}")
        assert not target.exists()
    assert (target / "zarr.json").read_text() == "{}"
    with pytest.raises(FileRefused, match="is a folder that is not empty"):
        with files.building(target):
            pass
    failed = tmp_path / "subset"
    with pytest.raises(RuntimeError):
        with files.building(failed) as tmp:
            (tmp / "part").write_text("x")
            raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_full_disk_is_one_line_and_leaves_nothing(small_disk: Path) -> None:
    """On a real filesystem that fills up (a 256 KiB tmpfs, or injected ENOSPC without the rights
    to mount one): the old file stays whole, no temp file or half-built folder is left."""
    path = small_disk / "last.safetensors"
    files.write_file(path, b"old")
    with pytest.raises(DiskFullError, match="the disk is full"):
        files.write_file(path, b"x" * (1 << 20))
    assert path.read_bytes() == b"old"
    with pytest.raises(DiskFullError, match="the disk is full"):
        with files.building(small_disk / "store") as tmp:
            files.write_file(tmp / "chunk", b"x" * (1 << 20))
    with pytest.raises(DiskFullError, match="the disk is full"):
        files.append_line(small_disk / "metrics.jsonl", "x" * (1 << 20))
    assert sorted(p.name for p in small_disk.iterdir()) <= ["last.safetensors", "metrics.jsonl"]
