"""No traceback anywhere a user can reach: every command, given a value no run can use, a file that
is not one, an exhausted machine or a bad FSAR_* variable, prints one line naming it and exits 2,
and writes nothing; an error that is not the user's (a bug) keeps its traceback."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cli

pytestmark = pytest.mark.usefixtures("quiet_allocator")

HUGE = "1000000000000"  # 10**12
STORE, OUT, DATA = "{store}", "{out}", "{data}"


def only_line(app, args: list[str]) -> str:  # type: ignore[no-untyped-def]
    """The one line a refused command prints (asserting exit 2, no traceback, nothing else)."""
    result = CliRunner().invoke(app, args)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, lines, repr(result.exception))
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    for split, names in (("train", "ab"), ("val", "cd"), ("test", "ef")):
        for name in names:
            (root / split / name).mkdir(parents=True)
            (root / split / name / "v0.mp4").write_bytes(b"never decoded here")
    return root


EXTRACT = ["--dataset", "folder", "--data-root", DATA, "--store", OUT, "--pretrained", "none"]
CASES = [
    # fsar-eval
    (cli.eval_app, ["--store", STORE, "--head", "proto", "--episodes", HUGE], f"--episodes {HUGE}"),
    (cli.eval_app, ["--store", STORE, "--head", "proto", "--seed", "-1"], "--seed -1"),
    (cli.eval_app, ["--store", STORE, "--head", "proto", "--max-ram", "nan"], "--max-ram nan"),
    (cli.eval_app, ["--store", STORE, "--head", "proto", "--max-ram", "inf"], "--max-ram inf"),
    (cli.eval_app, ["--store", STORE, "--head", "emp", "--option", "dim=-1"], "--option dim=-1"),
    (cli.eval_app, ["--store", STORE, "--head", "emp", "--option", "dim=1e9"], "--option dim=1000000000.0"),
    (cli.eval_app, ["--store", STORE, "--head", "emp", "--option", "heads=1e9"], "--option heads=1000000000.0"),
    (cli.eval_app, ["--store", STORE, "--head", "otam", "--option", "otam_lambda=NaN"], "otam_lambda=nan"),
    (cli.eval_app, ["--store", STORE, "--head", "tsfsar", "--option", "taps=a,b"], "taps must be whole numbers"),
    (cli.eval_app, ["--store", STORE, "--head", "tsfsar", "--option", "side_heads=3"], "not a multiple of its 3 heads"),
    (cli.eval_app, ["--store", STORE, "--head", "proto", "--option", "k"], "--option takes KEY=VALUE"),
    (cli.eval_app, ["--store", STORE, "--head", "otam", "--option", "otam_lambda=0"], "otam_lambda=0: head 'otam' takes a number above 0"),
    (cli.eval_app, ["--store", STORE, "--head", "otam", "--option", "otam_lambda=1e23"], "otam_lambda=1e+23"),
    (cli.eval_app, ["--store", STORE, "--head", "emp", "--option", "attn_dropout=1"], "attn_dropout=1: head 'emp' takes a number from 0 to 0.999"),
    (cli.eval_app, ["--store", STORE, "--head", "proto", "--episodes", "abc"], "'--episodes'"),
    (cli.eval_app, ["--store", STORE, "--head", "proto", "--episodez", "5"], "--episodez"),
    # fsar-train
    (cli.train_app, ["--store", STORE, "--out", OUT, "--episodes", HUGE], f"--episodes {HUGE}"),
    (cli.train_app, ["--store", STORE, "--out", OUT, "--seed", "-1"], "--seed -1"),
    (cli.train_app, ["--store", STORE, "--out", OUT, "--lr", "nan"], "--lr nan"),
    (cli.train_app, ["--store", STORE, "--out", OUT, "--val-episodes", HUGE], "--val-episodes"),
    (cli.train_app, ["--store", STORE, "--out", OUT, "--option", "dim=3"], "--option dim=3"),
    (cli.train_app, ["--store", STORE, "--out", OUT, "--option", "dim=-1"], "--option dim=-1"),
    (cli.train_app, ["--store", STORE, "--out", OUT, "--option", "heads=0"], "heads, head_dim and ffn_dim must be at least 1"),
    (cli.eval_app, ["--store", STORE, "--head", "emp", "--option", "heads=0"], "head 'emp': heads, head_dim and ffn_dim"),
    # fsar-extract: refused before the dataset, the model or the store is touched
    (cli.extract_app, [*EXTRACT, "--frames", "0"], "--frames 0"),
    (cli.extract_app, [*EXTRACT, "--frames", HUGE], "--frames"),
    (cli.extract_app, [*EXTRACT, "--views", "100000"], "--views 100000"),
    (cli.extract_app, [*EXTRACT, "--timeout", "nan"], "--timeout nan"),
    (cli.extract_app, [*EXTRACT, "--timeout", "-1"], "--timeout -1"),
    (cli.extract_app, [*EXTRACT, "--batch-size", "0"], "--batch-size 0"),
    (cli.extract_app, [*EXTRACT, "--workers", "0"], "--workers 0"),
    (cli.extract_app, [*EXTRACT, "--recipe", "nope"], "--recipe 'nope'"),
    (cli.extract_app, [*EXTRACT, "--decode", "nope"], "--decode nope"),
    # fsar-synth
    (cli.synth_app, ["--out", OUT, "--classes", "6", "--seed", "-1"], "--seed -1"),
    (cli.synth_app, ["--out", OUT, "--classes", "7"], "--classes 7"),
    (cli.synth_app, ["--out", OUT, "--videos-per-class", HUGE], "--videos-per-class"),
    # fsar-study
    (cli.study_app, ["--store", STORE, "--plan", "baselines", "--out", OUT, "--seeds", "-1"], "--seeds -1"),
    (cli.study_app, ["--store", STORE, "--plan", "baselines", "--out", OUT, "--episodes", HUGE], "--episodes"),
    (cli.study_app, ["--store", STORE, "--plan", "baselines", "--out", OUT, "--max-ram", "nan"], "--max-ram nan"),
    (cli.study_app, ["--store", STORE, "--plan", "baselines", "--out", OUT, "--workers", "0"], "--workers 0"),
    (cli.study_app, ["--store", STORE, "--plan", "baselines", "--out", OUT, "--train", "lr"], "--train takes KEY=VALUE"),
    # fsar-store
    (cli.store_app, ["info", OUT], "store not found"),
    (cli.store_app, ["nosuch"], "No such command 'nosuch'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("app", "args", "names"),
    CASES,
    ids=[f"{a.info.name or ''}{' '.join(x[-2:])}" for a, x, _ in CASES],
)
def test_every_command_refuses_a_bad_value_in_one_line(  # type: ignore[no-untyped-def]
    app, args: list[str], names: str, pair_store: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    filled = [a.format(store=pair_store, out=out, data=data) for a in args]
    line = only_line(app, filled)
    assert names in line, line
    assert not out.exists()  # nothing written


UNDER_A_FILE = [
    (cli.store_app, ["pack", STORE, OUT], "OUT"),
    (cli.store_app, ["merge", STORE, STORE, "--out", OUT], "--out"),
    (cli.store_app, ["subset", STORE, "--out", OUT, "--splits", "test"], "--out"),
    (cli.synth_app, ["--out", OUT, "--classes", "6"], "--out"),
    (cli.train_app, ["--store", STORE, "--out", OUT], "--out"),
    (cli.study_app, ["--store", STORE, "--plan", "baselines", "--out", OUT], "--out"),
    (cli.extract_app, EXTRACT, "--store"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("app", "args", "option"), UNDER_A_FILE, ids=[x[0] for _, x, _ in UNDER_A_FILE]
)
def test_an_output_under_a_file_is_one_line(  # type: ignore[no-untyped-def]
    app, args: list[str], option: str, pair_store: Path, data: Path, tmp_path: Path
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    out = a_file / "out"
    line = only_line(app, [a.format(store=pair_store, out=out, data=data) for a in args])
    assert line == f"error: {option} {out}: {a_file} is a file, not a folder"
    assert a_file.read_text() == "mine"


def test_config_files_that_are_not_small_json_files(pair_store: Path, tmp_path: Path) -> None:
    """A FIFO would block forever, a deeply nested document exhausts the parser's recursion."""
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    shallow_enough = tmp_path / "deep.json"
    shallow_enough.write_text('{"head_options": ' + "[" * 40 + "]" * 40 + "}")
    out = tmp_path / "run"
    for config, names in ((fifo, "not a regular file"), (nested, "nested deeper than"),
                          (shallow_enough, "nested deeper than"), (tmp_path, "not a regular file")):  # fmt: skip
        line = only_line(
            cli.train_app, ["--store", str(pair_store), "--config", str(config), "--out", str(out)]
        )
        assert f"--config {config}: {names}" in line
    assert not out.exists()
    args = ["--store", str(pair_store), "--out", str(out), "--plan"]
    line = only_line(cli.study_app, [*args, str(nested)])
    assert f"plan {nested}: nested deeper than" in line
    line = only_line(cli.study_app, [*args, str(fifo)])
    assert f"--plan {fifo}: not a built-in plan" in line
    assert not out.exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_under_an_output_is_one_line_naming_it(
    pair_store: Path, tmp_path: Path
) -> None:
    args = ["--store", str(pair_store), "--head", "proto", "--episodes", "5", "--no-progress"]
    line = only_line(cli.eval_app, [*args, "--json", "/dev/full"])
    assert line == "error: --json /dev/full: cannot write it (No space left on device)"
    kept = tmp_path / "result.json"
    kept.write_text("mine")
    real_replace = os.replace

    def disk_full(source: object, target: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    os.replace = disk_full  # the rename at the end fails as a full disk would
    try:
        line = only_line(cli.eval_app, [*args, "--json", str(kept)])
    finally:
        os.replace = real_replace
    assert line == f"error: --json {kept}: cannot write it (No space left on device)"
    assert kept.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [kept.name]


def test_an_output_pipe_is_written_while_read_and_refused_unread(
    pair_store: Path, tmp_path: Path
) -> None:
    """A pipe nobody reads would block for ever (pyarrow retries its open through Ctrl-C)."""
    import io

    import pandas as pd

    fifo = tmp_path / "episodes"
    os.mkfifo(fifo)
    args = ["--store", str(pair_store), "--head", "proto", "--episodes", "5", "--no-progress"]
    line = only_line(cli.eval_app, [*args, "--per-episode", str(fifo)])
    assert line == (
        f"error: --per-episode {fifo}: a pipe that nobody reads; start its reader first, or give "
        "a file name"
    )
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader (the file fits the pipe)
    try:
        result = CliRunner().invoke(cli.eval_app, [*args, "--per-episode", str(fifo)])
        assert result.exit_code == 0, result.output
        received = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    assert list(pd.read_parquet(io.BytesIO(received))["episode"]) == [0, 1, 2, 3, 4]


def test_compare_refuses_a_pipe_unread(tmp_path: Path) -> None:
    fifo = tmp_path / "a.parquet"
    os.mkfifo(fifo)
    line = only_line(cli.study_app, ["compare", str(fifo), str(fifo)])
    assert line.startswith(f"error: per-episode file {fifo} is not a regular file")


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_an_allocation_that_fails_is_one_line_saying_what_to_do(  # type: ignore[no-untyped-def]
    pair_store: Path, monkeypatch, library: str
) -> None:
    """numpy raises MemoryError, torch a RuntimeError: both are the machine's limit, not a bug."""
    import torch

    def allocate(*args: object, **kwargs: object) -> None:
        np.zeros(1 << 45) if library == "numpy" else torch.empty(1 << 50)

    monkeypatch.setattr("heads.eval_run.evaluate", allocate)
    line = only_line(cli.eval_app, ["--store", str(pair_store), "--head", "proto"])
    assert line.startswith("error: out of memory: ") and "lower --max-ram" in line
    assert ("TiB" if library == "numpy" else "bytes") in line


def test_a_full_disk_anywhere_is_one_line_naming_the_file(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    video = tmp_path / "data" / "train" / "x.mp4"

    def disk_full(path: object, *args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(video))

    monkeypatch.setattr("pipeline.synth.write_video", disk_full)
    line = only_line(cli.synth_app, ["--out", str(tmp_path / "data"), "--classes", "6"])
    assert (
        line
        == f"error: No space left on device writing {video}: free space or choose another location, then run it again"
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [("FSAR_REMOTE_RETRIES", "abc"), ("FSAR_REMOTE_RETRIES", "0"), ("FSAR_REMOTE_TIMEOUT", "abc"),
     ("FSAR_REMOTE_TIMEOUT", "nan"), ("FSAR_REMOTE_TIMEOUT", "-1")],
)  # fmt: skip
def test_a_bad_fsar_variable_is_one_line_naming_it(monkeypatch, variable: str, value: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(variable, value)
    line = only_line(
        cli.store_app, ["info", "http://127.0.0.1:9/store"]
    )  # refused before connecting
    assert line.startswith(f"error: {variable}={value!r}: use ") and line.endswith("(or unset it)")


def test_a_cache_folder_that_cannot_be_one_is_one_line_naming_it(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """--cache and FSAR_CACHE are checked before the server is asked (port 9: nothing answers)."""
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    url = "http://127.0.0.1:9/store"
    for cache, why in ((a_file, "not a folder"), (a_file / "sub", "Not a directory")):
        line = only_line(cli.store_app, ["info", url, "--cache", str(cache)])
        assert line == (
            f"error: --cache {cache}: cannot keep a cache there ({why}); give a folder fsar can "
            "write, or unset it"
        )
    monkeypatch.setenv("FSAR_CACHE", str(a_file))
    line = only_line(cli.eval_app, ["--store", url, "--head", "proto"])
    assert line.startswith(f"error: FSAR_CACHE={str(a_file)!r}: cannot keep a cache there")
    assert a_file.read_text() == "mine"


def test_a_bad_verify_switch_is_one_line(pair_store: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FSAR_VERIFY_READS", "maybe")
    line = only_line(cli.eval_app, ["--store", str(pair_store), "--head", "proto"])
    assert line == "error: FSAR_VERIFY_READS='maybe': use 1 or 0 (or unset it)"


@pytest.mark.slow
def test_a_refused_remote_read_stays_one_line_run_after_run(tmp_path: Path) -> None:
    """A chunk read the server refuses ends a batch read at once while its other reads are still in
    flight: at exit they must not print "Task was destroyed but it is pending!" (it did in about
    half of the runs), so the error stays one line every time."""
    import subprocess
    import sys

    from tests.share_fixtures import make_store
    from tests.store_http import serve

    make_store(tmp_path / "s")
    env = dict(os.environ, FSAR_REMOTE_RETRIES="1", FSAR_REMOTE_TIMEOUT="2")
    with serve(tmp_path) as (base, faults):
        for chunk in (tmp_path / "s" / "cls").rglob("c/**/*"):
            if chunk.is_file():
                faults.by_path["/" + chunk.relative_to(tmp_path).as_posix()] = "500"
        args = ["eval", "--store", f"{base}/s", "--head", "proto", "--way", "2", "--no-progress"]
        for _ in range(6):
            run = subprocess.run(
                [sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env,
                cwd=Path(cli.__file__).parent, timeout=300,
            )  # fmt: skip
            lines = [line for line in run.stderr.splitlines() if line.strip()]
            assert run.returncode == 2 and len(lines) == 1, run.stderr[-3000:]
            assert lines[0].startswith("error: cannot read ") and "500" in lines[0]
