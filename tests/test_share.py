"""Sharing workflows on real files: pack/unpack (a real zip), subset, merge, fingerprints, corruption."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from store import CorruptStoreError, StoreError, open_store, spec_differences
from tests.share_fixtures import by_video, chunk_file, copy_store, make_store, set_rows

runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("share") / "base")


def _cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(cli.store_app, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_pack_writes_stored_zip_that_opens_directly_and_unpacks(base: Path, tmp_path: Path) -> None:
    packed = tmp_path / "base.fsar.zip"
    code, out = _cli("pack", str(base), str(packed))
    assert code == 0 and "pack: " in out
    with zipfile.ZipFile(packed) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
    assert names[0] == "zarr.json"
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    assert "manifest.parquet" in names and "weights/lastblock.safetensors" in names
    assert "fsar.lock" not in names and not any(".tmp-" in n for n in names)

    src, z = open_store(base), open_store(packed)
    assert z.location.kind == "zip"
    assert z.fingerprint() == src.fingerprint()
    rows = [7, 0, 3]
    for name in ("tokens/layer12", "cls/layer04", "tokens/layer12_in"):
        np.testing.assert_array_equal(z.read(rows, [name])[name], src.read(rows, [name])[name])
    np.testing.assert_array_equal(z.text("emp16")[0], src.text("emp16")[0])
    assert z.read_lastblock()[1] == src.read_lastblock()[1]
    assert z.verify() == []
    info = z.info()
    assert info["bytes_on_disk"] == packed.stat().st_size and info["bytes_per_video"] > 0

    code, out = _cli("verify", str(packed))
    assert code == 0 and src.fingerprint() in out
    code, out = _cli("info", str(packed))
    assert code == 0 and src.fingerprint() in out

    code, out = _cli("unpack", str(packed), str(tmp_path / "restored"))
    assert code == 0, out
    restored = open_store(tmp_path / "restored")
    assert restored.location.kind == "dir" and restored.verify() == []
    assert restored.fingerprint() == src.fingerprint()
    np.testing.assert_array_equal(
        restored.read(rows, ["tokens/layer04"])["tokens/layer04"],
        src.read(rows, ["tokens/layer04"])["tokens/layer04"],
    )

    code, out = _cli("pack", str(base), str(packed))  # never overwrites
    assert code == 2 and "exists" in out
    code, out = _cli("unpack", str(packed), str(tmp_path / "restored"))  # not into a store
    assert code == 2 and "not an empty directory" in out


def test_packed_store_is_read_only(base: Path, tmp_path: Path) -> None:
    from store.pack import pack

    pack(base, tmp_path / "p.zip")
    with pytest.raises(StoreError, match="packed store: it opens read-only"):
        open_store(tmp_path / "p.zip", mode="a")


def test_subset_keeps_splits_tensors_and_remaps_labels(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "test_only"
    code, msg = _cli(
        "subset", str(base), "--out", str(out), "--splits", "test",
        "--tensors", "tokens/layer12,cls/layer12",
    )  # fmt: skip
    assert code == 0, msg
    assert "4 rows, 4 ok, 2 classes" in msg
    src, sub = open_store(base), open_store(out)
    assert sub.verify() == []
    assert sub.classes == ["test class 0", "test class 1"]
    assert sub.row_tensors == ["tokens/layer12", "cls/layer12"]
    assert spec_differences(src.spec, sub.spec) == []  # same features: checkpoints still match
    assert set(sub.manifest["split"]) == {"test"}
    assert sub.manifest["label"].tolist() == [0, 0, 1, 1]
    want = by_video(src, ["tokens/layer12", "cls/layer12"])
    for vid, tensors in by_video(sub, ["tokens/layer12", "cls/layer12"]).items():
        for name, value in tensors.items():
            np.testing.assert_array_equal(value, want[vid][name])
    src_text, templates = src.text("emp16")
    sub_text, sub_templates = sub.text("emp16")
    np.testing.assert_array_equal(sub_text, src_text[[3, 4]])
    assert sub_templates == templates
    np.testing.assert_array_equal(sub.read_lastblock()[0]["proj"], src.read_lastblock()[0]["proj"])
    with pytest.raises(StoreError, match="has no tensor 'tokens/layer04'"):
        sub.read([0], ["tokens/layer04"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--splits", "nope"], "has no split 'nope' (it has: train, val, test)"),
        (["--tensors", "tokens/layer99"], "has no per-row tensor 'tokens/layer99'"),
    ],
)
def test_subset_user_errors_are_one_line(
    base: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    code, out = _cli("subset", str(base), "--out", str(tmp_path / "o"), *args)
    assert code == 2 and message in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_merge_of_split_subsets_reproduces_the_store(base: Path, tmp_path: Path) -> None:
    a, b, c = tmp_path / "train", tmp_path / "valtest", tmp_path / "merged"
    assert _cli("subset", str(base), "--out", str(a), "--splits", "train")[0] == 0
    assert _cli("subset", str(base), "--out", str(b), "--splits", "val,test")[0] == 0
    code, out = _cli("merge", str(b), str(a), "--out", str(c))  # order of A/B does not matter
    assert code == 0, out
    src, merged = open_store(base), open_store(c)
    assert merged.verify() == []
    assert merged.classes == src.classes
    assert merged.fingerprint() == src.fingerprint()
    assert merged.manifest["video_id"].tolist() == src.manifest["video_id"].tolist()
    assert merged.manifest["label"].tolist() == src.manifest["label"].tolist()
    np.testing.assert_array_equal(merged.text("emp16")[0], src.text("emp16")[0])
    assert merged.attrs["weights"] == src.attrs["weights"]


def test_merge_of_part_halves_dedups_and_prefers_ok(base: Path, tmp_path: Path) -> None:
    a = copy_store(base, tmp_path / "part1")
    b = copy_store(base, tmp_path / "part2")
    set_rows(a, [1, 3, 5, 7, 9], "pending")
    set_rows(b, [0, 2, 4, 6], "pending")
    set_rows(b, [8], "failed", "decode error")  # A has row 8 ok: the ok copy wins
    set_rows(a, [9], "failed", "timeout")  # A failed, B ok
    assert open_store(a).fingerprint() != open_store(base).fingerprint()
    code, out = _cli("merge", str(a), str(b), "--out", str(tmp_path / "m"))
    assert code == 0, out
    assert "10 overlapping video(s) de-duplicated" in out
    merged, src = open_store(tmp_path / "m"), open_store(base)
    assert (merged.manifest["status"] == "ok").all()
    assert merged.n_rows == 10 and merged.verify() == []
    assert merged.fingerprint() == src.fingerprint()


def test_merge_keeps_failed_rows_with_their_error(base: Path, tmp_path: Path) -> None:
    a = copy_store(base, tmp_path / "a")
    b = copy_store(base, tmp_path / "b")
    set_rows(a, [2], "failed", "missing file")
    set_rows(b, [2], "pending")
    from store.merge import merge

    report = merge(a, b, tmp_path / "m")
    m = open_store(tmp_path / "m").manifest
    row = m[m["video_id"] == open_store(base).manifest["video_id"].iat[2]].iloc[0]
    assert row["status"] == "failed" and row["error"] == "missing file"
    assert report.ok == 9


def test_merge_refuses_different_specs_naming_fields(base: Path, tmp_path: Path) -> None:
    other = make_store(tmp_path / "other", frames=3)
    code, out = _cli("merge", str(base), str(other), "--out", str(tmp_path / "m"))
    assert code == 2
    assert "specs differ in frames: 2 != 3" in out
    assert not (tmp_path / "m").exists()


def test_merge_differing_copies_needs_prefer(base: Path, tmp_path: Path) -> None:
    rounded = make_store(tmp_path / "rounded", changed={4: 1e-3})  # fp16-level difference
    code, out = _cli("merge", str(base), str(rounded), "--out", str(tmp_path / "ok"))
    assert code == 0, out  # cosine >= 0.999: same features, A's copy kept
    kept = by_video(open_store(tmp_path / "ok"), ["tokens/layer04"])
    want = by_video(open_store(base), ["tokens/layer04"])
    assert all(np.array_equal(kept[v]["tokens/layer04"], want[v]["tokens/layer04"]) for v in want)

    different = make_store(tmp_path / "different", changed={4: 3.0})
    code, out = _cli("merge", str(base), str(different), "--out", str(tmp_path / "m"))
    assert code == 2
    assert "1 conflict(s)" in out and "beyond fp16 rounding" in out and "--prefer A" in out
    assert not (tmp_path / "m").exists()

    code, out = _cli(
        "merge", str(base), str(different), "--out", str(tmp_path / "m"), "--prefer", "B"
    )
    assert code == 0, out
    got = by_video(open_store(tmp_path / "m"), ["tokens/layer04"])
    theirs = by_video(open_store(different), ["tokens/layer04"])
    vid = open_store(base).manifest["video_id"].iat[4]
    np.testing.assert_array_equal(got[vid]["tokens/layer04"], theirs[vid]["tokens/layer04"])
    assert not np.array_equal(got[vid]["tokens/layer04"], want[vid]["tokens/layer04"])


def test_merge_and_subset_refuse_a_corrupt_source(base: Path, tmp_path: Path) -> None:
    bad = copy_store(base, tmp_path / "bad")
    s = open_store(bad)
    path = chunk_file(s, "cls/layer08", 6)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    vid = s.manifest["video_id"].iat[6]
    code, out = _cli("subset", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and f"row 6 ({vid}) cls/layer08" in out
    assert not (tmp_path / "o").exists()
    with pytest.raises(CorruptStoreError, match=r"row 6 .*cls/layer08"):
        s.read([6], ["cls/layer08"], verify=True)
    code, out = _cli("verify", str(bad))
    assert code == 1 and f"BAD row 6 ({vid}) cls/layer08" in out


def test_truncated_chunk_is_found_by_find_corrupt_and_verify(base: Path, tmp_path: Path) -> None:
    bad = copy_store(base, tmp_path / "bad")
    s = open_store(bad)
    path = chunk_file(s, "tokens/layer12", 2)
    path.write_bytes(path.read_bytes()[:10])
    problems = s.find_corrupt(s.select(status="ok"), ["tokens/layer12", "cls/layer12"])
    assert [(p.row, p.tensor) for p in problems] == [(2, "tokens/layer12")]
    assert "unreadable chunk" in problems[0].reason
    assert s.find_corrupt([0, 1], ["tokens/layer12"]) == []
    with pytest.raises(CorruptStoreError, match=r"row 2 \(.*\) tokens/layer12 is unreadable"):
        s.read([1, 2, 3], ["tokens/layer12"])
    code, out = _cli("verify", str(bad))
    assert code == 1 and "BAD row 2" in out and "tokens/layer12" in out
