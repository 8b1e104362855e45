"""A run folder and its checkpoints are untrusted input: links are refused (nothing is written
outside), a cut metrics record is dropped on resume, curves come from a bounded tail, a full disk or
a crash before the first checkpoint leaves no half-made run, declared sizes are bounded first."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

import cli
import heads
from heads.checkpoint import CheckpointError, read_metadata
from heads.clip_block import LastBlock, load_last_block
from heads.config import ConfigError
from heads.curves import metric_records, plot_curves
from heads.train import RUN_FILES, TrainConfig, build_head, train
from store.errors import CorruptStoreError

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("quiet_allocator")

TRAIN = ["--episodes", "4", "--episodes-per-step", "2", "--val-every", "4", "--val-episodes", "4",
         "--query", "1", "--no-progress"]  # fmt: skip


def cli_train(*args: object, crash: bool = False) -> tuple[int, str]:
    """fsar-train's exit code and output (`crash`: a traceback is allowed too)."""
    result = runner.invoke(cli.train_app, [str(a) for a in args])
    ok = result.exception is None or isinstance(result.exception, SystemExit)
    assert ok or crash, repr(result.exception)
    return result.exit_code, result.output


def small(store: Path, out: Path, **kw) -> TrainConfig:  # type: ignore[no-untyped-def]
    base = dict(store=str(store), head="emp", episodes=4, episodes_per_step=2, val_every=4,
                val_episodes=4, query=1, out=str(out), progress=False)  # fmt: skip
    return TrainConfig(**(base | kw)).resolved()


@pytest.fixture(scope="module")
def finished(pair_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(small(pair_store, tmp_path_factory.mktemp("runs") / "run"))


def copy_run(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


# ---------------------------------------------------------------------- links, cut records
@pytest.mark.parametrize("name", ["curves.png", "metrics.jsonl", "last.safetensors"])
def test_resume_refuses_run_files_that_link_outside(
    finished: Path, pair_store: Path, tmp_path: Path, name: str
) -> None:
    run = copy_run(finished, tmp_path)
    outside = tmp_path / "outside"
    outside.write_bytes(b"someone else's file")
    (run / name).unlink()
    (run / name).symlink_to(outside)
    code, out = cli_train("--resume", "--out", run, "--episodes", "8")
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert f"{run / name} is a link" in out
    assert outside.read_bytes() == b"someone else's file"


def test_a_cut_last_metrics_record_is_dropped_on_resume(finished: Path, tmp_path: Path) -> None:
    run = copy_run(finished, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"episode": 6, "kind": "tr')  # a kill (or a full disk) mid-record
    code, out = cli_train("--resume", "--out", run, "--episodes", "8")
    assert code == 0, out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in records if "val_accuracy" in r] == [4, 8]
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_curves_come_from_a_bounded_tail_of_a_huge_log(finished: Path, tmp_path: Path) -> None:
    """A 300 MB metrics.jsonl (sparse: 300 MB of NUL bytes before the run's records): the curves and
    the resume read only its tail; the old plot parsed the whole file at every validation."""
    run = copy_run(finished, tmp_path)
    records = (run / "metrics.jsonl").read_bytes()
    with open(run / "metrics.jsonl", "wb") as f:
        f.truncate(300 << 20)
        f.seek(300 << 20)
        f.write(b"\n" + records + b'{"episode": 1e999, "loss": [[[')
    assert (run / "metrics.jsonl").stat().st_size > 300 << 20
    tracemalloc.start()
    try:
        assert len(metric_records(run / "metrics.jsonl", 8 << 20)) == len(records.splitlines())
        plot_curves(run)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB"
    code, out = cli_train("--resume", "--out", run, "--episodes", "8")
    assert code == 0, out
    assert os.path.getsize(run / "metrics.jsonl") > 300 << 20  # the log itself is kept


DAMAGE = ["link outside", "fifo", "folder", "garbage", "deep json", "empty", "cut", "missing",
          "huge count"]  # fmt: skip


def damage(path: Path, how: str, outside: Path) -> None:
    path.unlink()
    if how == "link outside":
        path.symlink_to(outside)
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "folder":
        path.mkdir()
    elif how == "garbage":
        path.write_bytes(b"\x00\xff{[" * 100)
    elif how == "deep json":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "cut":
        path.write_bytes(b'{"config": {"episodes": 4, "store": "x"')
    elif how == "huge count":
        path.write_text(json.dumps({"config": {"episodes": 10**12, "val_episodes": 10**12}}))


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(st.sampled_from(RUN_FILES), st.sampled_from(DAMAGE), min_size=1, max_size=3))
def test_a_damaged_run_folder_resumes_or_is_refused_in_one_line(
    finished: Path, pair_store: Path, tmp_path_factory: pytest.TempPathFactory, damages: dict
) -> None:
    """Whatever is done to a run's files, `--resume` and `fsar-eval --checkpoint` answer or refuse
    in one line (exit 2), never hang, and write nothing outside the run."""
    where = tmp_path_factory.mktemp("damaged")
    run = copy_run(finished, where)
    outside = where / "outside"
    outside.write_bytes(b"someone else's file")
    for name, how in damages.items():
        damage(run / name, how, outside)
    code, out = cli_train("--resume", "--out", run)
    assert code == 0 or (code == 2 and len(out.strip().splitlines()) == 1), out
    result = runner.invoke(cli.eval_app, ["--checkpoint", str(run), "--store", str(pair_store),
                                          "--episodes", "2", "--no-progress"])  # fmt: skip
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 0 or (
        result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    ), result.output
    assert outside.read_bytes() == b"someone else's file"
    assert {p.name for p in where.iterdir()} <= {"outside", "run", "latest"}


# ---------------------------------------------------------------------- nothing half-made
def loop_fails(run: object, stop_at: object) -> None:
    raise RuntimeError("a bug in the training loop")


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(
    pair_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that fails before its first checkpoint (`--option dim=3` did; it is now refused before
    anything is written) used to leave a config.json that refused the rerun as 'already holds a run'."""
    out = tmp_path / "runs" / "r"
    with monkeypatch.context() as patch:
        patch.setattr("heads.train._loop", loop_fails)
        code, text = cli_train("--store", pair_store, "--out", out, *TRAIN, crash=True)
    assert code != 0
    assert not out.parent.exists() or list(out.parent.iterdir()) == [], text
    code, text = cli_train("--store", pair_store, "--out", out, *TRAIN)
    assert code == 0, text
    assert (out / "best.safetensors").is_file() and (out.parent / "latest").resolve() == out


def test_a_full_disk_during_training_is_one_line_and_leaves_no_run(
    pair_store: Path, small_disk: Path
) -> None:
    """The run's first checkpoint (360 KiB of weights and Adam state) does not fit a 256 KiB disk."""
    code, out = cli_train("--store", pair_store, "--out", small_disk / "run", *TRAIN)
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert "the disk is full" in out and "last.safetensors" in out
    assert [p.name for p in small_disk.iterdir()] == []


def test_overwrite_replaces_the_old_run_only_at_the_new_ones_first_checkpoint(
    finished: Path, pair_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = copy_run(finished, tmp_path)
    (run / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with monkeypatch.context() as patch:
        patch.setattr("heads.train._loop", loop_fails)
        code, _ = cli_train("--store", pair_store, "--out", run, *TRAIN, "--overwrite", crash=True)
    assert code != 0 and {p.name: p.read_bytes() for p in run.iterdir()} == before
    code, out = cli_train("--store", pair_store, "--out", run, *TRAIN, "--overwrite", "--seed", "5")
    assert code == 0, out
    assert json.loads((run / "config.json").read_text())["config"]["seed"] == 5
    assert (run / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run"]  # no temp folder


# ---------------------------------------------------------------------- bounded before built
@pytest.mark.parametrize(
    ("option", "value"), [("val_episodes", 10**12), ("episodes", 10**12), ("seed", -1)]
)
def test_run_config_numbers_are_bounded_before_anything_is_built(
    finished: Path, tmp_path: Path, option: str, value: int
) -> None:
    """A run's config.json is untrusted: val_episodes 10**12 used to reach the validation's
    allocation (a traceback); now --resume refuses it in one line, naming the file and option."""
    run = copy_run(finished, tmp_path)
    saved = json.loads((run / "config.json").read_text())
    saved["config"][option] = value
    (run / "config.json").write_text(json.dumps(saved))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, out = cli_train("--resume", "--out", run, "--episodes", "8")
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert f"{run / 'config.json'}" in out and option.replace("_", "-") in out
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_checkpoint_metadata_nested_deeply_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "best.safetensors"
    deep = "[" * 50_000 + "]" * 50_000
    save_file({"model/w": torch.zeros(1)}, str(path), metadata={"meta": deep, "head": "emp"})
    with pytest.raises(CheckpointError, match="meta nests JSON more than 64 levels deep"):
        read_metadata(path)
    os.mkfifo(tmp_path / "fifo.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_metadata(tmp_path / "fifo.safetensors")


def test_a_last_block_config_claiming_width_8192_is_refused_before_building(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 220-byte weights file whose config says width 8192 used to build a 3.8 GB block first."""
    small_block = LastBlock(width=48, heads=4, dim=32)
    config = {**small_block.config, "width": 8192}
    built_on: list[str] = []
    init = LastBlock.__init__

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        built_on.append(str(torch.get_default_device()))
        init(self, *args, **kwargs)

    monkeypatch.setattr(LastBlock, "__init__", spy)
    with pytest.raises(CorruptStoreError, match="has shape .*expected"):
        load_last_block(small_block.state_tensors(), config)
    assert built_on == ["meta"]
    with pytest.raises(CorruptStoreError, match="beyond any CLIP's"):
        load_last_block(small_block.state_tensors(), {**config, "width": 65536})


def test_a_spec_with_a_huge_dim_is_refused_before_the_head_is_allocated() -> None:
    """A spec with D = 32768 asks the probe head for a 4.3 GB projection: refused, nothing built."""
    store = SimpleNamespace(spec={"dim": 32768, "layers": [12]}, manifest=None)
    with pytest.raises(ConfigError, match=r"probe.*dim 32768.*4.3 GB of weights"):
        build_head("probe", {}, store, torch.device("cpu"))
    assert heads.registry.factory("probe")  # (the head itself is fine at CLIP's shapes)


def test_study_files_go_through_the_gate(tmp_path: Path) -> None:
    """A study folder is shared like a run: a FIFO is refused (it blocked for ever), deeply nested
    episode metadata is dropped (it was a RecursionError), a cell.json link is not followed."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from heads.study.folder import EPISODES_KEY, StudyError, read_json, read_per_episode

    os.mkfifo(tmp_path / "fifo.parquet")
    with pytest.raises(StudyError, match="not a regular file"):
        read_per_episode(tmp_path / "fifo.parquet")
    table = pa.table({"episode": np.arange(3), "accuracy": np.array([1.0, 0.0, 1.0])})
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    pq.write_table(table.replace_schema_metadata({EPISODES_KEY: deep}), tmp_path / "e.parquet")
    episode, accuracy, meta = read_per_episode(tmp_path / "e.parquet")
    assert list(episode) == [0, 1, 2] and accuracy.tolist() == [1.0, 0.0, 1.0] and meta is None
    (tmp_path / "outside.json").write_text('{"status": "ok"}')
    (tmp_path / "cell.json").symlink_to(tmp_path / "outside.json")
    assert read_json(tmp_path / "cell.json") is None
