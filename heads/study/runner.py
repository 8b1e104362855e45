"""Running a study on Dask: one task per cell, resumable, with one progress bar over cells.

A `LocalCluster` by default (worker processes with one Dask thread each, torch threads = cores /
workers, so cells never oversubscribe the cores), or any scheduler with `scheduler=`. Each task
opens the store itself (a path every worker sees, a packed file or a URL), so the driver only
sends cell configs and receives results; the study folder must be one every worker can write to
(the run directories go there). This is the only module of the study that imports Dask.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from heads.config import MAX_COUNT, MAX_RAM_GB
from runtime.threads import usable_cores
from runtime.values import real_number, seed, whole_number

from .cell import CellTask, run_cell
from .folder import StudyFolder
from .plans import Expansion, Plan, PlanError, expand

WORKER_COMMAND = "dask worker ADDRESS --nthreads 1"


class StudyInterrupted(Exception):
    """Ctrl-C: the finished cells are saved; rerunning the command resumes."""


@dataclass(frozen=True)
class StudyOptions:
    store: str
    out: str
    scheduler: str | None = None
    workers: int | None = None
    seeds: list[int] | None = None
    episodes: int | None = None
    train: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    device: str = "cpu"
    max_ram: float = MAX_RAM_GB
    progress: bool = True

    def validate(self) -> None:
        """Refuse numbers no study can use, naming the option (OptionError, one line)."""
        for value in self.seeds or ():
            seed("--seeds", value)
        if self.episodes is not None:
            whole_number("--episodes", self.episodes, 1, MAX_COUNT)
        real_number("--max-ram", self.max_ram, 0.0)


@dataclass
class StudySummary:
    out: Path
    cells: int
    kept: int  # finished before this run
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        ran = self.ok + len(self.failed)
        lines = [
            f"study {self.out}: {self.cells} cells, {self.kept} kept from before, {ran} run "
            f"({self.ok} ok, {len(self.failed)} failed) in {self.seconds:.0f} s"
        ]
        lines += [f"  failed: {line}" for line in self.failed]
        lines += [f"  wrote {path}" for path in self.outputs]
        return lines


def plan_workers(workers: int | None, n_cells: int, n_cores: int | None = None) -> tuple[int, int]:
    """(worker processes, torch threads each): by default one single-threaded worker per core (never
    more workers than cells); workers x threads never above the cores. Cells side by side need no
    thread barriers inside a cell (bench.study: about even with 2 threads in one cell on 2 busy
    cores), at the cost of one copy of the data per worker."""
    n_cores = n_cores or usable_cores()
    if workers is not None and not 1 <= workers <= n_cores:
        raise PlanError(f"--workers {workers}: use 1 to {n_cores} (this machine's cores)")
    n = workers or max(1, min(n_cells, n_cores))
    return n, max(1, n_cores // n)


def study_record(expansion: Expansion, store: Any, options: StudyOptions) -> dict[str, Any]:
    """What study.json keeps: the plan, the store, the options and every cell's config hash."""
    import hashlib

    cells = [{"id": c.id, "config_hash": c.config_hash} for c in expansion.cells]
    plan_hash = hashlib.sha256("".join(c["config_hash"] for c in cells).encode()).hexdigest()[:16]
    spec = store.spec
    return {
        "plan": expansion.plan.name,
        "plan_source": expansion.plan.source,
        "plan_hash": plan_hash,
        "store": {
            "path": options.store,
            "fingerprint": store.fingerprint(),
            "dataset": store.dataset,
            "model": spec.get("model"),
            "pretrained": spec.get("pretrained"),
            "recipe": spec.get("recipe"),
            "dim": spec.get("dim"),
            "frames": spec.get("frames"),
        },
        "options": {"seeds": options.seeds, "episodes": options.episodes, "train": options.train},
        "eval": asdict(expansion.plan.eval),
        "notes": expansion.notes,
        "cells": cells,
    }


def run_study(plan: Plan, options: StudyOptions) -> StudySummary:
    """Check every cell, run the unfinished ones as Dask tasks, then write the results and report."""
    from store import open_store

    from .report import write_report

    started = time.perf_counter()
    options.validate()
    with open_store(options.store) as store:
        expansion = expand(
            plan, store, options.store, options.seeds, options.episodes, options.train
        )
        record = study_record(expansion, store, options)
    if not options.scheduler:  # checked before the folder is touched
        plan_workers(options.workers, len(expansion.cells))
        _check_device(options.device)
    store_info = record["store"]
    folder = StudyFolder.open(options.out, record, options.resume)
    try:
        todo = [c for c in expansion.cells if not folder.finished(c)]
        summary = StudySummary(folder.path, len(expansion.cells), len(expansion.cells) - len(todo))
        if todo:
            _run_cells(folder, todo, options, summary)
        summary.outputs = write_report(folder, expansion, store_info)
    finally:
        folder.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PlanError(f"--device {device}: torch sees no CUDA device here")
    if device not in ("cpu", "auto") and not device.startswith("cuda"):
        raise PlanError(f"--device {device!r}: use cpu, auto or cuda[:N]")


def _run_cells(
    folder: StudyFolder, todo: list, options: StudyOptions, summary: StudySummary
) -> None:
    with study_client(options, len(todo)) as (client, workers, threads):
        _submit_and_record(client, workers, threads, folder, todo, options, summary)


@contextmanager
def study_client(options: StudyOptions, n_cells: int) -> Iterator[tuple[Any, int, int]]:
    """(client, workers, torch threads per cell) of the study's cluster: a LocalCluster of
    single-threaded workers, or the scheduler's workers (a host's cores over their Dask threads)."""
    from runtime.cluster import LocalWorkers, dask_client, threads_per_task

    workers, threads = (1, 1) if options.scheduler else plan_workers(options.workers, n_cells)
    local = LocalWorkers(
        workers, 1, threads, silence_logs=logging.CRITICAL
    )  # failures are recorded
    with dask_client(options.scheduler, local, WORKER_COMMAND) as client:
        if options.scheduler:
            threads = threads_per_task(client, "dask-threads")
            workers = len(client.scheduler_info().get("workers", {}))
        yield client, workers, threads


def _submit_and_record(
    client: Any,
    workers: int,
    threads: int,
    folder: StudyFolder,
    todo: list,
    options: StudyOptions,
    summary: StudySummary,
) -> None:
    from distributed import as_completed
    from tqdm import tqdm

    print(
        f"{summary.cells} cells: {summary.kept} finished before, {len(todo)} to run on "
        f"{workers} worker(s), {threads} torch thread(s) each",
        flush=True,
    )
    futures = {}
    try:
        for order, cell in enumerate(todo):
            directory = folder.reset(cell)
            task = CellTask(
                cell=cell, store=options.store, run_dir=str((directory / "run").resolve()),
                device=options.device, torch_threads=threads, max_ram=options.max_ram,
            )  # fmt: skip
            future = client.submit(
                run_cell,
                task,
                key=f"cell-{cell.id}-{cell.config_hash}",
                pure=False,
                priority=-order,
            )
            futures[future] = (cell, time.perf_counter())
        bar = tqdm(
            total=summary.cells, initial=summary.kept, unit="cell", desc="study",
            disable=not options.progress, dynamic_ncols=True,
        )  # fmt: skip
        try:
            for future in as_completed(futures):
                cell, submitted = futures[future]
                try:
                    folder.write_outcome(cell, future.result())
                    summary.ok += 1
                except Exception as error:  # the cell failed (or its worker died): record, go on
                    message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                    details = "".join(traceback.format_exception(error))
                    folder.write_failure(cell, message, details, time.perf_counter() - submitted)
                    summary.failed.append(f"{cell.id}: {message}")
                bar.set_postfix(ok=summary.ok, failed=len(summary.failed), refresh=False)
                bar.update(1)
        finally:
            bar.close()
    except KeyboardInterrupt:
        raise StudyInterrupted(
            f"interrupted: {summary.kept + summary.ok} of {summary.cells} cells are finished and "
            f"kept in {folder.path}; rerun the same command to run the rest"
        ) from None
