"""Runs are never lost: options checked before --out is touched, no silent overwrite, runs/latest
moves only for a run that started, --resume checks the store, early checkpoints, checked run files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import cli
import heads
from heads.checkpoint import CheckpointError, save_checkpoint
from heads.evaluate import load_run
from heads.train import TrainConfig, train
from store import open_store
from tests.share_fixtures import set_rows

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("quiet_allocator")


@pytest.fixture(scope="module")
def store(pair_store: Path) -> Path:
    return pair_store


TRAIN = ["--episodes", "8", "--episodes-per-step", "2", "--val-every", "4", "--val-episodes", "10",
         "--query", "1", "--no-progress", "--lr", "1e-3"]  # fmt: skip


def small(store: Path, out: Path, **kw) -> TrainConfig:  # type: ignore[no-untyped-def]
    base = dict(store=str(store), head="emp", episodes=8, episodes_per_step=2, val_every=4,
                val_episodes=10, query=1, out=str(out), progress=False, lr=1e-3)  # fmt: skip
    return TrainConfig(**(base | kw)).resolved()


def cli_train(*args: object) -> tuple[int, str]:
    result = runner.invoke(cli.train_app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result.exit_code, result.output


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("finished") / "runs"
    code, out = cli_train("--store", store, "--out", runs / "r1", *TRAIN)
    assert code == 0, out
    return runs / "r1"


# ---------------------------------------------------------------------- nothing lost
@pytest.mark.parametrize(
    "bad",
    [
        ["--episodes-per-step", "0"],
        ["--val-every", "3"],  # not a multiple of --episodes-per-step
        ["--val-way", "9"],  # found only once the store is open
        ["--store", "missing-store"],
        ["--head", "nohead"],
        ["--option", "levels=nonsense"],
    ],
)
def test_a_bad_option_never_touches_an_existing_run(
    finished: Path, store: Path, bad: list[str]
) -> None:
    runs = finished.parent
    before, latest = snapshot(finished), (runs / "latest").resolve()
    args = ["--store", store, "--out", finished, *TRAIN, "--overwrite", *bad]  # even so
    code, out = cli_train(*args)
    assert code == 2 and out.startswith("error: ") and len(out.strip().splitlines()) == 1, out
    assert snapshot(finished) == before
    assert (runs / "latest").resolve() == latest


def test_an_existing_run_needs_resume_or_overwrite(finished: Path, store: Path) -> None:
    before = snapshot(finished)
    code, out = cli_train("--store", store, "--out", finished, *TRAIN)
    assert code == 2 and f"--out {finished} already holds a run" in out
    assert "--resume" in out and "--overwrite" in out
    assert snapshot(finished) == before
    copy = finished.parent / "copy"
    shutil.copytree(finished, copy)
    (copy / "notes.txt").write_text("mine")
    code, out = cli_train("--store", store, "--out", copy, *TRAIN, "--overwrite", "--seed", "3")
    assert code == 0, out
    assert json.loads((copy / "config.json").read_text())["config"]["seed"] == 3
    assert (copy / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    code, out = cli_train("--store", store, "--out", copy, "--resume", "--overwrite")
    assert code == 2 and "not both" in out


def test_latest_moves_only_when_a_run_starts(finished: Path, store: Path) -> None:
    runs = finished.parent
    (runs / "latest").unlink()
    (runs / "latest").symlink_to(finished.name)
    code, _ = cli_train("--store", store, "--out", runs / "r2", *TRAIN, "--val-way", "9")
    assert code == 2 and not (runs / "r2").exists()
    assert (runs / "latest").resolve() == finished.resolve()
    code, _ = cli_train("--store", store, "--out", runs / "r3", *TRAIN)
    assert code == 0 and (runs / "latest").resolve() == (runs / "r3").resolve()


def test_resume_refuses_a_changed_store(store: Path, tmp_path: Path) -> None:
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    run = train(small(copy, tmp_path / "run"), stop_at=4)
    before = snapshot(run)
    set_rows(copy, [0], "failed", "removed later")  # the store is no longer the one trained on
    code, out = cli_train("--resume", "--out", run)
    assert code == 2 and "has changed since" in out and "fingerprint" in out
    assert snapshot(run) == before


# ---------------------------------------------------------------------- early checkpoints
def _same_run(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "last.safetensors")), load_file(str(b / "last.safetensors"))
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key
    records = [
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (a, b)
    ]
    keep = ("episode", "loss", "lr", "val_accuracy")
    assert [{k: r.get(k) for k in keep} for r in records[0]] == [
        {k: r.get(k) for k in keep} for r in records[1]
    ]


@pytest.mark.parametrize("killed_at", [1, 2, 3])
def test_killed_before_the_first_validation_resumes_exactly(
    store: Path, tmp_path: Path, killed_at: int
) -> None:
    """Killed after 1 episode (no optimiser step yet), 1 step or 1 step and a half: --resume
    finishes the run with the weights and metrics of an uninterrupted one."""
    full = train(small(store, tmp_path / "full"))
    part = tmp_path / "part"
    train(small(store, part), stop_at=killed_at)
    assert (part / "last.safetensors").exists() == (killed_at >= 2)
    lines = (part / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["kind"] == "train" for line in lines)  # no validation yet
    code, out = cli_train("--resume", "--out", part)
    assert code == 0, out
    _same_run(full, part)


# ---------------------------------------------------------------------- run files checked
def _eval_run(run: Path, store: Path) -> tuple[int, str]:
    result = runner.invoke(
        cli.eval_app,
        ["--checkpoint", str(run), "--store", str(store), "--episodes", "5", "--no-progress"],
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result.exit_code, result.output


def test_damaged_run_files_are_one_line(finished: Path, store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    code, out = _eval_run(run, store)
    assert code == 0 and "accuracy" in out

    (run / "config.json").write_text('{"config": {}}')  # no store named
    result = runner.invoke(cli.eval_app, ["--checkpoint", str(run), "--episodes", "5"])
    assert result.exit_code == 2 and f"{run / 'config.json'} is not a run's config" in result.output

    data = bytearray((finished / "best.safetensors").read_bytes())
    data[-3] ^= 0xFF  # a weight changed on disk
    (run / "best.safetensors").write_bytes(bytes(data))
    code, out = _eval_run(run, store)
    assert code == 2 and f"checkpoint {run / 'best.safetensors'} fails its checksum" in out

    (run / "best.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    code, out = _eval_run(run, store)
    assert code == 2 and "is not a readable safetensors file" in out

    (run / "best.safetensors").unlink()
    (run / "last.safetensors").unlink()
    code, out = _eval_run(run, store)
    assert code == 2 and f"no checkpoint in {run}" in out


def test_config_is_checked_against_weight_shapes_before_building(
    finished: Path, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = open_store(store)
    real = heads.create("emp", dim=32)
    real.prepare(s)
    meta = {"store_spec": s.spec, "episode": 8}
    built_on: list[str] = []
    create = heads.registry.create

    def spy(name, **cfg):  # type: ignore[no-untyped-def]
        built_on.append(str(torch.get_default_device()))
        return create(name, **cfg)

    monkeypatch.setattr(heads.registry, "create", spy)
    for i, (config, message) in enumerate(
        (
            ({**real.config(), "dim": 4096}, "its head config needs"),  # a 1.9 GB model
            ({**real.config(), "head_dim": 8}, "its head config needs"),
            ({**real.config(), "heads": -1}, "does not build"),
        )
    ):
        run = tmp_path / f"run{i}"
        run.mkdir()
        shutil.copy(finished / "config.json", run / "config.json")
        monkeypatch.setattr(real, "config", lambda c=config: c)
        save_checkpoint(run / "best.safetensors", real, meta)
        built_on.clear()
        with pytest.raises(CheckpointError, match=message):
            load_run(run, s)
        assert built_on and set(built_on) == {"meta"}  # nothing real was allocated
        code, out = _eval_run(run, store)
        assert code == 2 and out.startswith("error: checkpoint ") and message in out
    # fewer levels: the per-score scales no longer fit, refused before building
    monkeypatch.setattr(real, "config", lambda: {**config, "heads": 4, "levels": "token"})
    save_checkpoint(run / "best.safetensors", real, meta)
    code, out = _eval_run(run, store)
    assert code == 2 and "log_scale is [6], its head config needs [2]" in out
    # a smaller head than the weights (fewer levels, fixed scales): built, then refused naming a weight
    monkeypatch.setattr(
        real,
        "config",
        lambda: {**config, "heads": 4, "levels": "token", "learn_temperature": False},
    )
    save_checkpoint(run / "best.safetensors", real, meta)
    code, out = _eval_run(run, store)
    assert code == 2 and "does not fit its head: unexpected weights" in out
