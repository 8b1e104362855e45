"""Memory benchmark: peak RSS of `fsar-train` when the split streams (> --max-ram) vs when it fits.

A random `emp+last` store with ViT-B/16 shapes (T=8, 197 tokens, W=768) whose train split is 15
classes x 20 videos; `lastlayer` reads `tokens/layer12_in`, 2.4 MB per video, 726 MB for the split
(`--quick`: tiny shapes). The same `fsar-train --head lastlayer` command (4 episodes, one validation)
runs twice in its own process: `--max-ram` below the split's size (the loader streams chunks with
a bounded prefetch queue) and above it (the split is loaded once). Peak RSS is the child's
`ru_maxrss` from wait4. The baseline is a process that only imports torch, heads and store.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.common import (
    Result,
    Scratch,
    fsar_command,
    parser,
    peak_rss_of,
    resolve_device,
    tiny_spec,
    vit_b16_spec,
)
from bench.workload import build_store

# `python -m bench.run_all --report` puts this above the figures in docs/performance.md
HOW_TO_READ = """
Peak RSS of the same `fsar-train` run with the split streamed from the store and loaded into
RAM: streaming must save memory; the baseline is what Python, torch and fsar cost before any data.
"""


def train_command(
    store: Path, out: Path, episodes: int, max_ram_gb: float, device: str
) -> list[str]:
    """`fsar-train --head lastlayer`: `episodes` episodes in one optimiser step, one validation."""
    cmd = fsar_command("train") + ["--store", str(store), "--head", "lastlayer"]
    cmd += ["--episodes", str(episodes), "--episodes-per-step", str(episodes)]
    cmd += ["--val-every", str(episodes), "--val-episodes", "5"]
    cmd += ["--max-ram", f"{max_ram_gb:.6f}", "--device", device, "--no-progress"]
    return cmd + ["--out", str(out)]


def checked_peak_rss(cmd: list[str], what: str) -> float:
    """Peak RSS (MiB) of `cmd` run as a child; RuntimeError with its output if it fails."""
    peak, code, tail = peak_rss_of(cmd)
    if code != 0:
        raise RuntimeError(f"{what} failed ({code}):\n{tail}")
    return peak


def main(argv: list[str] | None = None) -> Path:
    p = parser("memory", __doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=None, help="train classes [15]")
    p.add_argument("--videos-per-class", type=int, default=None, help="[20]")
    p.add_argument("--episodes", type=int, default=4)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    quick = args.quick
    spec = (tiny_spec if quick else vit_b16_spec)("emp+last")
    n_classes = args.classes or (6 if quick else 15)
    per_class = args.videos_per_class or (8 if quick else 20)
    res = Result("memory", quick, device)
    with Scratch(args.work, "memory") as work:
        store_path = work / "store"
        _, store = build_store(store_path, spec, {"train": (n_classes, per_class), "val": (5, 2)})
        from store.layout import row_bytes

        split_bytes = row_bytes(store.spec, ["tokens/layer12_in"]) * n_classes * per_class
        max_ram = {"streamed": split_bytes / 4 / 1e9, "in RAM": split_bytes * 4 / 1e9}  # GB
        res.config = {
            "head": "lastlayer (reads tokens/layer12_in)",
            "shapes": {k: spec[k] for k in ("frames", "tokens", "width")},
            "train_videos": n_classes * per_class,
            "split_tensor_mb": round(split_bytes / 1e6, 1),
            "max_ram_gb": {label: round(gb, 4) for label, gb in max_ram.items()},
            "episodes": args.episodes,
        }
        baseline = [sys.executable, "-c", "import torch, heads, store, heads.train"]
        base = checked_peak_rss(baseline, "importing torch, heads and store")
        res.add("baseline_rss_mib", "baseline: python + torch + heads imported", base, "MiB")
        peaks = {}
        for label, gb in max_ram.items():
            out = work / f"run-{label.replace(' ', '-')}"
            peaks[label] = checked_peak_rss(
                train_command(store_path, out, args.episodes, gb, device), "fsar-train"
            )
            fits = "> --max-ram (streamed)" if label == "streamed" else "fits (in RAM)"
            res.add(f"peak_rss_mib.{label.replace(' ', '_')}",
                    f"fsar-train peak RSS, split {fits}", peaks[label], "MiB")  # fmt: skip
        res.add("split_mib", "train split tensors (layer12_in)", split_bytes / 2**20, "MiB")
        saved = peaks["in RAM"] - peaks["streamed"]
        res.add("streaming_saves_mib", "RAM saved by streaming", saved, "MiB",
                target="> 0 (full mode)", met=None if quick else saved > 0)  # fmt: skip
    return res.write(args.out)


if __name__ == "__main__":
    main()
