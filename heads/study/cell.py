"""One cell of a study: train (selection on val) then evaluate on the study's test episodes.

`run_cell` opens the store itself, so it runs the same in this process or as a task on any Dask
worker that can read the store; it knows nothing about Dask. It does what `fsar-train` then
`fsar-eval --checkpoint RUN` do, through the same public functions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from heads.config import MAX_RAM_GB

from .plans import Cell


@dataclass(frozen=True)
class CellTask:
    cell: Cell
    store: str  # path or URL, as the worker opens it
    run_dir: str  # where a trained cell's run directory goes (absolute)
    device: str = "cpu"
    torch_threads: int | None = None
    max_ram: float = MAX_RAM_GB


@dataclass
class CellOutcome:
    accuracy: float
    ci95: float
    per_episode: np.ndarray
    seconds: float
    train_seconds: float
    eval_seconds: float
    best_val_accuracy: float | None
    validation: list[dict[str, Any]]  # the run's validation records (metrics.jsonl)
    run_dir: str | None
    host: str


def run_cell(task: CellTask) -> CellOutcome:
    """Train the cell's head (unless it is training-free), then score it on the test episodes."""
    import socket

    import torch

    from heads.config import TrainConfig
    from heads.evaluate import evaluate, load_run
    from heads.train import build_head, train
    from runtime.device import pick_device
    from store import open_store

    started = time.perf_counter()  # (the worker keeps freed memory: runtime.cluster)
    if task.torch_threads and torch.get_num_threads() != task.torch_threads:
        torch.set_num_threads(task.torch_threads)
    cell = task.cell
    store = open_store(task.store)
    if store.fingerprint() != cell.store_fingerprint:
        raise RuntimeError(
            f"{task.store} on this worker has fingerprint {store.fingerprint()}, "
            f"the study was planned on {cell.store_fingerprint}"
        )
    device = pick_device(task.device)
    run_dir, validation, best = None, [], None
    if cell.train is not None:
        cfg = TrainConfig(
            **cell.train, store=task.store, out=task.run_dir, progress=False,
            device=task.device, max_ram=task.max_ram,
        )  # fmt: skip
        run_dir = train(cfg)
        head = load_run(run_dir, store, device)
        validation = validation_records(run_dir)
        best = max((r["val_accuracy"] for r in validation), default=None)
    else:
        head = build_head(cell.head, cell.head_options, store, device)
    trained = time.perf_counter()
    settings = cell.eval
    result = evaluate(
        head, store, settings.split, settings.way, cell.shot, settings.query, settings.episodes,
        settings.seed, device, task.max_ram,
    )  # fmt: skip
    done = time.perf_counter()
    return CellOutcome(
        accuracy=result.accuracy,
        ci95=result.ci95,
        per_episode=np.asarray(result.per_episode, dtype=np.float64),
        seconds=done - started,
        train_seconds=trained - started,
        eval_seconds=done - trained,
        best_val_accuracy=best,
        validation=validation,
        run_dir=str(run_dir) if run_dir is not None else None,
        host=socket.gethostname(),
    )


def validation_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The validation records of a run's metrics.jsonl (training-loss records left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "val_accuracy" in r]
