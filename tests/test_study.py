"""Studies: plans checked up front, paired statistics, the study folder, and runs on Dask clusters.

The cluster tests run one tiny plan (proto, emp, emp token-level; a few training episodes) on a
LocalCluster, killed and resumed from the command line, and on an external scheduler, and compare
every number with the same cells run by hand through fsar-train and fsar-eval.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app, study_app
from heads.stats import mean_over_seeds, paired_comparison
from heads.study import PlanError, StudyOptions, load_plan, run_study
from heads.study.folder import read_per_episode
from heads.study.plans import builtin_plans, expand, parse_plan
from heads.study.runner import plan_workers
from store import open_store
from tests.heads_fixtures import reversal_pair_store

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"episodes": 16, "episodes_per_step": 2, "val_every": 8, "val_episodes": 20, "lr": 0.001}
EPISODES = 40
ROWS = [
    {"id": "proto", "label": "prototypes", "head": "proto"},
    {"id": "emp", "label": "emp", "head": "emp"},
    {
        "id": "token",
        "label": "emp, token level only",
        "head": "emp",
        "options": {"levels": "token"},
    },
]
FAILING = {
    "id": "broken",
    "head": "emp",
    "train": {"group_lr": {"side": 0.001}},
}  # passes the plan's checks, fails when the cell builds its optimizer (emp has no group "side")


def plan_data(rows: list[dict], name: str = "tiny") -> dict:
    return {"name": name, "reference": "proto", "train": TRAIN, "eval": {"episodes": EPISODES}, "rows": rows}  # fmt: skip


def cli(*args: str) -> tuple[int, str, str]:
    """`fsar-study ARGS` in this process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(study_app, list(args))
    return result.exit_code, result.stdout, result.stderr


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("study") / "store"
    reversal_pair_store(
        path, frames=4, patches=4, dim=16, views=1, videos_per_class=6,
        classes={"train": 6, "val": 6, "test": 6},
    ).close()  # fmt: skip
    return path


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "tiny.json"
    path.write_text(json.dumps(plan_data(ROWS)))
    return path


@pytest.fixture(scope="module")
def by_hand(store: Path, tmp_path_factory) -> dict[str, np.ndarray]:
    """Per-episode accuracies of the plan's cells run with fsar-train and fsar-eval, in this process,
    with the torch threads a study cell gets with 2 workers."""
    import torch

    from bench.common import run_cli

    work = tmp_path_factory.mktemp("by-hand")
    threads = torch.get_num_threads()
    torch.set_num_threads(plan_workers(2, 3)[1])
    out: dict[str, np.ndarray] = {}
    try:
        common = ["--store", str(store), "--episodes", str(EPISODES), "--no-progress"]
        run_cli("eval", [*common, "--head", "proto", "--per-episode", str(work / "proto.parquet")])
        for row, extra in (("emp", []), ("token", ["--levels", "token"])):
            run_cli("train", [
                "--store", str(store), "--head", "emp", "--episodes", "16", "--episodes-per-step", "2",
                "--val-every", "8", "--val-episodes", "20", "--lr", "0.001", "--seed", "0",
                "--out", str(work / row), "--device", "cpu", "--no-progress", *extra,
            ])  # fmt: skip
            run_cli("eval", [*common, "--checkpoint", str(work / row), "--device", "cpu",
                             "--per-episode", str(work / f"{row}.parquet")])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for row in ("proto", "emp", "token"):
        out[row] = pd.read_parquet(work / f"{row}.parquet")["accuracy"].to_numpy()
    return out


def assert_matches_by_hand(out: Path, by_hand: dict[str, np.ndarray]) -> None:
    results = pd.read_parquet(out / "results.parquet").set_index("row")
    for row, expected in by_hand.items():
        files = list((out / "cells").glob(f"{row}.1shot*/per_episode.parquet"))
        assert len(files) == 1, files
        _, accuracy, meta = read_per_episode(files[0])
        np.testing.assert_array_equal(accuracy, expected, err_msg=row)
        assert meta["split"] == "test" and meta["episodes"] == EPISODES and meta["shot"] == 1
        assert results.at[row, "accuracy"] == pytest.approx(expected.mean() * 100, abs=1e-9)
        assert results.at[row, "status"] == "ok"
        if row != "proto":  # trained: its run directory is in the study folder
            assert (out / results.at[row, "run_dir"] / "best.safetensors").is_file()


# ---------------------------------------------------------------------------------- statistics
def test_paired_statistics_worked_example() -> None:
    a = np.array([0.6, 0.4, 0.2, 0.4, 0.6])
    b = a + np.array([0.2, 0.0, 0.4, 0.2, 0.2])
    paired = paired_comparison(a, b)
    # differences (pp) 20, 0, 40, 20, 20: mean 20, sd sqrt(800/4) = 14.142, se = sqrt(40) = 6.3246,
    # t = 20 / 6.3246 = sqrt(10) on 4 degrees of freedom; t(0.975, 4) = 2.7764 (tables)
    assert paired.mean == pytest.approx(20.0)
    assert paired.t == pytest.approx(math.sqrt(10))
    assert paired.ci95 == pytest.approx(2.776445 * math.sqrt(40), rel=1e-6)
    assert (paired.low, paired.high) == pytest.approx((2.4402, 37.5598), abs=1e-3)
    # two-sided p for 4 df in closed form: 1 - sqrt(x)(3 - x)/2 with x = t^2/(4 + t^2) = 5/7
    x = 5 / 7
    assert paired.p_value == pytest.approx(1 - math.sqrt(x) * (3 - x) / 2, rel=1e-9)
    assert paired.p_value == pytest.approx(0.034109, abs=1e-6)
    # the CI excludes 0 exactly when p < 0.05; swapping A and B flips the sign only
    swapped = paired_comparison(b, a)
    assert (swapped.mean, swapped.ci95, swapped.p_value) == pytest.approx(
        (-20, paired.ci95, paired.p_value)
    )
    same = paired_comparison(a, a)
    assert (same.mean, same.ci95, same.p_value) == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="one length"):
        paired_comparison(a, b[:4])


def test_mean_over_seeds_worked_example() -> None:
    # 70, 72, 74: mean 72, sd 2, t(0.975, 2) = 4.3027 -> 4.3027 * 2 / sqrt(3) = 4.968
    seeds = mean_over_seeds([70.0, 72.0, 74.0], [1.0, 1.0, 1.0])
    assert (seeds.mean, seeds.seeds, seeds.over) == (72.0, 3, "seeds")
    assert seeds.ci95 == pytest.approx(4.302653 * 2 / math.sqrt(3), rel=1e-6)
    one = mean_over_seeds([70.0], [1.3])
    assert (one.mean, one.ci95, one.over) == (70.0, 1.3, "episodes")


def test_compare_command(tmp_path: Path) -> None:
    a = tmp_path / "a.parquet"
    b = tmp_path / "b.parquet"
    values = np.array([0.6, 0.4, 0.2, 0.4, 0.6])
    pd.DataFrame({"episode": range(5), "accuracy": values}).to_parquet(a)
    pd.DataFrame({"episode": range(5), "accuracy": values + [0.2, 0.0, 0.4, 0.2, 0.2]}).to_parquet(
        b
    )
    umbrella = CliRunner().invoke(app, ["study", "compare", str(a), str(b)])  # fsar study compare
    assert umbrella.exit_code == 0, umbrella.stderr
    expected = "B - A: +20.00 pp (95% CI +2.44 to +37.56), paired t-test p = 0.034, 5 episodes"
    assert expected in umbrella.stdout
    assert "no episode metadata" in umbrella.stderr
    pd.DataFrame({"episode": range(4), "accuracy": values[:4]}).to_parquet(b)
    code, _, err = cli("compare", str(a), str(b))
    assert code == 2 and err.count("\n") == 1 and "different episodes" in err
    (tmp_path / "c.parquet").write_text("not parquet")
    code, _, err = cli("compare", str(a), str(tmp_path / "c.parquet"))
    assert code == 2 and "not a readable per-episode Parquet file" in err


# ---------------------------------------------------------------------------------- plans
def test_builtin_plans_and_config_hashes(store: Path) -> None:
    assert builtin_plans() == ["ablation", "baselines", "shots", "tsfsar"]
    s = open_store(store)
    ablation = expand(load_plan("ablation"), s, str(store), episodes=EPISODES)
    assert [c.id for c in ablation.cells][:3] == [
        "token.1shot.seed0",
        "token+patch.1shot.seed0",
        "full.1shot.seed0",
    ]
    assert len({c.config_hash for c in ablation.cells}) == len(ablation.cells) == 7
    again = expand(load_plan("ablation"), s, str(store), episodes=EPISODES)
    assert [c.config_hash for c in again.cells] == [c.config_hash for c in ablation.cells]
    seeds = expand(load_plan("ablation"), s, str(store), seeds=[0, 1], episodes=EPISODES)
    assert len(seeds.cells) == 14 and seeds.cells[0].config_hash == ablation.cells[0].config_hash
    # every cell is tested on the same episodes; the store's val split is too small for 5-way? no: 6
    assert {c.eval for c in ablation.cells} == {ablation.plan.eval}
    baselines = expand(load_plan("baselines"), s, str(store), episodes=EPISODES)
    assert [r.id for r in baselines.rows] == ["zeroshot", "proto", "otam", "emp"]
    assert any("lastlayer-meta left out" in n and "emp+last" in n for n in baselines.notes)
    assert [c.id for c in baselines.cells if c.train is None] == [
        "zeroshot.1shot",
        "proto.1shot",
        "otam.1shot",
    ]
    shots = expand(
        load_plan("shots"), s, str(store), episodes=EPISODES, train_overrides={"query": 1}
    )
    assert [c.shot for c in shots.cells] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"id": "x", "head": "nope"}, "plan bad, row x: unknown head 'nope'"),
        (
            {"id": "x", "head": "emp", "options": {"levels": "patch"}},
            "plan bad, row x: head 'emp': levels must be",
        ),
        (
            {"id": "x", "head": "emp", "train": {"epochs": 3}},
            "row x: unknown training option(s) epochs",
        ),
        ({"id": "x", "head": "emp", "train": {"seed": 3}}, "row x: seed cannot be set here"),
        ({"id": "x", "head": "lastlayer"}, "row x: the store has no tokens/layer12_in"),
        ({"id": "../x", "head": "proto"}, "'id' must be letters"),
    ],
)
def test_plan_errors_name_the_row_and_touch_nothing(
    store: Path, tmp_path: Path, row: dict, message: str
) -> None:
    plan = tmp_path / "bad.json"
    plan.write_text(json.dumps(plan_data([ROWS[0], row], name="bad")))
    out = tmp_path / "study"
    code, _, err = cli("--store", str(store), "--plan", str(plan), "--out", str(out))
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_reported_accuracies_are_checked_and_matched_to_the_store() -> None:
    reported = {"source": "paper, Table 3", "model": "ViT-B-16", "pretrained": "openai",
                "accuracy": {"hmdb51": {"emp": {"1": 75.8, "5": 87.1}}}}  # fmt: skip
    plan = parse_plan({**plan_data(ROWS), "reported": reported})
    hmdb = {"dataset": "hmdb51", "model": "ViT-B-16", "pretrained": "openai"}
    assert plan.reported.of(hmdb, "emp", 5) == 87.1
    assert plan.reported.of(hmdb, "proto", 1) is None
    assert plan.reported.of({**hmdb, "pretrained": "laion2b_s34b_b88k"}, "emp", 1) is None
    assert plan.reported.of({**hmdb, "dataset": "ucf101"}, "emp", 1) is None
    for bad, message in [
        ({**reported, "source": ""}, "'reported' needs a 'source' string"),
        ({**reported, "accuracy": {"hmdb51": {"nope": {"1": 50}}}}, "names row 'nope', not in the plan"),
        ({**reported, "accuracy": {"hmdb51": {"emp": {"one": 50}}}}, "accuracy in %"),
        ({**reported, "accuracy": {"hmdb51": {"emp": {"1": 150}}}}, "accuracy in %"),
    ]:  # fmt: skip
        with pytest.raises(PlanError, match=re.escape(message)):
            parse_plan({**plan_data(ROWS), "reported": bad})


def test_cells_that_cannot_get_episodes_are_refused(store: Path) -> None:
    s = open_store(store)
    plan = parse_plan({**plan_data(ROWS), "shots": [6]})  # 6 videos per class: no query left
    with pytest.raises(
        PlanError, match=r"plan tiny, cell proto.6shot: 5-way episodes need 5 classes"
    ):
        expand(plan, s, str(store))
    with pytest.raises(PlanError, match="eval way must hold integers >= 2"):
        parse_plan({**plan_data(ROWS), "eval": {"way": 1}})
    with pytest.raises(PlanError, match="--train: unknown training option"):
        expand(parse_plan(plan_data(ROWS)), s, str(store), train_overrides={"nope": 1})


def test_out_folders_of_others_are_refused(store: Path, plan_file: Path, tmp_path: Path) -> None:
    def study(out: Path, *extra: str) -> tuple[int, str, str]:
        return cli("--store", str(store), "--plan", str(plan_file), "--out", str(out), "--no-progress", *extra)  # fmt: skip

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = study(mine)
    assert code == 2 and "not empty and not a study folder" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    other = tmp_path / "other"
    other.mkdir()
    record = {
        "plan": "ablation",
        "plan_hash": "0" * 16,
        "cells": [{}] * 7,
        "store": {"fingerprint": "f"},
    }
    (other / "study.json").write_text(json.dumps(record))
    code, _, err = study(other)
    assert code == 2 and "holds another study (plan ablation, 7 cells" in err
    assert json.loads((other / "study.json").read_text()) == record
    code, _, err = study(tmp_path / "new", "--resume")
    assert code == 2 and "nothing to resume" in err
    code, _, err = cli("--store", str(store))
    assert code == 2 and "--store and --plan are required" in err


# ---------------------------------------------------------------------------------- clusters
@pytest.mark.slow
def test_study_on_a_local_cluster(store: Path, by_hand: dict, tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "study"
    reported = {
        "source": "a worked example", "model": "random-tokens", "pretrained": "none",
        "accuracy": {"random": {"emp": {"1": 61.25}}, "hmdb51": {"proto": {"1": 99.0}}},
    }  # fmt: skip
    plan = parse_plan({**plan_data([*ROWS, FAILING]), "reported": reported})
    summary = run_study(
        plan, StudyOptions(store=str(store), out=str(out), workers=2, progress=False)
    )
    assert (summary.cells, summary.kept, summary.ok) == (4, 0, 3)
    assert len(summary.failed) == 1 and summary.failed[0].startswith(
        "broken.1shot.seed0: ConfigError"
    )
    assert_matches_by_hand(out, by_hand)
    results = pd.read_parquet(out / "results.parquet")
    assert list(results["cell"]) == [
        "proto.1shot",
        "emp.1shot.seed0",
        "token.1shot.seed0",
        "broken.1shot.seed0",
    ]
    broken = results.set_index("row").loc["broken"]
    assert broken["status"] == "failed" and "ConfigError" in broken["error"]
    assert math.isnan(broken["accuracy"])
    assert (
        out / "cells" / f"broken.1shot.seed0-{broken['config_hash'][:8]}" / "error.log"
    ).is_file()
    report = (out / "report.md").read_text()
    a, b = by_hand["proto"].mean() * 100, by_hand["emp"].mean() * 100
    paired = paired_comparison(by_hand["proto"], by_hand["emp"])
    assert f"| **prototypes** (reference) | {a:.2f} ± " in report
    assert f"| emp | {b:.2f} ± " in report
    # the reported column: this store's dataset, model and weights only; empty where none is given
    assert "| row | 1-shot | 1-shot reported |" in report
    assert re.search(r"\| emp \| [0-9.]+ ± [0-9.]+ \| 61\.2 \|", report)
    assert re.search(r"\| \*\*prototypes\*\* \(reference\) \| [0-9.]+ ± [0-9.]+ \|  \|", report)
    assert "Reported: as published, not measured here; source: a worked example." in report
    assert f"| emp | {paired.mean:+.2f} | [{paired.low:+.2f}, {paired.high:+.2f}] |" in report
    assert "| emp token level only" not in report and "emp, token level only" in report
    assert "`broken.1shot.seed0`: ConfigError" in report
    for name in ("accuracy.png", "paired.png", "curves.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 600 and image.std() > 0.01, name


@pytest.mark.slow
def test_killed_study_runs_only_unfinished_cells(
    store: Path, plan_file: Path, by_hand: dict, tmp_path: Path
) -> None:
    out = tmp_path / "study"
    command = [sys.executable, "-m", "cli", "study", "--store", str(store), "--plan", str(plan_file),
               "--out", str(out), "--workers", "2", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(command, env=env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list((out / "cells").glob("*/cell.json")):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no cell finished in 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, mid-study
        proc.wait(timeout=60)
    finished = {p.parent.name: p.read_text() for p in (out / "cells").glob("*/cell.json")}
    assert 1 <= len(finished) < 3, finished
    rerun = subprocess.run(command, env=env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"3 cells: {len(finished)} finished before, {3 - len(finished)} to run" in rerun.stdout
    for name, text in finished.items():  # kept as they were, not rerun
        assert (out / "cells" / name / "cell.json").read_text() == text
    assert_matches_by_hand(out, by_hand)
    again = subprocess.run(command, env=env(), capture_output=True, text=True)
    assert again.returncode == 0 and "3 cells, 3 kept from before, 0 run" in again.stdout


@pytest.mark.slow
def test_external_scheduler_gives_the_same_results(
    store: Path, plan_file: Path, by_hand: dict, tmp_path: Path
) -> None:
    dask = str(Path(sys.executable).parent / "dask")
    address_file = tmp_path / "scheduler.json"
    started = []
    try:
        started.append(subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(address_file)],
            env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        deadline = time.monotonic() + 120
        while not (address_file.exists() and address_file.read_text().strip()):
            assert started[0].poll() is None and time.monotonic() < deadline, "no scheduler"
            time.sleep(0.05)
        address = json.loads(address_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        started.append(subprocess.Popen(
            [dask, "worker", address, "--host", "127.0.0.1", "--nworkers", "2", "--nthreads", "1",
             "--no-dashboard"],
            env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        out = tmp_path / "study"
        summary = run_study(
            load_plan(str(plan_file)),
            StudyOptions(store=str(store), out=str(out), scheduler=address, progress=False),
        )
        assert (summary.ok, summary.failed) == (3, [])
        assert_matches_by_hand(out, by_hand)
    finally:
        for proc in reversed(started):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


@pytest.mark.slow
def test_local_cluster_workers_are_single_dask_threads_with_passive_openmp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from heads.study.runner import study_client

    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # as an earlier cluster in this process may leave it
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with study_client(StudyOptions(store="", out="", workers=2), 3) as (client, workers, threads):
        assert os.environ["OMP_NUM_THREADS"] == "7" and "OMP_WAIT_POLICY" not in os.environ
        assert (workers, threads) == plan_workers(2, 3)
        environment = client.run(
            lambda: (os.environ.get("OMP_WAIT_POLICY"), os.environ.get("OMP_NUM_THREADS"))
        )
        assert sorted(environment.values()) == [("PASSIVE", str(threads))] * 2
        assert [w["nthreads"] for w in client.scheduler_info()["workers"].values()] == [1, 1]
