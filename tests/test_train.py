"""Training: learning on time-reversal pairs, resume equality, no open_clip, schedule, lastlayer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import heads
from heads.config import PRESETS, TrainConfig
from heads.evaluate import evaluate
from heads.train import learning_rate, train
from store import open_store

ROOT = Path(__file__).resolve().parents[1]


def small_config(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(store=str(store), head="emp", episodes=8, episodes_per_step=2, val_every=4, val_episodes=20,
                out=str(out), progress=False, lr=1e-3)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base).resolved()


def test_resume_equals_uninterrupted(pair_store: Path, tmp_path: Path) -> None:
    full = train(small_config(pair_store, tmp_path / "full"))
    part = small_config(pair_store, tmp_path / "part")
    train(part, stop_at=4)
    train(part, resume=True)
    a, b = (
        load_file(str(full / "last.safetensors")),
        load_file(str(tmp_path / "part" / "last.safetensors")),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def accuracies(run: Path) -> list[float]:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["val_accuracy"] for r in lines if r.get("kind") != "train"]

    assert accuracies(full) == accuracies(tmp_path / "part")


def test_train_and_eval_without_open_clip(pair_store: Path, tmp_path: Path) -> None:
    guard = (
        "import sys; sys.modules['open_clip'] = None; sys.modules['pipeline.encoder'] = None\n"
        "from cli import app\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'open_clip' not in [m for m, v in sys.modules.items() if v is not None]\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for args in (
        ["train", "--store", str(pair_store), "--episodes", "4", "--episodes-per-step", "2", "--val-every", "4",
         "--val-episodes", "10", "--out", "runs/guarded", "--no-progress"],
        ["eval", "--episodes", "50", "--no-progress"],
    ):  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-c", guard, *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
        )
        assert out.returncode == 0, out.stderr[-2000:]
    assert "(95% CI, 50 episodes, 5-way 1-shot, test)" in out.stdout


def test_presets_and_schedule() -> None:
    hmdb = TrainConfig(store="x", preset="hmdb51").resolved()
    assert (hmdb.lr, hmdb.episodes, hmdb.episodes_per_step, hmdb.weight_decay, hmdb.query, hmdb.val_query) == (
        1e-4, 10_000, 8, 1e-3, 5, 1,
    )  # fmt: skip
    # released schedule in iterations (2 episodes each), STEPS_ITER 1000
    lr = lambda it: learning_rate(hmdb, 2 * it)  # noqa: E731
    assert lr(0) == pytest.approx(1e-6) and lr(500) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr(1000) == lr(1999) == pytest.approx(1e-4)
    assert lr(2000) == lr(2999) == pytest.approx(1e-5) and lr(3000) == lr(4999) == pytest.approx(
        1e-6
    )
    full = TrainConfig(store="x", preset="ssv2_full", lr=3e-4).resolved(explicit={"lr"})
    assert (full.lr, full.episodes, full.val_every) == (3e-4, 80_000, 2_000)
    assert set(PRESETS) == {"hmdb51", "ucf101", "kinetics100", "ssv2_small", "ssv2_full"}


def test_lastlayer_cls_path_equals_full_block(last_store: Path) -> None:
    store = open_store(last_store)
    head = heads.create("lastlayer")
    head.prepare(store)
    x = store.read([0, 1], ["tokens/layer12_in"], view=0, as_torch=True)[
        "tokens/layer12_in"
    ].float()
    x = x.reshape(-1, *x.shape[2:])
    assert torch.allclose(head.block(x, cls_only=True), head.block(x)[:, 0], atol=1e-5)


@pytest.mark.parametrize("strategy", ["meta", "finetune"])
def test_lastlayer_trains(last_store: Path, tmp_path: Path, strategy: str) -> None:
    cfg = small_config(
        last_store,
        tmp_path / strategy,
        head="lastlayer",
        head_options={"strategy": strategy},
        lr=1e-4,
    )
    run = train(cfg)
    before = heads.create("lastlayer")
    before.prepare(open_store(last_store))
    after = load_file(str(run / "last.safetensors"))
    assert not torch.equal(after["model/block.mlp.c_fc.weight"], before.block.mlp.c_fc.weight)


def test_lastlayer_novel_fine_tunes_per_episode(last_store: Path) -> None:
    store = open_store(last_store)
    head = heads.create("lastlayer", strategy="novel", novel_steps=2)
    head.prepare(store)
    assert not head.trainable
    result = evaluate(head, store, "test", 3, 1, 1, 4, episodes_per_batch=2)
    assert 0 <= result.accuracy <= 100
    with pytest.raises(ValueError, match="strategy"):
        heads.create("lastlayer", strategy="adapters")


def test_presets_train_the_released_loss_and_defaults_the_short_run() -> None:
    assert TrainConfig(store="x", preset="ucf101").resolved().head_options == {"loss": "released"}
    chosen = TrainConfig(store="x", preset="ucf101", head_options={"loss": "ce"}).resolved()
    assert chosen.head_options == {"loss": "ce"}
    assert TrainConfig(store="x", head="lastlayer", preset="ucf101").resolved().head_options == {}
    short = TrainConfig(store="x", episodes=300, lr=3e-3).resolved()
    assert short.head_options == {} and short.episodes_per_step == 1
    assert (short.warmup_episodes, short.decay_episodes) == (15, [210, 270])
    lr = [learning_rate(short, e) for e in (0, 15, 209, 210, 269, 270, 299)]
    assert lr == pytest.approx([1e-6, 3e-3, 3e-3, 3e-4, 3e-4, 3e-5, 3e-5])


def test_training_loss_records_and_curves(
    pair_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.image

    import heads.train

    monkeypatch.setattr(heads.train, "LOSS_POINTS", 5)  # 12 optimiser steps -> one record per 3
    cfg = small_config(pair_store, tmp_path / "run", episodes=24, episodes_per_step=2, val_every=8)
    run = train(cfg)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in lines if r.get("kind") == "train"]
    validation = [r for r in lines if r.get("kind") != "train"]
    assert [r["episode"] for r in losses] == [6, 12, 18, 24]
    assert [r["lr"] for r in losses] == [learning_rate(cfg, e - 1) for e in (6, 12, 18, 24)]
    assert all(set(r) == {"kind", "episode", "loss", "lr"} and r["loss"] > 0 for r in losses)
    assert [r["episode"] for r in validation] == [8, 16, 24]
    assert all(
        set(r) == {"episode", "loss", "lr", "val_accuracy", "val_ci95", "episodes_per_s", "time"}
        for r in validation
    )
    height, width = matplotlib.image.imread(run / "curves.png").shape[:2]
    assert width > 2.5 * height  # loss, validation accuracy with its CI, learning rate
