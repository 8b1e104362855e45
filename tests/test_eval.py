"""Evaluation: CI formula, streaming equals in-memory, outputs, refusing a checkpoint from another spec."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import heads
from heads.evaluate import confidence_interval, evaluate, load_run
from heads.train import TrainConfig, train
from store import SpecMismatchError, open_store
from tests.heads_fixtures import reversal_pair_store


def test_ci_half_width_is_the_t_interval_of_the_mean() -> None:
    """README's formula: t(0.975, n - 1) * std(ddof=1) / sqrt(n), in percent."""
    values = np.array([1.0, 0.8, 0.6, 1.0, 0.4, 0.8])
    # std of 100, 80, 60, 100, 40, 80 (ddof=1) = 23.381; t(0.975, 5) = 2.570582 (tables)
    assert confidence_interval(values) == pytest.approx(
        2.570582 * 23.380904 / math.sqrt(6), rel=1e-5
    )
    assert confidence_interval(np.ones(100)) == 0.0
    # 10,000 episodes: t(0.975, 9999) = 1.960201, the normal 1.959964 to four digits
    many = np.tile([0.0, 1.0], 5000)
    assert confidence_interval(many) == pytest.approx(1.960201 * 50.0025 / 100, rel=1e-5)
    assert math.isnan(confidence_interval(np.ones(1)))


def test_streaming_equals_memory_and_is_deterministic(pair_store: Path) -> None:
    store = open_store(pair_store)
    head = heads.create("otam")
    a = evaluate(head, store, "test", 3, 1, 1, 200, seed=4, max_ram_gb=8.0)
    b = evaluate(head, store, "test", 3, 1, 1, 200, seed=4, max_ram_gb=0.0, episodes_per_batch=7)
    assert np.array_equal(a.per_episode, b.per_episode)
    assert a.summary().startswith(
        f"accuracy {a.accuracy:.2f} ± {a.ci95:.2f} (95% CI, 200 episodes, 3-way 1-shot, test)"
    )


@pytest.mark.parametrize(
    "name,shot",
    [("otam", 1), ("otam", 2), ("otam", 3), ("proto", 1), ("proto", 3), ("zeroshot", 2)]
    + [("emp", 1), ("emp", 2)],
)
def test_batched_scoring_with_cached_features_equals_plain_episodes(
    pair_store: Path, name: str, shot: int
) -> None:
    """score_episodes (reused gather buffers, a short last batch, OTAM's cached frame norms,
    K-shot prototypes formed from the feature table, emp's cached query fusion) gives each
    episode's plain support/query result."""
    from heads.data import SplitData
    from heads.episodes import EpisodeSampler
    from heads.evaluate import row_positions, score_episodes, video_pass

    store = open_store(pair_store)
    torch.manual_seed(0)
    head = heads.create(name, **({"dim": int(store.spec["dim"])} if name == "emp" else {}))
    head.prepare(store)
    head.eval()
    m = store.manifest
    sampler = EpisodeSampler(m[m["split"] == "test"], 3, shot, 1, seed=2)
    data = SplitData(store, sampler.rows, head.inputs(store.spec), 8.0, views=1)
    cached = video_pass(head, data, shot, torch.device("cpu"))
    position = row_positions(data.rows)
    buffers: dict[str, torch.Tensor] = {}
    batched = np.concatenate(
        [
            score_episodes(head, cached, position, sampler.batch(r), torch.device("cpu"), buffers)
            for r in (range(0, 8), range(8, 11))
        ]
    )
    plain = []
    for i in range(11):
        episode = sampler.episode(i)
        support = head.video_features(data.get(episode.support_rows))
        query = head.video_features(data.get(episode.query_rows))
        with torch.no_grad():
            head.process_support_set(
                support, torch.as_tensor(episode.support_labels), torch.as_tensor(episode.class_ids)
            )
            predicted = head(query).argmax(-1).numpy()
        plain.append((predicted == episode.query_labels).mean())
    assert np.array_equal(batched, np.array(plain, dtype=batched.dtype))
    if name == "otam":
        assert "norms" in cached  # per-video frame norms, computed once
    if shot > 1 and head.support_means(shot) is not None:
        assert buffers.keys() == {f"query/{k}" for k in cached}  # no support was gathered


def test_table_class_means_equal_class_means_of_gathered_supports() -> None:
    """K-shot prototypes from the feature table are the bits `class_means` gives on the gathered
    supports, whatever the number of episodes in the batch."""
    from heads.base import class_means, table_class_means

    torch.manual_seed(0)
    table = torch.randn(40, 3, 8)
    index = torch.randint(0, 40, (6, 5, 4))  # 6 episodes, 5 classes, 4 shots (class-major)
    labels = torch.arange(5).repeat_interleave(4).expand(6, 20)
    gathered = table[index.reshape(6, 20)]
    want = class_means(gathered, labels, 5)
    assert torch.equal(table_class_means(table, index), want)
    assert torch.equal(table_class_means(table, index[2:3]), want[2:3])
    torch.testing.assert_close(want, gathered.reshape(6, 5, 4, 3, 8).mean(2))


KEEP_FREED_MEMORY_STEPS = """
import resource, sys, torch
from runtime.memory import keep_freed_memory
print(keep_freed_memory())
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(n) for n in (25_000_000, 5_000_000, 12_000_000)]
    doubled = tensors[0] * 2
    del tensors, doubled
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_reuses_freed_blocks() -> None:
    """After keep_freed_memory, repeated steps that allocate and free large tensors settle on
    reused heap memory: no fresh page faults. By default glibc maps and unmaps every block, and
    each step touches ~60,000 new pages. Run in a child process: the policy lasts for the
    process, and the pytest process keeps its default allocator."""
    done = subprocess.run(
        [sys.executable, "-c", KEEP_FREED_MEMORY_STEPS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    applied, *faults = done.stdout.split()
    assert applied == str(sys.platform.startswith("linux"))
    if applied == "True":
        assert min(int(f) for f in faults[2:]) < 2_000, faults


@pytest.mark.slow
def test_cli_outputs_and_spec_refusal(pair_store: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(store=str(pair_store), head="emp", episodes=4, episodes_per_step=2, val_every=4,
                      val_episodes=20, way=3, query=1, out=str(tmp_path / "runs" / "r"), progress=False)  # fmt: skip
    run = train(cfg.resolved())
    assert (tmp_path / "runs" / "latest").resolve() == run.resolve()
    for name in (
        "best.safetensors",
        "last.safetensors",
        "config.json",
        "metrics.jsonl",
        "curves.png",
    ):
        assert (run / name).exists(), name
    config = json.loads((run / "config.json").read_text())
    assert (
        config["store"]["fingerprint"] == open_store(pair_store).fingerprint()
        and config["git_commit"] is not None
    )
    # fsar-eval with no checkpoint option evaluates runs/latest on the store its config names
    out = subprocess.run(
        [sys.executable, "-m", "cli", "eval", "--episodes", "30", "--way", "3", "--no-progress",
         "--json", "r.json", "--per-episode", "e.parquet"],
        cwd=tmp_path, capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "(95% CI, 30 episodes, 3-way 1-shot, test)" in out.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert {
        "accuracy",
        "ci95",
        "episodes",
        "way",
        "shot",
        "query",
        "split",
        "head",
        "store_fingerprint",
        "seconds",
        "pass_seconds",
    } <= set(result)
    assert 0 < result["pass_seconds"] <= result["seconds"]
    assert len(pd.read_parquet(tmp_path / "e.parquet")) == 30
    # a store with another spec (more frames) is refused, naming the field
    other = tmp_path / "other"
    reversal_pair_store(
        other, frames=6, views=1, classes={"train": 6, "val": 6, "test": 6}, videos_per_class=4
    ).close()
    with pytest.raises(SpecMismatchError, match="frames: 4 != 6"):
        load_run(run, open_store(other))
    out = subprocess.run(
        [sys.executable, "-m", "cli", "eval", "--store", str(other), "--checkpoint", str(run), "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert out.returncode == 2 and "frames: 4 != 6" in out.stderr and "Traceback" not in out.stderr


def _env() -> dict:
    import os

    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}


def test_episode_batches_shrink_for_large_per_video_features() -> None:
    """K-shot emp at ViT-B/16 shapes keeps T x P x D patch tokens per video: batches must shrink."""
    import torch

    from heads.evaluate import EPISODE_BATCH_BYTES, MAX_EPISODES_PER_BATCH, auto_episodes_per_batch

    small = {"token": torch.zeros(1000, 8, 64)}  # 2 KB per video: the episode cap applies
    assert auto_episodes_per_batch(small, 10) == MAX_EPISODES_PER_BATCH
    vit_b = {"patch": torch.zeros(3, 8, 196, 512), "token": torch.zeros(3, 8, 512)}
    per_episode = (8 * 196 * 512 + 8 * 512) * 4 * 30  # 5-way 5-shot + 1 query: 30 videos
    n = auto_episodes_per_batch(vit_b, 30)
    assert n == int(EPISODE_BATCH_BYTES // per_episode) and 1 <= n < 5
    huge = {"patch": torch.zeros(1, 64, 1024, 1024)}
    assert auto_episodes_per_batch(huge, 50) == 1
