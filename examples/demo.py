"""`make demo`: the whole job twice, on synthetic videos and on a store where only training helps.

    python -m examples.demo [--out demo] [--train-episodes 300] [--eval-episodes 10000] [--skip-videos]

1. Videos: `fsar-synth` writes moving shapes whose classes come in time-reversal pairs,
   `fsar-extract` encodes them with the tiny ViT (random weights, `--pretrained none`), `fsar-train`
   trains `emp` (`--no-text`: a random text tower gives meaningless class names), and `fsar-eval`
   scores every head on the same test episodes. Random ViT features carry little that a trained head
   can add to the training-free ones, so this table shows the pipeline end to end, not learning.
2. Hidden order: `store.random_store.hidden_order_store` writes tokens (and, recipe `emp+ts`, taps 0,
   4, 8, 12 of the residual stream) whose classes differ only in the order of a signal that a strong
   shared nuisance hides from every fixed metric. `probe`, `emp` and `tsfsar` train with the README's
   short run; the table shows what training adds (`tsfsar` also with its TS-DCM matcher alone: the
   store's class texts name reversal pairs, never the order inside one).
Each table has the untrained `emp` next to the trained one. Runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    print("$", " ".join(args), flush=True)
    result = subprocess.run(args, env=env, text=True, capture_output=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        raise SystemExit(f"demo: step failed ({' '.join(args[:3])} ...)")
    return result


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def train_and_evaluate(
    store: Path, out: Path, trained: dict[str, list[str]], args: argparse.Namespace, env: dict
) -> list[dict]:
    """Train each head in `trained` (name -> extra options), then evaluate every head."""
    for head, options in trained.items():
        run(cli("train", "--store", str(store), "--head", head, "--episodes", str(args.train_episodes),
                "--lr", str(args.lr), "--val-every", str(max(1, args.train_episodes // 2)),
                "--val-episodes", "300", "--val-way", "4", "--out", str(out / "runs" / head),
                "--seed", str(args.seed), "--no-progress", *options), env)  # fmt: skip
    targets = [(name, ["--head", name]) for name in ("zeroshot", "proto", "otam")]
    targets.append(("emp (untrained)", ["--head", "emp", *option_pairs(trained.get("emp", []))]))
    if "tsfsar" in trained:
        targets.append(("tsfsar (untrained)", ["--head", "tsfsar"]))
    targets += [(f"{h} (trained)", ["--checkpoint", str(out / "runs" / h)]) for h in trained]
    if "tsfsar" in trained:  # the store's texts name pairs only: the matcher alone reads the order
        only_matching = ["--option", "fuse_clip=0", "--option", "fuse_side=0"]
        targets.append(("tsfsar (trained, TS-DCM only)",
                        ["--checkpoint", str(out / "runs" / "tsfsar"), *only_matching]))  # fmt: skip
    rows = []
    for label, target in targets:
        result_file = out / f"eval_{len(rows)}.json"
        run(cli("eval", "--store", str(store), *target, "--episodes", str(args.eval_episodes),
                "--seed", str(args.seed), "--json", str(result_file), "--no-progress"), env)  # fmt: skip
        rows.append({**json.loads(result_file.read_text()), "head": label})
    return rows


def option_pairs(train_flags: list[str]) -> list[str]:
    """fsar-train's emp flags as fsar-eval --option pairs (the untrained head matches the trained)."""
    return ["--option", "no_text=true"] if "--no-text" in train_flags else []


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| head | accuracy (%) | 95% CI | episodes | setting |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head']} | {r['accuracy']:.2f} | ± {r['ci95']:.2f} | {r['episodes']} | "
              f"{r['way']}-way {r['shot']}-shot, {r['split']} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="working directory (recreated)")
    parser.add_argument("--train-episodes", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (short run)")
    parser.add_argument("--eval-episodes", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-videos", action="store_true", help="only the hidden-order part")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    start = time.perf_counter()
    tables = []

    if not args.skip_videos:
        videos = out / "videos"
        run(cli("synth", "--out", str(videos / "data"), "--classes", "24", "--videos-per-class", "8",
                "--seed", str(args.seed)), env)  # fmt: skip
        run(cli("extract", "--dataset", "folder", "--data-root", str(videos / "data"), "--store",
                str(videos / "store"), "--model", "fsar-tiny-vit", "--pretrained", "none"), env)  # fmt: skip
        rows = train_and_evaluate(videos / "store", videos, {"emp": ["--no-text"]}, args, env)
        tables.append(("1. fsar-synth videos, tiny ViT with random weights (emp --no-text)", rows))

    hidden = out / "hidden-order"
    print("$ hidden_order_store(...)  # tokens written through the store API", flush=True)
    subprocess.run([sys.executable, "-c", "import sys; from store.random_store import "
                    "hidden_order_store as h; h(sys.argv[1], seed=int(sys.argv[2]), "
                    "recipe='emp+ts', taps=(0, 4, 8, 12)).close()",
                    str(hidden / "store"), str(args.seed)], env=env, check=True)  # fmt: skip
    trained = {"probe": [], "emp": [], "tsfsar": []}
    rows = train_and_evaluate(hidden / "store", hidden, trained, args, env)
    tables.append(("2. hidden-order tokens: only a learned projection sees the classes", rows))

    print(f"\nfsar demo: trained heads ran {args.train_episodes} episodes at lr {args.lr:g}")
    for title, rows in tables:
        print_table(title, rows)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; chance is {100 / rows[0]['way']:.0f}%")


if __name__ == "__main__":
    main()
