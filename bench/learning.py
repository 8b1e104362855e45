"""Why emp fits a store's base classes and transfers nothing: one change at a time, on one map row.

    python -m bench.learning [--row independent] [--quick] [--work DIR]
    python -m bench.learning --map          # the learning map itself (bench/learning_map.py)

Each variant trains emp from seed 0 with the learning map's short recipe (300 episodes at lr 3e-3,
everything else fsar-train's default) and changes one thing: the loss, the text branch, the levels,
the skip fusion, the learning rate, the regularisation, the length of the run. Every variant is
scored on the row's novel test classes (500 episodes) and on its base classes (200 episodes drawn
from the train split), and the collapse of its matching features is measured: the mean cosine
between the frame features of different test videos (near 1: every video looks the same).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.common import Result, Scratch, parser
from bench.learning_map import BASE_EPISODES, TEST, curve, train_head

# `python -m bench.run_all --report` puts this above the figures in docs/performance.md
HOW_TO_READ = """
emp on the learning map's row where it fits the base classes and transfers nothing, one change at a
time: test accuracy on novel classes (chance 20), accuracy on base classes, and how collapsed the
matching features are (mean cosine between different videos; the untrained head is the yardstick).
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
    "emp, skip-fusion weights learned (from 1)": ("emp", {"layer_weights": True}, {}),
    "emp, skip-fusion weights learned (from 0.5)": (
        "emp",
        {"layer_weights": True, "layer_weight_init": 0.5},
        {},
    ),  # fmt: skip
    "emp, skip-fusion weights learned (from 0)": (
        "emp",
        {"layer_weights": True, "layer_weight_init": 0.0},
        {},
    ),  # fmt: skip
    "emp, lr 1e-3": ("emp", {}, {"lr": 1e-3}),
    "emp, weight decay 0.1": ("emp", {}, {"weight_decay": 0.1}),
    "emp, no dropout": ("emp", {"attn_dropout": 0.0, "ffn_dropout": 0.0}, {}),
    "emp, 1,200 episodes": ("emp", {}, {"episodes": 1200}),
    "probe (reference)": ("probe", {}, {}),
}


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


def score_variants(
    res: Result, store_path: Path, work: Path, episodes: int, test: dict, variants: list[str]
) -> None:
    """Train and score `variants`; the untrained emp first, as the yardstick."""
    import torch

    from heads.evaluate import evaluate, load_run
    from heads.train import build_head
    from store import open_store

    store = open_store(store_path)
    base_test = {**test, "split": "train", "episodes": min(BASE_EPISODES, test["episodes"])}

    def score(key: str, label: str, head: Any, classes: bool = True) -> None:
        res.add(
            f"{key}.test", f"{label}: test classes", evaluate(head, store, **test).accuracy, "%"
        )
        if classes:
            base = evaluate(head, store, **base_test).accuracy
            res.add(f"{key}.base", f"{label}: base classes", base, "%")
        if head.name == "emp":
            cos = between_video_cosine(head, store)
            res.add(f"{key}.cos", f"{label}: cosine between videos", cos, "cos")

    torch.manual_seed(0)
    score("untrained", "emp, untrained", build_head("emp", {}, store, torch.device("cpu")), False)
    for i, label in enumerate(variants):
        head, options, training = VARIANTS[label]
        n = training.get("episodes", episodes) if episodes >= 100 else episodes
        others = {k: v for k, v in training.items() if k != "episodes"}
        run = train_head(
            store_path, work / f"v{i}", head, options, n, 200 if n >= 100 else 10, **others
        )
        score(f"v{i}", label, load_run(run, store))
        c = curve(run)
        res.notes.append(
            f"{label}: training loss {c['loss_first']:.2f} -> {c['loss_last']:.2f}; val accuracy "
            + ", ".join(f"{acc:.0f} at {ep}" for ep, acc in c["val"])
        )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--map" in argv:
        from bench.learning_map import main as learning_map

        return learning_map([a for a in argv if a != "--map"], module="learning")
    p = parser("learning", __doc__.splitlines()[0])
    p.add_argument("--row", default=ROW, help=f"the learning map row (default {ROW!r})")
    p.add_argument("--episodes", type=int, default=300, help="training episodes per variant")
    p.add_argument(
        "--map", action="store_true", help="the learning map instead (bench/learning_map.py)"
    )
    args = p.parse_args(argv)
    from dataclasses import asdict

    from bench.learning_map import QUICK_SIZES
    from store.learning_family import FAMILY, write_learning_store

    if args.row not in FAMILY:
        p.error(f"unknown row {args.row!r}; rows: {', '.join(FAMILY)}")
    factors, test, episodes = FAMILY[args.row], dict(TEST), args.episodes
    if args.quick:
        factors = factors.__class__(**{**asdict(factors), **QUICK_SIZES})
        test["episodes"], episodes = 20, 6
    res = Result("learning", args.quick, args.device)
    res.config = {"row": args.row, "factors": asdict(factors), "episodes": episodes, "test": test}
    with Scratch(args.work, "learning") as work:
        write_learning_store(work / "store", factors).close()
        variants = list(VARIANTS)[:3] if args.quick else list(VARIANTS)  # quick: the code path
        score_variants(res, work / "store", work, episodes, test, variants)
    res.notes.insert(
        0,
        f"row {args.row!r} of the learning map; every variant trains from seed 0, {episodes} episodes "
        f"at lr 3e-3 unless it says otherwise; test: the same {test['episodes']} episodes for every "
        f"variant, base classes: {min(BASE_EPISODES, test['episodes'])} episodes of the train "
        "split; chance is 20%",
    )
    res.write(args.out)


if __name__ == "__main__":
    main()
