"""The `[s3]` extra against a real S3-compatible server (moto's server mode on loopback, no client mock)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from store import open_store
from store.errors import MissingChunkError
from tests.share_fixtures import make_store

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
runner = CliRunner()


@pytest.fixture(scope="module")
def uploaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A tiny store uploaded to a bucket of a fresh moto server; the variables a user sets to
    reach an S3-compatible server are botocore's own."""
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        mp.setenv("AWS_ACCESS_KEY_ID", "fsar-test")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "fsar-test")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("FSAR_REMOTE_RETRIES", "2")
        mp.delenv("FSAR_CACHE", raising=False)
        mp.delenv("FSAR_VERIFY_READS", raising=False)
        local = make_store(tmp_path_factory.mktemp("s3") / "tiny")
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("fsar")
        fs.put(str(local), "fsar/stores/tiny", recursive=True)
        try:
            yield "s3://fsar/stores/tiny", local
        finally:
            server.stop()


@contextmanager
def removed(local: Path, *keys: str) -> Iterator[None]:
    """Objects removed from the bucket for the duration (put back from `local` afterwards)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.rm([f"fsar/stores/tiny/{k}" for k in keys])
    try:
        yield
    finally:
        for k in keys:
            fs.put_file(str(local / k), f"fsar/stores/tiny/{k}")


def _cli(app: object, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))  # type: ignore[arg-type]
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def test_a_store_in_a_bucket_gives_the_directory_results(uploaded: tuple[str, Path]) -> None:
    url, local = uploaded
    code, remote_out = _cli(cli.store_app, "verify", url)
    assert code == 0, remote_out
    assert remote_out == _cli(cli.store_app, "verify", str(local))[1]
    assert open_store(url).location.kind == "remote"
    eval_args = ("--head", "proto", "--episodes", "20", "--way", "2", "--no-progress")
    code, remote_eval = _cli(cli.eval_app, "--store", url, *eval_args)
    assert code == 0 and "accuracy" in remote_eval, remote_eval
    assert remote_eval == _cli(cli.eval_app, "--store", str(local), *eval_args)[1]


def test_a_chunk_missing_from_the_bucket_is_an_error(uploaded: tuple[str, Path]) -> None:
    url, local = uploaded
    s = open_store(url)
    row = int(s.select(split="test")[0])
    with removed(local, f"cls/layer12/c/{row}/0/0/0"):
        with pytest.raises(MissingChunkError, match=rf"{url}/cls/layer12/c/{row}/0/0/0"):
            s.array("cls/layer12")[row]
        code, out = _cli(cli.store_app, "verify", url)
    assert code == 1 and f"BAD row {row} (" in out and "cls/layer12: unreadable chunk" in out


def test_the_cache_serves_a_second_read_from_disk(
    uploaded: tuple[str, Path], tmp_path: Path
) -> None:
    url, local = uploaded
    s = open_store(url, cache=tmp_path / "cache")
    rows = s.select(split="test")
    first = s.read(rows, ["cls/layer12"])["cls/layer12"]
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    cached = {p.read_bytes() for p in folder.iterdir() if p.name != "SOURCE"}
    keys = [f"cls/layer12/c/{r}/0/0/0" for r in rows]
    assert cached == {(local / k).read_bytes() for k in keys}
    with removed(local, *keys):  # every chunk now comes from the cache or not at all
        again = open_store(url, cache=tmp_path / "cache").read(rows, ["cls/layer12"])
    assert (again["cls/layer12"] == first).all()
