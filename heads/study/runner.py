"""Running a study on Dask: one task per cell, resumable, with one progress bar over cells.

A `LocalCluster` by default (worker processes with one Dask thread each, torch threads = cores /
workers, so cells never oversubscribe the cores), or any scheduler with `scheduler=`. Each task
opens the store itself (a path every worker sees, a packed file or a URL), so the driver only
sends cell configs and receives results; the study folder must be one every worker can write to
(the run directories go there). This is the only module of the study that imports Dask.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cell import CellTask, run_cell
from .folder import StudyFolder
from .plans import Expansion, Plan, PlanError, expand


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
    max_ram: float = 8.0
    progress: bool = True


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


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def plan_workers(workers: int | None, n_cells: int, n_cores: int | None = None) -> tuple[int, int]:
    """(worker processes, torch threads each): by default one single-threaded worker per core (never
    more workers than cells); workers x threads never above the cores. Cells side by side need no
    thread barriers inside a cell (bench.study: about even with 2 threads in one cell on 2 busy
    cores), at the cost of one copy of the data per worker."""
    n_cores = n_cores or cores()
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


def _start_client(options: StudyOptions, n_cells: int) -> tuple[Any, Any, int, int]:
    """(client, local cluster or None, workers, torch threads per worker)."""
    import dask
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    if options.scheduler:
        try:
            client = Client(options.scheduler, timeout="20s")
        except OSError as error:
            raise PlanError(
                f"--scheduler {options.scheduler}: cannot connect ({error}); start one with "
                "`dask scheduler` and workers with `dask worker ADDRESS --nthreads 1`"
            ) from None
        workers, threads = _external_threads(client)
        return client, None, workers, threads
    workers, threads = plan_workers(options.workers, n_cells)
    environ = {
        name: str(threads)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    }
    # Idle OpenMP threads sleep instead of spinning: on 2 cores shared with other jobs (load 5),
    # 60 emp episodes with 2 torch threads took 189 s spinning, 28 s passive (1 thread: 19 s).
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    settings = {
        "distributed.nanny.pre-spawn-environ": environ,
        "distributed.worker.profile.enabled": False,  # a sampling thread that takes the GIL
    }
    with dask.config.set(settings), _environment(environ):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            scheduler_kwargs={"dashboard": False},
            dashboard_address=":0",  # a free port: never clash with another cluster's 8787
            silence_logs=logging.CRITICAL,  # a failed cell is recorded, not logged
        )
    return Client(cluster), cluster, workers, threads


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ while the workers spawn. Dask takes a pre-spawn variable from
    os.environ when it is set there (and leaves its own value there), so a second cluster in one
    process would otherwise inherit the first one's thread counts."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _external_threads(client: Any) -> tuple[int, int]:
    """Workers, and torch threads per cell: a host's cores over the Dask threads of its workers."""
    info = client.scheduler_info().get("workers", {})
    if not info:
        client.wait_for_workers(1, timeout=60)
        info = client.scheduler_info().get("workers", {})
    host_cores = client.run(cores)  # worker address -> cores of its host
    threads_on_host = Counter()
    for w in info.values():
        threads_on_host[w.get("host")] += int(w.get("nthreads", 1))
    shares = [
        max(1, (host_cores.get(address) or 1) // threads_on_host[w.get("host")])
        for address, w in info.items()
    ]
    return len(info), min(shares, default=1)


def _run_cells(
    folder: StudyFolder, todo: list, options: StudyOptions, summary: StudySummary
) -> None:
    from distributed import as_completed
    from tqdm import tqdm

    client, cluster, workers, threads = _start_client(options, len(todo))
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
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
