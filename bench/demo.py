"""`make demo`: synthetic videos -> store -> train emp -> evaluate four heads on 10,000 episodes.

    python -m bench.demo [--out demo] [--train-episodes 300] [--eval-episodes 10000]

1. `fsar-synth` writes a small dataset of moving shapes whose classes are time-reversal pairs;
2. `fsar-extract` encodes it with the tiny ViT (`--pretrained none`) into `demo/store` (`--tokens`
   instead writes reversal-pair token sequences through the store API, skipping video);
3. `fsar-train` trains `emp` for `--train-episodes` episodes (5-way 1-shot, 5 queries);
4. `fsar-eval` scores zeroshot, proto, otam and emp on the same 10,000 test episodes; a table follows.
With random (`none`) weights the text embeddings carry no meaning, so zero-shot sits at chance.
Runs in a few minutes on 2 CPU cores.
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

import numpy as np


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    print("$", " ".join(args), flush=True)
    result = subprocess.run(args, env=env, text=True, capture_output=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        raise SystemExit(f"demo: step failed ({' '.join(args[:3])} ...)")
    return result


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def token_store(path: Path, seed: int = 0) -> None:
    """Stand-in for extraction: reversal-pair token sequences written through the store API."""
    from store.random_store import random_spec, write_random_store

    frames, patches, dim, per_class = 8, 16, 64, 12
    classes = {"train": 10, "val": 6, "test": 6}
    spec = random_spec(frames=frames, views=1, dim=dim, width=dim, patches=patches)
    rng = np.random.default_rng(seed)
    n_pairs = sum(classes.values()) // 2
    paths = rng.standard_normal((n_pairs, frames, dim))
    names = [e["name"] for e in spec["tensors"] if e["name"].startswith("tokens/")]

    def tokens(row: int, row_rng: np.random.Generator) -> dict[str, np.ndarray]:
        label = row // per_class
        base = paths[label // 2][:: -1 if label % 2 else 1]
        return {
            n: (
                3 * base[None, :, None]
                + 9.0 * row_rng.standard_normal((1, frames, 1 + patches, dim))
            ).astype(np.float16)
            for n in names
        }

    write_random_store(path, spec, classes, per_class, seed=seed, tokens_fn=tokens).close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="working directory (recreated)")
    parser.add_argument("--train-episodes", type=int, default=300)
    parser.add_argument("--eval-episodes", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokens", action="store_true", help="skip video extraction: write synthetic tokens"
    )
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    start = time.perf_counter()

    store = out / "store"
    if not args.tokens:
        run(
            cli(
                "synth",
                "--out",
                str(out / "data"),
                "--classes",
                "24",
                "--videos-per-class",
                "8",
                "--seed",
                str(args.seed),
            ),
            env,
        )
        run(cli("extract", "--dataset", "folder", "--data-root", str(out / "data"), "--store", str(store),
                "--model", "fsar-tiny-vit", "--pretrained", "none"), env)  # fmt: skip
        source = "fsar-synth videos, tiny ViT (pretrained none)"
    else:
        print("writing reversal-pair tokens through the store API (no video extraction)")
        token_store(store, args.seed)
        source = "synthetic reversal-pair tokens written through the store API"

    run(cli("train", "--store", str(store), "--head", "emp", "--episodes", str(args.train_episodes),
            "--episodes-per-step", "4", "--lr", "1e-3", "--val-every", str(max(4, args.train_episodes // 4 // 4 * 4)),
            "--val-episodes", "500", "--val-way", "4", "--out", str(out / "runs" / "emp"), "--seed", str(args.seed), "--no-progress"), env)  # fmt: skip
    rows = []
    for head in ("zeroshot", "proto", "otam", "emp"):
        target = ["--checkpoint", str(out / "runs" / "emp")] if head == "emp" else ["--head", head]
        result_file = out / f"eval_{head}.json"
        run(cli("eval", "--store", str(store), *target, "--episodes", str(args.eval_episodes), "--seed", str(args.seed),
                "--json", str(result_file), "--no-progress"), env)  # fmt: skip
        rows.append(json.loads(result_file.read_text()))

    print(f"\nfsar demo: {source}; emp trained for {args.train_episodes} episodes")
    print(
        "| head | accuracy (%) | 95% CI | episodes | setting | eval seconds |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(f"| {r['head']} | {r['accuracy']:.2f} | ± {r['ci95']:.2f} | {r['episodes']} | "
              f"{r['way']}-way {r['shot']}-shot, {r['split']} | {r['seconds']:.1f} |")  # fmt: skip
    print(f"\ntotal {time.perf_counter() - start:.0f} s; chance is {100 / rows[0]['way']:.0f}%")


if __name__ == "__main__":
    main()
