"""Why emp fits a store's base classes and transfers nothing: one change at a time, on map rows.

    python -m bench.learning [--rows NAME,NAME] [--size small|full] [--quick] [--work DIR]
    python -m bench.learning --map          # the learning map itself (bench/learning_map.py)

Each variant trains emp from seed 0 with the learning map's short recipe (300 episodes at lr 3e-3,
everything else fsar-train's default) and changes one thing: the loss, the text branch, the levels,
the skip fusion, the learning rate, the regularisation, the length of the run. On the row where emp
fits the base classes and transfers nothing (`independent`) every variant runs; on a row where emp
learns through its skip fusion (`signal in layers 1-4 only`; any row with `--rows`), the variants
that change its structure run too: does the change hurt there? Every variant
is scored on the row's novel test classes (500 episodes) and on its base classes (200 episodes
drawn from the train split), its validation accuracy is recorded every 50 episodes (the curves
plot), and the collapse of its matching features is measured: the mean cosine between the frame
features of different test videos (near 1: every video looks the same). By default the rows are
built at `store.learning_family.SMALL` sizes (a tenth of the cost; the failure reproduces there),
`--size full` builds them as the map does.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.common import Result, Scratch, parser
from bench.learning_map import BASE_EPISODES, LR, TEST, curve, train_head

# `python -m bench.run_all --report` puts this above the figures in docs/performance.md
HOW_TO_READ = """
emp on the learning map's row where it fits the base classes and transfers nothing (`independent`),
one change at a time, and the structural changes again on a row where it learns through its skip
fusion (`signal in layers 1-4 only`), both at `SMALL` sizes: test accuracy on novel classes (chance
20), accuracy on base classes, and how collapsed the matching features are (mean cosine between
different videos; the untrained head is the yardstick). The plot shows the independent row's
training loss against its val accuracy.
"""

ROW = "independent"
# label -> (head, head options, training options other than the map's recipe)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "emp, fsar default": ("emp", {}, {}),
    "emp, released loss": ("emp", {"loss": "released"}, {}),
    "emp, without text": ("emp", {"no_text": True}, {}),
    "emp, token level only": ("emp", {"levels": "token"}, {}),
    "emp, without skip fusion": ("emp", {"no_skip_fusion": True}, {}),
    "emp, without skip fusion or text": ("emp", {"no_skip_fusion": True, "no_text": True}, {}),
    "emp, skip-fusion weights learned from 0": (
        "emp",
        {"layer_weights": True, "layer_weight_init": 0.0},
        {},
    ),  # fmt: skip
    "emp, skip-fusion weights learned from 0, without text": (
        "emp",
        {"layer_weights": True, "layer_weight_init": 0.0, "no_text": True},
        {},
    ),  # fmt: skip
    "emp, lr 1e-3": ("emp", {}, {"lr": 1e-3}),
    "emp, weight decay 0.1": ("emp", {}, {"weight_decay": 0.1}),
    "emp, no dropout": ("emp", {"attn_dropout": 0.0, "ffn_dropout": 0.0}, {}),
    "emp, 1,200 episodes": ("emp", {}, {"episodes": 1200}),
    "probe (reference)": ("probe", {}, {}),
}
# rows where emp learns: the structural variants run there too
CHECKS = (
    "emp, fsar default",
    "emp, without text",
    "emp, without skip fusion",
    "emp, without skip fusion or text",
    "emp, skip-fusion weights learned from 0",
)
ROWS = {ROW: tuple(VARIANTS), "signal in layers 1-4 only": CHECKS}


def between_video_cosine(head: Any, store: Any, videos: int = 60) -> float:
    """Mean cosine between frame features of different test videos, over the head's levels.

    Each level of `video_features` is reduced to one vector per frame (extra axes averaged), then
    every frame of a video is compared with every frame of the others.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    head.eval()
    rows = store.select(split="test")[:: max(1, len(store.select(split="test")) // videos)]
    roles = head.inputs(store.spec)
    data = store.read(rows, list(roles.values()), view=0)
    inputs = {r: torch.as_tensor(data[n].astype(np.float32)) for r, n in roles.items()}
    with torch.no_grad():
        features = head.video_features(inputs)
    values = []
    for x in features.values():
        x = x.flatten(3).mean(3) if x.dim() > 3 else x  # (B, T, D)
        x = F.normalize(x.reshape(len(rows), -1, x.shape[-1]), dim=-1)
        cos = torch.einsum("atd,bsd->ab", x, x) / x.shape[1] ** 2
        values.append(float(cos[~torch.eye(len(rows), dtype=torch.bool)].mean()))
    return float(np.mean(values))


def finished(run: Path, head: str, options: dict, episodes: int, training: dict) -> bool:
    """Whether `run` is a finished run of this variant (its config says so, its last val record
    is at its last episode)."""
    try:
        cfg = json.loads((run / "config.json").read_text())["config"]
        last = curve(run)["val"][-1][0]
    except (OSError, ValueError, KeyError, IndexError):
        return False
    chosen = {k: v for k, v in cfg["head_options"].items() if k != "dim"}  # dim: the store's
    wanted = {"lr": LR, **training}
    return (
        cfg["head"] == head
        and chosen == options
        and cfg["episodes"] == episodes == last
        and all(cfg.get(k) == v for k, v in wanted.items())
    )


def score_variants(
    res: Result, store_path: Path, work: Path, episodes: int, test: dict, variants: list[str],
    row: int,
) -> dict[str, dict]:  # fmt: skip
    """Train and score `variants` on map row number `row` (figure keys `<row>.v<i>`), the
    untrained emp first, as the yardstick; returns each variant's curves."""
    import torch

    from heads.evaluate import evaluate, load_run
    from heads.train import build_head
    from store import open_store

    store = open_store(store_path)
    base_test = {**test, "split": "train", "episodes": min(BASE_EPISODES, test["episodes"])}
    name = res.config["rows"][row]

    def score(key: str, label: str, head: Any, classes: bool = True) -> None:
        accuracy = evaluate(head, store, **test).accuracy
        res.add(f"{row}.{key}.test", f"{name}: {label}: test classes", accuracy, "%")
        if classes:
            base = evaluate(head, store, **base_test).accuracy
            res.add(f"{row}.{key}.base", f"{name}: {label}: base classes", base, "%")
        if head.name == "emp":
            cos = between_video_cosine(head, store)
            res.add(f"{row}.{key}.cos", f"{name}: {label}: cosine between videos", cos, "cos")

    torch.manual_seed(0)
    score("untrained", "emp, untrained", build_head("emp", {}, store, torch.device("cpu")), False)
    curves = {}
    for i, label in enumerate(variants):
        head, options, training = VARIANTS[label]
        n = training.get("episodes", episodes) if episodes >= 100 else episodes
        others = {k: v for k, v in training.items() if k != "episodes"}
        val, every = (100, 50) if n >= 100 else (10, 0)
        run = work / f"v{i}"
        if not finished(run, head, options, n, others):  # a finished run in --work is reused
            shutil.rmtree(run, ignore_errors=True)
            run = train_head(store_path, run, head, options, n, val, every, **others)
        score(f"v{i}", label, load_run(run, store))
        c = curve(run)
        curves[label] = {"loss": c["loss"], "val": c["val"]}
        res.notes.append(
            f"{name}, {label}: training loss {c['loss_first']:.2f} -> {c['loss_last']:.2f}; val "
            "accuracy " + ", ".join(f"{acc:.0f} at {ep}" for ep, acc in c["val"])
        )
    return curves


def table_lines(res: dict) -> list[str]:
    """The figures as one markdown table: a line per variant, test / base accuracy and the cosine
    between videos per row."""
    rows = res["config"]["rows"]
    cells: dict[str, dict[str, str]] = {}
    for fig in res["figures"]:
        row, label, kind = fig["label"].rsplit(": ", 2)
        kind = {"test classes": "test", "base classes": "base", "cosine between videos": "cos"}[
            kind
        ]
        value = f"{fig['value']:.2f}" if kind == "cos" else f"{fig['value']:.1f}"
        cells.setdefault(label, {})[f"{row} {kind}"] = value
    columns = [f"{row} {kind}" for row in rows for kind in ("test", "base", "cos")]
    head = [f"{row}: {kind}" for row in rows for kind in ("test %", "base %", "cosine")]
    lines = ["| variant | " + " | ".join(head) + " |", "|---|" + "---:|" * len(columns)]
    for label, values in cells.items():
        lines.append(f"| {label} | " + " | ".join(values.get(c, "") for c in columns) + " |")
    return lines


def plot_curves(curves: dict[str, dict], path: Path, chance: float = 20.0) -> None:
    """Training loss (left, smoothed over 10 records) and val accuracy (right) of each variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.get_cmap("tab20")
    for i, (label, c) in enumerate(curves.items()):
        style = dict(color=colors(i % 20), lw=1.2, ls="--" if "probe" in label else "-")
        episodes, losses = np.array(c["loss"]).T if c["loss"] else ([], [])
        if len(losses) >= 10:
            smooth = np.convolve(losses, np.ones(10) / 10, mode="valid")
            ax_loss.plot(episodes[9:], smooth, **style)
        if c["val"]:
            ax_val.plot(*np.array(c["val"]).T, marker="o", ms=3, label=label, **style)
    ax_loss.set(xlabel="episode", ylabel="training loss (base classes)", yscale="log",
                title="training loss (running mean of 10 records)")  # fmt: skip
    ax_val.axhline(chance, color="gray", lw=0.8, ls=":")
    ax_val.set(xlabel="episode", ylabel="val accuracy (%)", ylim=(0, 100),
               title=f"accuracy on novel val classes (chance {chance:.0f}, dotted)")  # fmt: skip
    ax_val.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")  # the legend sits outside the axes
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--map" in argv:
        from bench.learning_map import main as learning_map

        return learning_map([a for a in argv if a != "--map"], module="learning")
    p = parser("learning", __doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated learning map rows "
                   f"(default: {', '.join(ROWS)}; the first runs every variant)")  # fmt: skip
    p.add_argument("--size", choices=("small", "full"), default="small",
                   help="row sizes: store.learning_family.SMALL (default) or the map's")  # fmt: skip
    p.add_argument("--episodes", type=int, default=300, help="training episodes per variant")
    p.add_argument(
        "--map", action="store_true", help="the learning map instead (bench/learning_map.py)"
    )
    args = p.parse_args(argv)
    from dataclasses import asdict, replace

    from bench.learning_map import QUICK_SIZES
    from store.learning_family import FAMILY, SMALL, write_learning_store

    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in FAMILY]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(FAMILY)}")
    test, episodes = dict(TEST), args.episodes
    sizes = SMALL if args.size == "small" else {}
    if args.quick:
        rows, sizes, test["episodes"], episodes = rows[:1], QUICK_SIZES, 20, 6
    res = Result("learning", args.quick, args.device)
    res.config = {"rows": rows, "size": args.size, "factors": {}, "episodes": episodes,
                  "test": test, "curves": {}}  # fmt: skip
    with Scratch(args.work, "learning") as work:
        for i, row in enumerate(rows):
            factors = replace(FAMILY[row], **sizes)
            res.config["factors"][row] = asdict(factors)
            shutil.rmtree(work / f"store{i}", ignore_errors=True)  # seeded: the same store again
            write_learning_store(work / f"store{i}", factors, ts=False).close()
            variants = list(ROWS.get(row, CHECKS)) if i else list(VARIANTS)
            variants = variants[:3] if args.quick else variants  # quick: the code path
            curves = score_variants(res, work / f"store{i}", work / f"row{i}", episodes, test,
                                    variants, i)  # fmt: skip
            res.config["curves"][row] = curves
    res.notes.insert(
        0,
        f"rows of the learning map at {'SMALL' if args.size == 'small' else 'full'} size; every "
        f"variant trains from seed 0, {episodes} episodes at lr 3e-3 unless it says otherwise; test: "
        f"the same {test['episodes']} episodes for every variant, base classes: "
        f"{min(BASE_EPISODES, test['episodes'])} episodes of the train split; chance is 20%",
    )
    path = res.write(args.out)
    plot_curves(res.config["curves"][rows[0]], path.with_suffix(".png"))


if __name__ == "__main__":
    main()
