"""Malicious inputs are refused with clear errors: object arrays, pickles, traversal, links, shapes."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import cli
from store import CorruptStoreError, NotAStoreError, StoreError, open_store
from store.errors import UnsafeStoreError
from store.pack import pack, unpack
from tests.share_fixtures import chunk_file, copy_store, make_store

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("safety") / "good")


class _Touch:
    """A pickle that creates a file when loaded: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _pickled_npy(marker: Path) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([_Touch(marker)], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(cli.store_app, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _edit_json(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


# ---------------------------------------------------------------------- pickles and object arrays
def test_string_array_in_place_of_text_is_refused(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")
    g = zarr.open_group(evil, mode="r+")
    g.create_array("text/emp16", shape=(5,), dtype=str, overwrite=True)[...] = np.array(["x"] * 5)
    with pytest.raises(UnsafeStoreError, match="text/emp16 has dtype .*only float16/float32"):
        open_store(evil)  # every array's form is checked when the store opens
    code, out = _cli("verify", str(evil))
    assert code == 2 and "only float16/float32 are allowed (no object arrays)" in out


def test_object_dtype_row_tensor_refuses_to_open(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")
    _edit_json(
        evil / "cls" / "layer04" / "zarr.json",
        lambda m: m.update(
            data_type="string",
            fill_value="",
            codecs=[{"name": "vlen-utf8", "configuration": {}}],
        ),
    )
    with pytest.raises(UnsafeStoreError, match="cls/layer04 has dtype .*no object arrays"):
        open_store(evil)
    code, out = _cli("info", str(evil))
    assert code == 2 and "cls/layer04" in out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_non_allowed_codec_is_refused_before_decoding(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")
    _edit_json(
        evil / "text" / "emp16" / "zarr.json",
        lambda m: m["codecs"].append({"name": "numcodecs.zlib", "configuration": {"level": 1}}),
    )
    with pytest.raises(UnsafeStoreError, match="uses codec numcodecs.zlib"):
        open_store(evil).text("emp16")
    _edit_json(  # a pickling codec: unknown to zarr v3, refused while parsing metadata
        evil / "text" / "emp16" / "zarr.json",
        lambda m: m.update(codecs=[{"name": "numcodecs.pickle", "configuration": {}}]),
    )
    with pytest.raises(CorruptStoreError, match="text/emp16"):
        open_store(evil).text("emp16")


def test_pickled_payloads_placed_in_the_store_never_run(good: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    payload = _pickled_npy(marker)
    with pytest.raises(ValueError):  # sanity: numpy itself refuses it by default
        np.load(io.BytesIO(payload))
    assert not marker.exists()

    evil = copy_store(good, tmp_path / "evil")
    s = open_store(evil)
    chunk_file(s, "tokens/layer04", 1).write_bytes(payload)  # a chunk replaced by a pickle
    (evil / "text" / "emp16" / "c" / "0" / "0" / "0").write_bytes(payload)
    (evil / "weights" / "lastblock.safetensors").write_bytes(payload)
    (evil / "tokens" / "layer04.npy").write_bytes(payload)  # a stray .npy is never loaded
    s = open_store(evil)
    with pytest.raises(CorruptStoreError, match=r"row 1 \(.*\) tokens/layer04 is unreadable"):
        s.read([1], ["tokens/layer04"])
    with pytest.raises(CorruptStoreError, match="lastblock.safetensors fails its checksum"):
        s.read_lastblock()
    code, out = _cli("verify", str(evil))
    assert code == 1
    assert "BAD row 1" in out and "tokens/layer04" in out
    assert "text/emp16" in out and "weights/lastblock.safetensors" in out
    assert not marker.exists()


def test_no_pickle_in_project_code() -> None:
    """No module may unpickle: no pickle imports, no allow_pickle=True, torch.load only weights_only."""
    offenders = []
    sources = [REPO / "cli.py"]
    for package in ("store", "pipeline", "heads", "bench", "runtime"):
        sources += sorted((REPO / package).rglob("*.py"))
    for path in sources:
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text(errors="replace")
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M):
            offenders.append(f"{rel}: imports pickle")
        if re.search(r"allow_pickle\s*=\s*True", text):
            offenders.append(f"{rel}: allow_pickle=True")
        for call in re.finditer(r"torch\.load\(", text):
            depth, end = 0, call.end() - 1
            for end in range(call.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            if not re.search(r"weights_only\s*=\s*True", text[call.start() : end]):
                offenders.append(f"{rel}: torch.load without weights_only=True")
    assert offenders == []


# ---------------------------------------------------------------------- zip members
def _zip_with(tmp_path: Path, good: Path, extra: str, link: bool = False) -> Path:
    packed = tmp_path / "good.zip"
    if not packed.exists():
        pack(good, packed)
    evil = tmp_path / f"evil{abs(hash((extra, link)))}.zip"
    with zipfile.ZipFile(packed) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        info = zipfile.ZipInfo(extra)
        if link:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            dst.writestr(info, "/etc/passwd")
        else:
            dst.writestr(info, b"owned")
    return evil


@pytest.mark.parametrize(
    ("member", "link"),
    [("../escaped.txt", False), ("/tmp/absolute.txt", False), ("tokens/../../up.txt", False),
     ("C:/windows.txt", False), ("tokens/link", True)],
)  # fmt: skip
def test_unpack_refuses_escaping_members(
    good: Path, tmp_path: Path, member: str, link: bool
) -> None:
    evil = _zip_with(tmp_path, good, member, link)
    dest = tmp_path / "out" / "store"
    code, out = _cli("unpack", str(evil), str(dest))
    assert code == 2
    assert f"member {member!r}" in out and ("outside" in out or "symbolic link" in out)
    assert not dest.exists()  # nothing written, not even inside
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "up.txt").exists()
    assert not Path("/tmp/absolute.txt").exists() or member != "/tmp/absolute.txt"
    with pytest.raises(UnsafeStoreError):  # the packed file is not opened either
        open_store(evil)


def test_unpack_never_follows_a_link_planted_in_dest(good: Path, tmp_path: Path) -> None:
    packed = tmp_path / "good.zip"
    pack(good, packed)
    with pytest.raises(StoreError, match="not an empty directory"):
        dest = tmp_path / "dest"
        dest.mkdir()
        (dest / "zarr.json").symlink_to(tmp_path / "outside.json")
        unpack(packed, dest)
    assert not (tmp_path / "outside.json").exists()


def test_damaged_zip_member_is_reported(good: Path, tmp_path: Path) -> None:
    packed = tmp_path / "p.zip"
    pack(good, packed)
    data = bytearray(packed.read_bytes())
    with zipfile.ZipFile(packed) as zf:
        info = zf.getinfo("tokens/layer08/c/5/0/0/0/0")
    data[info.header_offset + 30 + len(info.filename) + 5] ^= 0xFF  # inside the member's bytes
    packed.write_bytes(bytes(data))
    s = open_store(packed)
    with pytest.raises(CorruptStoreError, match=r"row 5 .*tokens/layer08 is unreadable"):
        s.read([5], ["tokens/layer08"])
    code, out = _cli("verify", str(packed))
    assert code == 1 and "BAD row 5" in out and "tokens/layer08" in out
    with pytest.raises(CorruptStoreError, match="damaged"):
        unpack(packed, tmp_path / "u")
    assert not (tmp_path / "u").exists()


# ---------------------------------------------------------------------- links in directory stores
def test_symlinked_chunk_pointing_outside_is_refused(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")
    s = open_store(evil)
    chunk = chunk_file(s, "cls/layer12", 3)
    outside = tmp_path / "outside_chunk"
    outside.write_bytes(chunk.read_bytes())  # valid data: only the link itself is wrong
    chunk.unlink()
    chunk.symlink_to(outside)
    with pytest.raises(
        UnsafeStoreError, match="cls/layer12/c/3/0/0/0 is a link .*outside the store"
    ):
        open_store(evil).read([3], ["cls/layer12"])
    code, out = _cli("verify", str(evil))
    assert code == 2 and "outside the store" in out
    with pytest.raises(StoreError, match="symbolic link"):
        pack(evil, tmp_path / "p.zip")
    assert not (tmp_path / "p.zip").exists()


def test_symlinked_directory_and_manifest_are_refused(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")
    elsewhere = tmp_path / "elsewhere"
    os.rename(evil / "tokens" / "layer08" / "c", elsewhere)
    (evil / "tokens" / "layer08" / "c").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafeStoreError, match="outside the store"):
        open_store(evil).read([0], ["tokens/layer08"])

    evil2 = copy_store(good, tmp_path / "evil2")
    os.rename(evil2 / "manifest.parquet", tmp_path / "m.parquet")
    (evil2 / "manifest.parquet").symlink_to(tmp_path / "m.parquet")
    code, out = _cli("info", str(evil2))
    assert code == 2 and "manifest.parquet is a link" in out


# ---------------------------------------------------------------------- absurd metadata
def test_absurd_array_shape_is_refused(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")
    _edit_json(
        evil / "tokens" / "layer04" / "zarr.json", lambda m: m["shape"].__setitem__(0, 10**15)
    )
    with pytest.raises(CorruptStoreError, match="tokens/layer04 has shape .*the spec says"):
        open_store(evil)


def test_absurd_spec_is_refused(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")
    _edit_json(evil / "zarr.json", lambda m: m["attributes"]["spec"].update(frames=10**9))
    code, out = _cli("info", str(evil))
    assert code == 2 and "its fields imply" in out

    def huge(meta: dict) -> None:  # consistent spec and tensor list, absurd sizes
        spec = meta["attributes"]["spec"]
        spec["frames"] = 10**9
        for t in spec["tensors"]:
            t["shape_per_row"][1] = 10**9

    _edit_json(evil / "zarr.json", huge)
    with pytest.raises(CorruptStoreError, match="bytes per video .*refusing absurd shapes"):
        open_store(evil)


def test_absurd_text_chunks_are_refused(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")

    def huge(meta: dict) -> None:
        meta["shape"] = [10**6, 10**4, 10**4]
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [10**6, 10**4, 10**4]

    _edit_json(evil / "text" / "emp16" / "zarr.json", huge)
    with pytest.raises(CorruptStoreError, match=r"text/emp16 has shape \(1000000, 10000, 10000\)"):
        open_store(evil)


def test_tensor_names_leaving_the_store_are_refused(good: Path, tmp_path: Path) -> None:
    evil = copy_store(good, tmp_path / "evil")
    _edit_json(evil / "zarr.json", lambda m: m["attributes"]["tensors"].append("../../etc"))
    with pytest.raises(CorruptStoreError, match="leaves the store"):
        open_store(evil)
    with pytest.raises(NotAStoreError):
        open_store(tmp_path / "missing")
