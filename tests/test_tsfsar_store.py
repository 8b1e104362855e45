"""`tsfsar` from a store: what `prepare` loads (init file, class descriptions, base classes), the
fallbacks it states, and `fsar-train` / `fsar-eval` end to end on a tiny `ts` store."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import eval_app, train_app
from heads.train import build_head
from heads.tsfsar import TSFSARNotice
from store import open_store
from store.random_store import random_spec, random_tsfsar_init, write_random_store

runner = CliRunner()
TAPS = [0, 2, 4]


@pytest.fixture(scope="module")
def ts_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ts` store of a 4-block ViT (width 48, dim 32; side width 16), taps 0, 2, 4, T 4, 2 views,
    6/6/6 classes of 6 videos, a random side-network init and class descriptions."""
    path = tmp_path_factory.mktemp("tsfsar") / "store"
    spec = random_spec(recipe="ts", taps=TAPS, depth=4, width=48, dim=32, views=2)
    write_random_store(path, spec, {"train": 6, "val": 6, "test": 6}, 6, descriptions=True,
                       tsfsar_init=random_tsfsar_init(spec, seed=3)).close()  # fmt: skip
    return path


@pytest.fixture(scope="module")
def bare_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shapes without init file or descriptions; an `emp` store next to it."""
    root = tmp_path_factory.mktemp("tsfsar-bare")
    spec = random_spec(recipe="ts", taps=TAPS, depth=4, width=48, dim=32)
    write_random_store(root / "ts", spec, {"train": 6, "val": 6, "test": 6}, 6).close()
    write_random_store(root / "emp", random_spec(), {"train": 6, "val": 6, "test": 6}, 6).close()
    return root


def test_prepare_loads_the_init_descriptions_and_base_classes(ts_store: Path) -> None:
    store = open_store(ts_store)
    init, config = store.read_tsfsar_init()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TSFSARNotice)  # nothing to fall back on
        head = build_head("tsfsar", {}, store, torch.device("cpu"))
    assert head.config()["side_width"] == config["side_width"] == 16
    assert head.config()["base_classes"] == 6 and head.base_ids.tolist() == list(range(6))
    # side block j <- CLIP block taps[j + 1]; the Adapter <- adapter.attn.*
    for j, block in enumerate(TAPS[1:]):
        mine = head.side.blocks[j]
        assert np.array_equal(
            mine.attn.q.weight.detach().numpy(), init[f"block{block:02d}.attn.q.weight"]
        )
        assert np.array_equal(
            mine.mlp.fc2.bias.detach().numpy(), init[f"block{block:02d}.mlp.fc2.bias"]
        )
        assert np.array_equal(
            mine.norm2.weight.detach().numpy(), init[f"block{block:02d}.norm2.weight"]
        )
    assert np.array_equal(head.adapter.attn.v.bias.detach().numpy(), init["adapter.attn.v.bias"])
    text, _ = store.text("descriptions")
    assert torch.allclose(head.text_unit, torch.from_numpy(text[:, 0]), atol=1e-6)


def test_missing_or_misfit_init_and_texts_are_said_in_one_line(
    bare_store: Path, ts_store: Path
) -> None:
    with pytest.warns(TSFSARNotice) as caught:
        build_head("tsfsar", {}, open_store(bare_store / "ts"), torch.device("cpu"))
    said = sorted(str(w.message) for w in caught)
    assert said == [
        "tsfsar: the store has no text/descriptions (fsar-extract --class-descriptions FILE); "
        "using the template set text/emp16",
        "tsfsar: the store has no weights/tsfsar_init.safetensors (extract with --recipe ts); the "
        "side network and Adapter start from random weights",
    ]
    with pytest.warns(
        TSFSARNotice,
        match="is for side width 16, MLP ratio 4 and adapter width 32, the head has 32",
    ):
        build_head("tsfsar", {"side_width": 32}, open_store(ts_store), torch.device("cpu"))


def test_train_and_evaluate_from_the_command_line(
    ts_store: Path, bare_store: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = ["--store", str(ts_store), "--head", "tsfsar", "--preset", "hmdb51", "--episodes", "4",
            "--val-every", "2", "--val-episodes", "5", "--val-way", "3", "--out", str(run), "--no-progress"]  # fmt: skip
    result = runner.invoke(train_app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["optimizer"], config["schedule"], config["episodes"]) == ("adamw", "cosine", 4)
    assert config["head_options"]["taps"] == TAPS and config["head_options"]["fuse_clip"] == 0.8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in records if "val_accuracy" in r] == [2, 4]
    evaluated = runner.invoke(eval_app, ["--checkpoint", str(run), "--episodes", "20", "--no-progress",
                                         "--option", "fuse_clip=0", "--option", "fuse_side=0"])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert "(95% CI, 20 episodes, 5-way 1-shot, test)" in evaluated.output
    # fewer taps than the store holds: the depth ablation from one store
    fewer = runner.invoke(train_app, [*args[:-3], "--out", str(tmp_path / "fewer"), "--no-progress",
                                      "--option", "taps=0,4"])  # fmt: skip
    assert fewer.exit_code == 0, fewer.output
    # a store without taps: one line, exit 2
    refused = runner.invoke(eval_app, ["--store", str(bare_store / "emp"), "--head", "tsfsar",
                                       "--episodes", "5", "--no-progress"])  # fmt: skip
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "reads taps 0,1,2,3,4,5,6,7,8,9,10,11,12; the store has none" in refused.output


def test_the_tsfsar_study_plan(ts_store: Path, tmp_path: Path) -> None:
    """The built-in plan: training-free heads, emp, tsfsar on every tap and on fewer taps; rows the
    store cannot serve are left out with the reason; the reported values carry their sources."""
    from heads.study.plans import expand, load_plan

    plan = load_plan("tsfsar")
    vit = {"model": "ViT-B-16", "pretrained": "openai"}
    assert plan.reported.of({**vit, "dataset": "hmdb51"}, "tsfsar", 5) == 88.9
    assert plan.reported.of({**vit, "dataset": "ssv2_full"}, "tsfsar-depth3", 1) == 67.0
    assert plan.reported.of({**vit, "dataset": "kinetics100"}, "emp", 1) == 89.1
    assert plan.reported.of({**vit, "pretrained": "none", "dataset": "hmdb51"}, "tsfsar", 1) is None
    assert sum("README.md:12" in n for n in plan.notes) == 1 and any(
        "poster.pdf" in n for n in plan.notes
    )
    full = tmp_path / "full"
    taps = [0, 2, 4, 6, 8, 10, 12]  # what the plan's rows read from a 12-block ViT
    spec = random_spec(recipe="emp+ts", layers=(4, 8, 12), width=48, dim=32, taps=taps)
    write_random_store(full, spec, {"train": 5, "val": 5, "test": 5}, 6).close()
    served = expand(plan, open_store(full), str(full), episodes=10, train_overrides={"query": 1})
    assert [r.id for r in served.rows] == [
        "zeroshot", "proto", "otam", "emp", "tsfsar", "tsfsar-depth6", "tsfsar-depth3",
    ]  # fmt: skip
    depth3 = next(c for c in served.cells if c.id == "tsfsar-depth3.5shot.seed0")
    assert (
        depth3.head_options["taps"] == [0, 4, 8, 12]
        and depth3.train["head_options"]["taps"] == "0,4,8,12"
    )
    partial = expand(
        plan, open_store(ts_store), str(ts_store), episodes=10, train_overrides={"query": 1}
    )
    assert [r.id for r in partial.rows] == ["zeroshot", "proto", "otam", "tsfsar"]
    assert any(
        n.startswith("row emp left out: head emp reads tokens/ layers") for n in partial.notes
    )
    assert any(
        "row tsfsar-depth3 left out: head tsfsar reads taps 0,4,8,12" in n for n in partial.notes
    )


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    ts_store: Path, tmp_path: Path
) -> None:
    """AdamW's four groups, their base learning rates and the cosine position survive a checkpoint."""
    from safetensors.torch import load_file

    from heads.config import TrainConfig
    from heads.train import train

    def config(out: Path) -> TrainConfig:
        explicit = dict(store=str(ts_store), head="tsfsar", preset="hmdb51", episodes=6)
        quiet = dict(out=str(out), progress=False, val_every=3, val_episodes=5, val_way=3)
        return TrainConfig(**explicit, **quiet).resolved(explicit={*explicit, *quiet})

    whole = train(config(tmp_path / "whole"))
    train(config(tmp_path / "parts"), stop_at=2)
    parts = train(config(tmp_path / "parts"), resume=True)
    a, b = load_file(str(whole / "last.safetensors")), load_file(str(parts / "last.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("optimizer/") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_videos_to_a_trained_tsfsar_end_to_end(tmp_path: Path) -> None:
    """fsar-synth videos -> fsar-extract --recipe emp+ts (tiny ViT, taps 0,4,8,12, class descriptions,
    the side init by PCA) -> fsar-train --head tsfsar --preset -> fsar-eval: the init and the
    descriptions reach the head, nothing falls back."""
    from cli import extract_app
    from pipeline.model import TINY_MODEL
    from pipeline.synth import make_synthetic_dataset

    made = make_synthetic_dataset(tmp_path / "data", classes=12, videos_per_class=3, seed=1)
    described = [c for split in ("train", "test") for c in made["classes"][split]]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({c: [f"shapes that {c}", f"a clip of {c}"] for c in described}))
    store = tmp_path / "store"
    extracted = runner.invoke(extract_app, [
        "--dataset", "folder", "--data-root", str(tmp_path / "data"), "--store", str(store),
        "--model", TINY_MODEL, "--pretrained", "none", "--workers", "1", "--no-progress",
        "--recipe", "emp+ts", "--taps", "0,4,8,12", "--class-descriptions", str(prompts),
    ])  # fmt: skip
    assert extracted.exit_code == 0, extracted.output
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TSFSARNotice)  # the init and the descriptions are used
        trained = runner.invoke(train_app, [
            "--store", str(store), "--head", "tsfsar", "--preset", "ssv2_full", "--shot", "1",
            "--episodes", "3", "--query", "1", "--val-every", "3", "--val-episodes", "4",
            "--val-way", "2", "--out", str(run), "--no-progress",
        ])  # fmt: skip
        assert trained.exit_code == 0, trained.output
        evaluated = runner.invoke(eval_app, [
            "--checkpoint", str(run), "--way", "4", "--episodes", "8", "--no-progress",
        ])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert "(95% CI, 8 episodes, 4-way 1-shot, test)" in evaluated.output
    options = json.loads((run / "config.json").read_text())["config"]["head_options"]
    assert options["taps"] == [0, 4, 8, 12] and options["temp_clip"] == 100.0  # SSv2-Full 1-shot
