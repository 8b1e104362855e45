"""What training adds: emp and probe on a hidden-order store, by loss and learning rate.

    python -m bench.learning [--quick] [--episodes 300]

`store.random_store.hidden_order_store` hides a learnable signal from every fixed metric. Each
recipe trains from the same seed for the same episodes, then every head is scored on the same 500
test episodes (5-way 1-shot): the training-free heads, the untrained emp, and each trained recipe.
The recipes are fsar's short run (`--episodes 300 --lr 3e-3`) with each loss, the default lr
(1e-3), and the schedule fsar used before (lr 1e-4, 4 episodes per step, decays at 40% and 60%).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench.common import Result, Scratch, parser

# `python -m bench.run_all --report` puts this above the figures in docs/performance.md
HOW_TO_READ = """
Test accuracy (5-way 1-shot, 500 episodes) of each training recipe next to the untrained and
training-free heads, on a store whose signal no fixed metric sees: training must lift emp far above
the rest; the recipes differ in loss and learning rate only.
"""


RECIPES: dict[str, dict] = {
    "emp, ce loss, short run (lr 3e-3)": dict(head="emp", lr=3e-3),
    "emp, released loss, short run (lr 3e-3)": dict(
        head="emp", lr=3e-3, head_options={"loss": "released"}
    ),
    "emp, ce loss, lr 1e-3": dict(head="emp", lr=1e-3),
    "emp, released loss, former defaults": dict(
        head="emp",
        lr=1e-4,
        episodes_per_step=4,
        head_options={"loss": "released"},
        warmup_episodes_fraction=0.1,
        decay_fractions=(0.4, 0.6),
    ),  # fmt: skip
    "probe, short run (lr 3e-3)": dict(head="probe", lr=3e-3),
}


def train_recipe(store: Path, out: Path, episodes: int, recipe: dict) -> Path:
    from heads.train import TrainConfig, train

    options = dict(recipe)
    warmup = options.pop("warmup_episodes_fraction", None)
    decays = options.pop("decay_fractions", None)
    if warmup is not None:
        options["warmup_episodes"] = int(episodes * warmup)
    if decays is not None:
        options["decay_episodes"] = [int(episodes * f) for f in decays]
    cfg = TrainConfig(store=str(store), out=str(out), episodes=episodes, progress=False,
                      val_every=episodes, val_episodes=200, **options)  # fmt: skip
    return train(cfg.resolved(explicit=set(options) | {"episodes"}))


def score_untrained(res: Result, store: Any, test: dict) -> dict[str, float]:
    """Test accuracy of the training-free heads and of emp untrained; returns the training-free ones."""
    from heads.evaluate import evaluate
    from heads.train import build_head

    free = {}
    for name in ("zeroshot", "proto", "otam", "emp"):
        torch.manual_seed(0)
        accuracy = evaluate(
            build_head(name, {}, store, torch.device("cpu")), store, **test
        ).accuracy
        label = "emp, untrained" if name == "emp" else f"{name} (training-free)"
        res.add(f"untrained_{name}", label, accuracy, "% test")
        if name != "emp":
            free[name] = accuracy
    return free


def score_recipes(
    res: Result, store: Any, work: Path, episodes: int, test: dict, free: dict
) -> None:
    """Train every recipe, test it; the short run's gain over the best training-free head."""
    from heads.evaluate import evaluate, load_run

    for i, (label, recipe) in enumerate(RECIPES.items()):
        run = train_recipe(work / "store", work / f"run{i}", episodes, recipe)
        accuracy = evaluate(load_run(run, store), store, **test).accuracy
        res.add(f"recipe{i}", label, accuracy, "% test")
        if i == 0:
            gain = accuracy - max(free.values())
            res.add("short_run_gain", "emp short run minus the best training-free head",
                    gain, "points", ">= 25", gain >= 25)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = parser("learning", __doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=300, help="training episodes per recipe")
    args = p.parse_args(argv)
    from store import open_store
    from store.random_store import hidden_order_store

    episodes = 12 if args.quick else args.episodes
    test = dict(split="test", way=5, shot=1, query=1, episodes=50 if args.quick else 500, seed=7)
    res = Result("learning", args.quick, args.device)
    res.config = {"store": "hidden_order_store(seed=0)", "episodes": episodes, "test": test}
    with Scratch(args.work, "learning") as work:
        classes = {"train": 10, "val": 6, "test": 6} if args.quick else None
        hidden_order_store(work / "store", classes=classes).close()
        store = open_store(work / "store")
        free = score_untrained(res, store, test)
        score_recipes(res, store, work, episodes, test, free)
    res.notes.append(
        f"every recipe trains {episodes} episodes from seed 0 (5-way 1-shot, 5 queries); "
        f"test accuracy over the same {test['episodes']} episodes; chance is 20%"
    )
    res.write(args.out)


if __name__ == "__main__":
    main()
