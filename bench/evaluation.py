"""Evaluation benchmark: `fsar-eval --episodes 10000` against one pass of the head over the split.

A random store with ViT-B/16 shapes (T=8, 197 tokens, D=512; `emp` recipe, zstd) holds a test split
of 24 classes x 42 videos (1,008 videos; `--quick`: tiny shapes, 42 videos, 50 episodes). `emp` is
evaluated from a checkpoint that `fsar-train` wrote after one episode (its weights do not change the
cost). For each head and shot, all episodes run (none projected):
  pass     one pass of the head over the split, in this process: load the split's tensors
           (`heads.data.SplitData`, view 0) and compute every video's features
           (`heads.evaluate.video_pass`), as `fsar-eval` does before its episodes;
  eval     wall time of the `fsar-eval` command (`cli.eval_app`) run in this process: store opened,
           head built (emp: checkpoint loaded), split loaded, the pass, the episodes, the result
           written; interpreter start-up and imports are not counted (they do not grow with the
           episodes). `fsar-train` also runs in process;
  ratio    eval seconds / pass seconds. Target <= 2 for every head and shot. Heads: zeroshot,
           proto, otam, probe (untrained, `--head`) and emp (from its run);
  floor    (emp) 1 + episodes x matmul FLOPs of an episode / matmul FLOPs of the pass: the ratio
           reached if both ran at the same rate. emp K-shot fuses each episode's class prototypes
           (means of K supports) with the class texts, about 11 GFLOP per episode at these shapes,
           which no cache can hold: the prototypes are new in every episode.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bench.common import (
    Result,
    Scratch,
    parser,
    resolve_device,
    run_cli,
    timed,
    tiny_spec,
    vit_b16_spec,
)
from bench.workload import build_store

# `python -m bench.run_all --report` puts this above the figures in docs/performance.md
HOW_TO_READ = """
`fsar-eval` seconds for 10,000 episodes over one pass of the head over the split: at 2 or less,
the episodes cost no more than computing the features. The FLOP floor is the lowest ratio possible
when the episodes' arithmetic runs as fast as the pass's: emp K-shot fuses new class prototypes in
every episode, so where the pass is bound by arithmetic (CPU) its floor, not the code, sets the
ratio; where the pass is bound by reading the store (GPU) the floor no longer binds.
"""


# every head that reads this store (lastlayer needs an emp+last store: its episodes are class-mean
# cosines of per-video embeddings, the same scoring as proto's)
HEADS = ("zeroshot", "proto", "otam", "probe", "emp")


def head_for(name: str, store: Any, run_dir: Path | None, device: str) -> Any:
    """emp from its run; the other heads built as `fsar-eval --head NAME` builds them."""
    import torch

    if name == "emp":
        from heads.evaluate import load_run

        return load_run(run_dir, store, device)
    from heads.train import build_head

    torch.manual_seed(0)
    return build_head(name, {}, store, torch.device(device))


def one_pass(name: str, store: Any, run_dir: Path | None, shot: int, device: str) -> float:
    """Seconds to load the test split for the head and compute every video's features once."""
    import torch

    from heads.data import SplitData
    from heads.episodes import EpisodeSampler
    from heads.evaluate import video_pass

    head = head_for(name, store, run_dir, device)
    head.eval()
    m = store.manifest
    rows = EpisodeSampler(m[m["split"] == "test"], 5, shot, 1, 0, 1, "test").rows

    def work() -> None:
        data = SplitData(store, rows, head.inputs(store.spec), max_ram_gb=64.0, views=1)
        video_pass(head, data, shot, torch.device(device))

    return timed(work, device)[0]


def flop_floor(
    name: str, store: Any, run_dir: Path | None, shot: int, episodes: int, device: str
) -> tuple:
    """(GFLOP of the pass over the test split, GFLOP per 5-way 1-query episode, floor of the
    ratio) counted with FlopCounterMode on 8 videos and one episode drawn from them."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from heads.data import SplitData
    from heads.episodes import EpisodeBatch
    from heads.evaluate import row_positions, score_episodes, video_pass

    head = head_for(name, store, run_dir, device)
    head.eval()
    rows = store.select(split="test")
    sample = rows[:8]
    data = SplitData(store, sample, head.inputs(store.spec), max_ram_gb=64.0, views=1)
    with FlopCounterMode(display=False) as counter:
        features = video_pass(head, data, shot, torch.device(device))
    pass_flops = counter.get_total_flops() * len(rows) / len(sample)
    way = 5
    batch = EpisodeBatch(
        indices=np.zeros(1, dtype=np.int64),
        support_rows=np.resize(sample, way * shot)[None],
        support_labels=np.repeat(np.arange(way), shot)[None],
        query_rows=np.resize(sample[::-1], way)[None],
        query_labels=np.arange(way)[None],
        class_ids=np.unique(store.manifest["label"].to_numpy()[rows])[:way][None],
    )
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        score_episodes(head, features, row_positions(sample), batch, torch.device(device))
    episode_flops = counter.get_total_flops()
    return pass_flops / 1e9, episode_flops / 1e9, 1 + episodes * episode_flops / pass_flops


def main(argv: list[str] | None = None) -> Path:
    p = parser("evaluation", __doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=None, help="episodes per evaluation [10000]")
    p.add_argument("--classes", type=int, default=None, help="test classes [24]")
    p.add_argument("--videos-per-class", type=int, default=None, help="[42]")
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--shots", default="1,5")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    quick = args.quick
    episodes = args.episodes or (50 if quick else 10_000)
    n_classes = args.classes or (6 if quick else 24)
    per_class = args.videos_per_class or (7 if quick else 42)
    spec = (tiny_spec if quick else vit_b16_spec)("emp")
    res = Result("evaluation", quick, device)
    res.config = {
        "model": "fsar-tiny-vit shapes" if quick else "ViT-B-16 shapes",
        "shapes": {k: spec[k] for k in ("frames", "views", "tokens", "dim")},
        "test_videos": n_classes * per_class,
        "test_classes": n_classes,
        "episodes": episodes,
        "way": 5,
        "query": 1,
        "codec": "zstd level 3 (store default)",
    }
    with Scratch(args.work, "eval") as work:
        path = work / "store"
        if path.exists():
            shutil.rmtree(path)
        t_store, store = build_store(
            path, spec, {"train": (5, 6), "val": (5, 2), "test": (n_classes, per_class)}
        )
        res.config["store_write_seconds"] = round(t_store, 1)
        run_dir = work / "run-emp"
        heads = args.heads.split(",")
        if "emp" in heads:
            run_cli(
                "train",
                ["--store", str(path), "--head", "emp", "--episodes", "1"]
                + ["--episodes-per-step", "1", "--val-every", "1", "--val-episodes", "2"]
                + ["--out", str(run_dir), "--device", device, "--no-progress"],
            )
        for shot in (int(s) for s in args.shots.split(",")):
            for name in heads:
                pass_s = one_pass(name, store, run_dir, shot, device)
                out = work / f"{name}-{shot}.json"
                target = ["--checkpoint", str(run_dir)] if name == "emp" else ["--head", name]
                wall = run_cli(
                    "eval",
                    ["--store", str(path), *target, "--episodes", str(episodes)]
                    + ["--shot", str(shot), "--device", device, "--json", str(out)]
                    + ["--no-progress"],
                )
                result = json.loads(out.read_text())
                inner = float(result["seconds"])
                episode_s = inner - float(result["pass_seconds"])
                tag = f"{name} {shot}-shot"
                res.add(f"pass_s.{name}.{shot}shot", f"{tag}: one pass over the split", pass_s, "s")
                res.add(
                    f"eval_s.{name}.{shot}shot",
                    f"{tag}: fsar-eval {episodes} episodes",
                    wall,
                    "s",
                    note=f"of which evaluate() {inner:.2f} s, episodes {episode_s:.2f} s "
                    f"({1000 * episode_s / episodes:.2f} ms each)",
                )
                ratio = wall / pass_s
                res.add(
                    f"ratio.{name}.{shot}shot",
                    f"{tag}: ratio eval / pass",
                    ratio,
                    "x",
                    target="<= 2",
                    met=ratio <= 2,
                )
                if name == "emp":
                    pass_gf, episode_gf, floor = flop_floor(
                        name, store, run_dir, shot, episodes, device
                    )
                    res.add(
                        f"flop_floor.{name}.{shot}shot",
                        f"{tag}: FLOP floor of the ratio",
                        floor,
                        "x",
                        note=f"pass {pass_gf:,.0f} GFLOP, {episode_gf:.3g} GFLOP per episode",
                    )
    return res.write(args.out)


if __name__ == "__main__":
    main()
