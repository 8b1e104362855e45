"""The learning map: every head on every store of the generated family, trained with one recipe.

    python -m bench.learning --map [--rows NAME,NAME] [--episodes 300] [--quick] [--work DIR]

Each row of `store.learning_family.FAMILY` is written as its own store (seed 0). The training-free
heads and the untrained emp are scored as they are; every trainable head trains with the same short
recipe (`fsar-train --episodes 300 --lr 3e-3`, every other option at its default, the checkpoint
chosen on the val split), then every head is scored on the same 500 test episodes (5-way 1-shot).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import Result, Scratch, parser

# `python -m bench.run_all --report` puts this above the map in docs/performance.md
HOW_TO_READ = """
Test accuracy (%, 5-way 1-shot, 500 episodes; chance 20) of every head on every store of the
generated family. Each row changes one factor of the base row; the trained heads all ran the same
short recipe. The reading under the map says, per row, which heads learn and which fit the base
classes without transferring.
"""

EPISODES = 300
LR = 3e-3
TEST = dict(split="test", way=5, shot=1, query=1, episodes=500, seed=7)
FREE = ("zeroshot", "proto", "otam")
# column -> (head, head options); trained with the recipe above where the store has what it reads
TRAINED: dict[str, tuple[str, dict[str, Any]]] = {
    "probe": ("probe", {}),
    "emp": ("emp", {}),
    "emp (released loss)": ("emp", {"loss": "released"}),
    "lastlayer": ("lastlayer", {}),
    "tsfsar": ("tsfsar", {}),
}
COLUMNS = (*FREE, "emp untrained", *TRAINED)
LEARNS = (
    10.0  # test points a trained head gains over the same head untrained that count as learning
)
BASE_EPISODES = 200  # test episodes drawn from the base (train) classes: does a head fit them?
VAL_EPISODES = 100  # val episodes at each of the two checkpoints (episodes N/2 and N)


def train_head(
    store: Path,
    out: Path,
    head: str,
    options: dict,
    episodes: int,
    val: int,
    val_every: int = 0,
    **training: Any,
) -> Path:
    """`fsar-train --store S --head H --episodes N --lr 3e-3` with `options` as head options
    (`training`: other fsar-train options, e.g. lr; validation every `val_every` episodes, by
    default at N/2 and N)."""
    from heads.train import TrainConfig, train

    explicit = dict(store=str(store), head=head, episodes=episodes, lr=LR, head_options=options)
    explicit.update(training)
    every = val_every or max(1, episodes // 2)
    quiet = dict(out=str(out), progress=False, val_every=every, val_episodes=val)
    return train(TrainConfig(**explicit, **quiet).resolved(explicit=set(explicit)))


def curve(run: Path) -> dict[str, Any]:
    """The run's training loss (mean of the first and last tenth, and every record) and its
    validation accuracies."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [(r["episode"], r["loss"]) for r in records if r.get("kind") == "train"]
    losses = [loss for _, loss in train]
    val = [(r["episode"], r["val_accuracy"]) for r in records if "val_accuracy" in r]
    head = max(1, len(losses) // 10)
    return {
        "loss_first": sum(losses[:head]) / head,
        "loss_last": sum(losses[-head:]) / head,
        "val": val,
        "loss": train,
    }


def score_row(store_path: Path, work: Path, episodes: int, test: dict, val: int) -> dict:
    """Accuracy of every column on one store; each trained run's curve, its untrained accuracy
    (same options, seed 0) and its accuracy on the base classes. A finished column is kept in
    `work` (its own JSON, keyed on what it depends on) so an interrupted map resumes there."""
    import torch

    from heads.evaluate import evaluate, load_run
    from heads.train import build_head
    from store import open_store

    store = open_store(store_path)
    untrained_cache: dict[str, float] = {}

    def untrained(name: str, options: dict) -> float:
        # the loss does not change an untrained head's predictions
        key = json.dumps([name, {k: v for k, v in options.items() if k != "loss"}], sort_keys=True)
        if key not in untrained_cache:
            torch.manual_seed(0)
            head = build_head(name, options, store, torch.device("cpu"))
            untrained_cache[key] = evaluate(head, store, **test).accuracy
        return untrained_cache[key]

    accuracy = {name: untrained(name, {}) for name in FREE}
    accuracy["emp untrained"] = untrained("emp", {})
    runs: dict[str, dict] = {}
    for i, (column, (head, options)) in enumerate(TRAINED.items()):
        done = work / f"column{i}.json"
        key = [head, options, episodes, test, val]
        if done.exists() and json.loads(done.read_text())["key"] == key:
            runs[column] = json.loads(done.read_text())["run"]
        else:
            start = time.perf_counter()
            shutil.rmtree(work / f"run{i}", ignore_errors=True)  # an interrupted column's run
            run = train_head(store_path, work / f"run{i}", head, options, episodes, val)
            trained = load_run(run, store)
            base = {**test, "split": "train", "episodes": BASE_EPISODES}
            runs[column] = {**curve(run), "test_accuracy": evaluate(trained, store, **test).accuracy,
                            "base_accuracy": evaluate(trained, store, **base).accuracy,
                            "untrained": untrained(head, options),
                            "seconds": time.perf_counter() - start}  # fmt: skip
            shutil.rmtree(run, ignore_errors=True)
            done.write_text(json.dumps({"key": key, "run": runs[column]}))
        accuracy[column] = runs[column]["test_accuracy"]
    return {"accuracy": accuracy, "runs": runs}


def reading(row: dict) -> str:
    """One line: which heads training lifts (and above every training-free head), which fit the
    base classes without transferring to the novel ones."""
    acc, runs = row["accuracy"], row["runs"]
    best = max(FREE, key=lambda h: acc[h])
    lifted = [c for c in TRAINED if acc[c] >= runs[c]["untrained"] + LEARNS]
    above = [c for c in lifted if acc[c] >= acc[best] + LEARNS]
    lowered = [c for c in TRAINED if acc[c] <= runs[c]["untrained"] - LEARNS]
    fits = [c for c in TRAINED if c not in lifted and runs[c]["base_accuracy"] >= acc[c] + LEARNS]
    parts = [f"training-free best {best} {acc[best]:.0f}"]
    if lifted:
        moves = [f"{c} {runs[c]['untrained']:.0f} -> {acc[c]:.0f}" for c in lifted]
        parts.append(f"training lifts {', '.join(moves)}")
        if above:
            parts.append(f"above every training-free head: {', '.join(above)}")
    else:
        parts.append("training lifts no head")
    if lowered:
        moves = [f"{c} {runs[c]['untrained']:.0f} -> {acc[c]:.0f}" for c in lowered]
        parts.append(f"training lowers {', '.join(moves)}")
    if fits:
        fitted = [f"{c} (base {runs[c]['base_accuracy']:.0f}, test {acc[c]:.0f})" for c in fits]
        parts.append(f"fit the base classes without transferring: {', '.join(fitted)}")
    return "; ".join(parts)


def map_lines(res: dict) -> list[str]:
    """The map as a markdown table (rows x heads) with one reading per row."""
    rows = res["config"]["rows"]
    lines = ["| store | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, row in rows.items():
        cells = [f"{row['accuracy'][c]:.1f}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Reading, row by row:", ""]
    lines += [f"- **{name}**: {reading(row)}." for name, row in rows.items()]
    return lines


def plot_map(res: dict, path: Path) -> None:
    """The map as a picture: accuracy per store (rows) and head (columns), chance marked white."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    rows = res["config"]["rows"]
    values = np.array([[row["accuracy"][c] for c in COLUMNS] for row in rows.values()])
    fig, ax = plt.subplots(figsize=(1.1 * len(COLUMNS) + 3.2, 0.42 * len(rows) + 1.6))
    norm = TwoSlopeNorm(vmin=0, vcenter=100 / TEST["way"], vmax=100)
    ax.imshow(values, cmap="RdBu", norm=norm, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8,
                color="white" if value > 75 else "black")  # fmt: skip
    ax.set_xticks(range(len(COLUMNS)), [c.replace(", ", ",\n") for c in COLUMNS], fontsize=8)
    ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
    ax.xaxis.tick_top()
    ax.axvline(len(FREE) + 0.5, color="black", lw=1)  # training-free and untrained | trained
    ax.set_title(
        f"test accuracy (%), 5-way 1-shot, chance {100 / TEST['way']:.0f} (white); "
        f"trained: {res['config']['episodes']} episodes at lr {res['config']['lr']:g}",
        fontsize=9, pad=28,
    )  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None, module: str = "learning_map") -> None:
    """`python -m bench.learning_map`, or `python -m bench.learning --map` (module "learning")."""
    p = parser(module, __doc__.splitlines()[0])
    p.add_argument("--rows", default="", help="comma-separated row names (default: every row)")
    p.add_argument("--episodes", type=int, default=EPISODES, help="training episodes per head")
    args = p.parse_args(argv)
    from store.learning_family import FAMILY, write_learning_store

    names = [n for n in args.rows.split(",") if n] or list(FAMILY)
    unknown = [n for n in names if n not in FAMILY]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(FAMILY)}")
    episodes, test, val = EPISODES, dict(TEST), VAL_EPISODES
    if args.quick:  # a tiny store, one row, a handful of episodes: the code path, not the figures
        names, episodes, val = names[:1], 6, 10
        test["episodes"] = 20
    else:
        episodes = args.episodes
    res = Result("learning_map", args.quick, args.device, module=module)
    rows: dict[str, dict] = {}
    with Scratch(args.work, "learning-map") as work:
        for name in names:
            i = list(FAMILY).index(name)  # row{i}: its files in --work, whichever rows run
            factors = FAMILY[name]
            if args.quick:
                factors = factors.__class__(**{**asdict(factors), **QUICK_SIZES})
            done = work / f"row{i}.json"  # a finished row, kept in --work DIR for a rerun
            key = {"factors": asdict(factors), "episodes": episodes, "columns": list(COLUMNS)}
            if done.exists() and json.loads(done.read_text())["key"] == key:
                row = json.loads(done.read_text())["row"]
            else:
                path = work / f"row{i}"
                shutil.rmtree(path / "store", ignore_errors=True)
                write_learning_store(path / "store", factors).close()
                row = score_row(path / "store", path, episodes, test, val)
                shutil.rmtree(path, ignore_errors=True)
                done.write_text(json.dumps({"key": key, "row": row}))
            rows[name] = {**row, "factors": asdict(factors)}
            for column in COLUMNS:
                res.add(f"{i}.{column}", f"{name}: {column}", row["accuracy"][column], "% test")
            print(f"{name}: {reading(row)}", flush=True)
    res.config = {"rows": rows, "episodes": episodes, "lr": LR, "test": test, "val_episodes": val}
    res.notes.append(
        f"trained heads: {episodes} episodes at lr {LR:g}, every other option at fsar-train's default "
        f"(checkpoint chosen on {val} val episodes); test: the same {test['episodes']} episodes for every "
        "head; chance is 20%"
    )
    path = res.write(args.out)
    plot_map({"config": res.config}, path.with_suffix(".png"))


# quick mode: the smallest stores the family allows (every split two pairs, D 16, 4 frames)
QUICK_SIZES = dict(base_classes=6, val_classes=6, test_classes=6, videos_per_class=6, dim=16,
                   frames=4, patches=4, carriers=2)  # fmt: skip


if __name__ == "__main__":
    main()
