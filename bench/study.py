"""Study benchmark: cells per hour of `fsar-study` on a LocalCluster of 1 and of 2 workers.

The store is `store.random_store.hidden_order_store` with 22 classes (10 train, 6 val, 6 test) x 12
videos of reversal-pair tokens, T=8, 16 patches, D=64 (`--quick`: a tiny random store). The plan has 8 trained cells (emp,
emp token level only, emp without text, emp without skip fusion; seeds 0 and 1), each training
60 episodes (validation at the end on 100) and testing on 1,000 episodes (`--quick`: 2 cells, 8
and 20). The same plan runs into two fresh folders through `heads.study.run_study`, on a
LocalCluster of 1 worker (all cores as torch threads) and of 2 workers (cores / 2 threads each):
  wall           seconds of run_study: cluster start, every cell, the report;
  cells/hour     cells / wall x 3600;
  scaling        cells/hour with 2 workers / with 1 (above 1: cells in parallel beat threads in
                 one cell at this size).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench.common import Result, Scratch, parser, resolve_device, tiny_spec
from bench.workload import build_store
from store.random_store import hidden_order_store

ROWS = [
    {"id": "emp", "head": "emp"},
    {"id": "token", "head": "emp", "options": {"levels": "token"}},
    {"id": "no-text", "head": "emp", "options": {"no_text": True}},
    {"id": "no-skip-fusion", "head": "emp", "options": {"no_skip_fusion": True}},
]


def plan(quick: bool) -> dict:
    train = {"episodes": 8 if quick else 60, "episodes_per_step": 4, "lr": 1e-3}
    train |= {"val_every": train["episodes"], "val_episodes": 10 if quick else 100}
    return {
        "name": "bench",
        "reference": "emp",
        "seeds": [0] if quick else [0, 1],
        "train": train,
        "eval": {"episodes": 20 if quick else 1000},
        "rows": ROWS[:2] if quick else ROWS,
    }


def bench_store(path: Path, quick: bool) -> str:
    """Write the study's store at `path` (unless it is there); returns what it is."""
    if quick:
        if not path.exists():
            build_store(path, tiny_spec("emp"), {"train": (5, 6), "val": (5, 2), "test": (5, 2)})
        return "tiny random store"
    if not path.exists():
        hidden_order_store(path, classes={"train": 10, "val": 6, "test": 6}).close()
    return "hidden_order_store, 22 classes x 12 videos (T=8, 16 patches, D=64)"


def timed_study(study_plan: Any, store: Path, out: Path, workers: int, device: str):
    """run_study on a fresh LocalCluster of `workers`: (summary, wall seconds, load averages)."""
    from heads.study import StudyOptions, run_study

    options = StudyOptions(
        store=str(store), out=str(out), workers=workers, device=device, progress=False
    )
    load = os.getloadavg()[0]
    start = time.perf_counter()
    summary = run_study(study_plan, options)
    wall = time.perf_counter() - start
    if summary.failed or summary.ok != summary.cells:
        raise RuntimeError(f"study with {workers} worker(s): {summary.lines()}")
    loads = f"{workers} worker(s): load average {load:.1f} before, {os.getloadavg()[0]:.1f} after"
    return summary, wall, loads


def main(argv: list[str] | None = None) -> Path:
    p = parser("study", __doc__.splitlines()[0])
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    from heads.study.plans import parse_plan
    from runtime.threads import usable_cores as cores

    study_plan = parse_plan(plan(args.quick))
    res = Result("study", args.quick, device)
    with Scratch(args.work, "study") as work:
        store = work / "store"
        n_cores = cores()
        res.config = {
            "store": bench_store(store, args.quick),
            "plan": plan(args.quick),
            "cores": n_cores,
            "device": device,
        }
        rates, loads = {}, []
        for workers in (1, 2):
            used = min(workers, n_cores)
            summary, wall, load = timed_study(
                study_plan, store, work / f"study-{workers}", used, device
            )
            loads.append(load)
            threads = max(1, n_cores // used)
            label = f"{workers} worker{'s' if workers > 1 else ''} x {threads} torch thread{'s' if threads > 1 else ''}"  # fmt: skip
            res.add(f"wall_s.{workers}", f"{label}: {summary.cells} cells, wall", wall, "s")
            rates[workers] = res.add(
                f"cells_per_hour.{workers}", f"{label}: cells per hour", summary.cells / wall * 3600, "cells/h"
            )  # fmt: skip
        res.add(
            "scaling", "scaling: cells/hour, 2 workers / 1 worker", rates[2] / rates[1], "x",
            note="LocalCluster start and report included in both",
        )  # fmt: skip
        res.notes.append(
            f"{n_cores} cores; each study starts its own LocalCluster (included in the wall time); "
            "cells are trained and tested as fsar-study runs them"
        )
        res.notes.append("; ".join(loads) + " (other processes share the cores)")
    return res.write(args.out)


if __name__ == "__main__":
    main()
