"""Remote stores through a real loopback HTTP server (no directory listing): reads, cache, failures."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from store import CorruptStoreError, NotAStoreError, StoreError, open_store
from store.errors import RemoteStoreError
from tests.share_fixtures import make_store
from tests.store_http import Faults, serve

runner = CliRunner()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Faults, Path]]:
    root = tmp_path_factory.mktemp("www")
    make_store(root / "stores" / "tiny")
    with serve(root) as (url, faults):
        yield url + "/stores/tiny", faults, root / "stores" / "tiny"


@pytest.fixture(autouse=True)
def quick_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSAR_REMOTE_RETRIES", "2")
    monkeypatch.setenv("FSAR_REMOTE_TIMEOUT", "2")
    monkeypatch.delenv("FSAR_CACHE", raising=False)


def _chunk_path(tensor: str, row: int, ndim: int) -> str:
    return f"/stores/tiny/{tensor}/c/{row}/" + "/".join(["0"] * (ndim - 1))


def test_remote_store_reads_like_the_local_one(served: tuple[str, Faults, Path]) -> None:
    url, faults, local = served
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError):  # the server really does not list directories
        urllib.request.urlopen(url + "/tokens/layer04/")
    r, s = open_store(url), open_store(local)
    assert r.location.kind == "remote" and r.tensors == s.tensors
    rows = [9, 2, 5, 2]
    for name in ("tokens/layer12", "cls/layer08", "tokens/layer12_in"):
        np.testing.assert_array_equal(
            r.read(rows, [name], verify=True)[name], s.read(rows, [name])[name]
        )
    np.testing.assert_array_equal(r.text("emp16")[0], s.text("emp16")[0])
    np.testing.assert_array_equal(r.read_lastblock()[0]["proj"], s.read_lastblock()[0]["proj"])
    assert r.fingerprint() == s.fingerprint()

    result = runner.invoke(cli.store_app, ["verify", url])
    assert result.exit_code == 0 and s.fingerprint() in result.output
    result = runner.invoke(cli.store_app, ["info", url])
    assert result.exit_code == 0 and "n/a on disk" in result.output
    assert s.fingerprint() in result.output


def test_cache_makes_the_second_epoch_local(
    served: tuple[str, Faults, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, faults, local = served
    monkeypatch.setenv("FSAR_CACHE", str(tmp_path / "cache"))
    s = open_store(url)
    rows = s.select(status="ok")

    def chunk_requests() -> int:
        return sum(n for p, n in faults.requests.items() if "/c/" in p)

    before = chunk_requests()
    first = s.read(rows, s.row_tensors, verify=True)
    assert chunk_requests() - before == len(rows) * len(s.row_tensors)
    before = chunk_requests()
    second = s.read(rows, s.row_tensors, verify=True)
    again = open_store(url).read(rows, s.row_tensors)  # a new process would see the same cache
    assert chunk_requests() == before  # epoch 2: nothing fetched
    for name in s.row_tensors:
        np.testing.assert_array_equal(first[name], second[name])
        np.testing.assert_array_equal(first[name], again[name])
    (cache_dir,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    cached = {p.read_bytes() for p in cache_dir.iterdir() if p.name != "SOURCE"}
    assert len(cached) == len(rows) * len(s.row_tensors)  # one file per chunk (fsspec simplecache)
    assert (local / "tokens/layer04/c/3/0/0/0/0").read_bytes() in cached
    assert (local / "manifest.parquet").read_bytes() not in cached  # plain files are not cached
    assert not list(cache_dir.rglob("*.part"))


def test_404_chunk_names_row_and_url(served: tuple[str, Faults, Path]) -> None:
    url, faults, _ = served
    path = _chunk_path("cls/layer12", 4, 4)
    faults.by_path[path] = "404"
    try:
        s = open_store(url)
        vid = s.manifest["video_id"].iat[4]
        with pytest.raises(CorruptStoreError) as err:
            s.read([3, 4], ["cls/layer12"])
        msg = str(err.value)
        assert f"row 4 ({vid}) cls/layer12" in msg and f"{url}/cls/layer12/c/4/0/0/0" in msg
        problems = s.find_corrupt(s.select(status="ok"), ["cls/layer12"])
        assert [(p.row, p.tensor) for p in problems] == [(4, "cls/layer12")]
        result = runner.invoke(cli.store_app, ["verify", url])
        assert result.exit_code == 1
        assert f"BAD row 4 ({vid}) cls/layer12: unreadable chunk" in result.output
    finally:
        faults.by_path.clear()


def test_truncated_download_is_retried_bounded_and_never_cached(
    served: tuple[str, Faults, Path], tmp_path: Path
) -> None:
    url, faults, local = served
    path = _chunk_path("tokens/layer08", 6, 5)
    faults.by_path[path] = "truncate"
    try:
        s = open_store(url, cache=tmp_path / "cache")
        faults.requests[path] = 0
        with pytest.raises(RemoteStoreError) as err:
            s.read([6], ["tokens/layer08"])
        assert f"cannot read {url}/tokens/layer08/c/6/0/0/0/0 after 2 tries" in str(err.value)
        assert faults.requests[path] == 2
        (cache_dir,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
        assert [p.name for p in cache_dir.iterdir()] == ["SOURCE"]  # nothing cached, no .part
    finally:
        faults.by_path.clear()
    fixed = s.read([6], ["tokens/layer08"], verify=True)["tokens/layer08"]
    assert fixed.shape == (1, 1, 2, 5, 8)
    whole = (local / path.removeprefix("/stores/tiny/")).read_bytes()
    assert [p.read_bytes() for p in cache_dir.iterdir() if p.name != "SOURCE"] == [whole]


def _cached_bodies(cache: Path) -> set[bytes]:
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    return {p.read_bytes() for p in folder.iterdir() if p.name != "SOURCE"}


def test_an_error_page_answer_never_poisons_the_cache(
    served: tuple[str, Faults, Path], tmp_path: Path
) -> None:
    url, faults, local = served
    cache = tmp_path / "cache"
    key = "cls/layer12/c/4/0/0/0"
    try:
        faults.by_path[f"/stores/tiny/{key}"] = "html-once"  # a proxy's 200 error page, once
        got = open_store(url, cache=cache).read([4], ["cls/layer12"], verify=True)
        assert _cached_bodies(cache) == {(local / key).read_bytes()}  # the page was dropped
        np.testing.assert_array_equal(
            got["cls/layer12"], open_store(local).read([4], ["cls/layer12"])["cls/layer12"]
        )
        faults.by_path[f"/stores/tiny/{key}"] = "html"  # always: an error, and nothing kept
        shutil.rmtree(cache)
        with pytest.raises(CorruptStoreError, match=rf"chunk {key} is not a zstd frame"):
            open_store(url, cache=cache).read([4], ["cls/layer12"])
        assert _cached_bodies(cache) == set()
    finally:
        faults.by_path.clear()
    assert open_store(url, cache=cache).read([4], ["cls/layer12"])["cls/layer12"].shape == (
        1,
        1,
        2,
        8,
    )


def test_a_cached_chunk_failing_its_checksum_is_fetched_again(
    served: tuple[str, Faults, Path], tmp_path: Path
) -> None:
    url, _faults, local = served
    cache = tmp_path / "cache"
    want = open_store(local).read([2, 3], ["tokens/layer04"])["tokens/layer04"]
    open_store(url, cache=cache).read([2, 3], ["tokens/layer04"])
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    good = (local / "tokens/layer04/c/3/0/0/0/0").read_bytes()
    (cached,) = [p for p in folder.iterdir() if p.read_bytes() == good]
    cached.write_bytes((local / "tokens/layer04/c/2/0/0/0/0").read_bytes())  # valid, other values
    got = open_store(url, cache=cache).read([2, 3], ["tokens/layer04"], verify=True)
    np.testing.assert_array_equal(got["tokens/layer04"], want)
    assert good in _cached_bodies(cache)


def test_server_down_is_one_line_after_retries(tmp_path: Path) -> None:
    make_store(tmp_path / "s")
    with serve(tmp_path) as (base, _faults):
        url = base + "/s"
        s = open_store(url)
    with pytest.raises(
        RemoteStoreError, match=r"cannot read http://127\.0\.0\.1:\d+/s/.* after 2 tries"
    ):
        s.read([0], ["cls/layer04"])
    for cmd in ("verify", "info"):
        result = runner.invoke(cli.store_app, [cmd, url])
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: cannot read {url}/zarr.json after 2 tries")
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_timeout_gives_up_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSAR_REMOTE_TIMEOUT", "0.5")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (in the backlog) and never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/store"
    try:
        start = time.monotonic()
        with pytest.raises(RemoteStoreError, match=r"cannot read .*/store/zarr.json after 2 tries"):
            open_store(url)
        assert time.monotonic() - start < 5
    finally:
        silent.close()


def test_not_a_store_and_read_only(served: tuple[str, Faults, Path]) -> None:
    url, _, _ = served
    with pytest.raises(NotAStoreError, match=r"not a store: .*/stores/nothing"):
        open_store(url.replace("tiny", "nothing"))
    with pytest.raises(StoreError, match="remote store: it opens read-only"):
        open_store(url, mode="a")


def test_cloud_urls_without_their_extra_name_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from fsspec import registry

    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if `fsar[s3]` were not installed
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    assert "s3" not in registry  # nor imported by an earlier test
    with pytest.raises(StoreError, match=r"pip install 'fsar\[s3\]'"):
        open_store("s3://bucket/stores/hmdb51")


def test_subset_downloads_a_remote_store(served: tuple[str, Faults, Path], tmp_path: Path) -> None:
    url, _, local = served
    out = tmp_path / "copy"
    result = runner.invoke(cli.store_app, ["subset", url, "--out", str(out), "--splits", "test"])
    assert result.exit_code == 0, result.output
    copy = open_store(out)
    assert copy.verify() == [] and copy.classes == ["test class 0", "test class 1"]
    src = open_store(local)
    rows = src.select(split="test")
    np.testing.assert_array_equal(
        copy.read(copy.select(), ["tokens/layer12"])["tokens/layer12"],
        src.read(rows, ["tokens/layer12"])["tokens/layer12"],
    )


@pytest.mark.slow
def test_refused_and_timed_out_reads_say_one_line_in_a_fresh_process(
    served: tuple[str, Faults, Path],
) -> None:
    """No asyncio noise ("Task was destroyed ...") after the one line, in a process of its own."""
    import subprocess

    url, faults, local = served
    row = int(open_store(local).select(split="test")[0])
    env = {**os.environ, "FSAR_REMOTE_RETRIES": "1", "FSAR_REMOTE_TIMEOUT": "1"}
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    faults.by_path[_chunk_path("cls/layer12", row, 4)] = "flood"
    try:
        runs = [
            ["store", "info", f"http://127.0.0.1:{silent.getsockname()[1]}/s"],
            ["eval", "--store", url, "--head", "proto", "--episodes", "20", "--way", "2",
             "--no-progress"],
        ]  # fmt: skip
        for args in runs:
            r = subprocess.run(
                [sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env,
                cwd=Path(cli.__file__).parent, timeout=300,
            )  # fmt: skip
            assert r.returncode == 2, r.stderr
            assert len((r.stdout + r.stderr).strip().splitlines()) == 1, r.stdout + r.stderr
    finally:
        faults.by_path.clear()
        silent.close()
