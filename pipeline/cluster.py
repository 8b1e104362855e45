"""The Dask runner of fsar-extract: size or join a cluster, stream tasks through it, commit rows.

The only module of pipeline/ that imports Dask (the cluster itself is runtime/cluster.py's); the
tasks are in pipeline/tasks.py.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed import as_completed

from pipeline.datasets import video_path
from pipeline.decode_child import DecodeRequest, close_decoders
from pipeline.errors import ExtractError
from pipeline.options import ExtractOptions, ExtractSummary
from pipeline.tasks import EncoderConfig, decode_task, encode_task, failed_update
from runtime.cluster import LocalWorkers, dask_client, threads_per_task
from runtime.progress import progress_bar
from runtime.threads import usable_cores

if TYPE_CHECKING:
    from store import FeatureStore

COMMIT_EVERY_S = 2.0
COMMIT_EVERY_ROWS = 256
TASK_RETRIES = 2  # a task whose worker died is retried this many times, then its rows fail
WORKER_COMMAND = "dask worker ADDRESS --resources encode=1"  # docs/extraction.md: its settings
CUDA_BATCH_FRAMES = 256


@dataclass(frozen=True)
class ClusterPlan:
    """Worker processes, threads per worker (decode concurrency) and torch threads per worker."""

    workers: int
    threads_per_worker: int
    torch_threads: int


def plan_cluster(device: str, workers: int | None, cores: int | None = None) -> ClusterPlan:
    """Size a LocalCluster so that torch threads x workers never exceeds the cores.

    CPU: encoding dominates; one worker per 4 cores, each with torch threads = its share of the cores
    and 2 Dask threads (one decodes the next video while the other encodes). CUDA: one worker per GPU
    and every core decoding (the GPU encodes far faster than one core decodes).
    """
    cores = cores or usable_cores()
    if device == "cuda":
        import torch

        n = workers or max(1, torch.cuda.device_count())
        return ClusterPlan(n, max(2, cores // n), 1)
    n = workers or max(1, cores // 4)
    if n > cores:
        raise ExtractError(f"--workers {n}: this machine has {cores} cores; use at most {cores}")
    return ClusterPlan(n, 2, max(1, cores // n))


def local_workers(plan: ClusterPlan) -> LocalWorkers:
    """The LocalCluster of a plan: math libraries on one thread (tasks set torch's threads)."""
    return LocalWorkers(plan.workers, plan.threads_per_worker, 1, resources={"encode": 1})


@dataclass(frozen=True)
class Batching:
    """Frames per encoder forward and videos per encode task (CPU: one video a task)."""

    frames: int
    videos_per_task: int

    @classmethod
    def of(cls, spec: dict[str, Any], batch_size: int | None, device: str) -> Batching:
        per_video = spec["frames"] * spec["views"]
        frames = batch_size or (CUDA_BATCH_FRAMES if device == "cuda" else per_video)
        return cls(frames, 1 if device == "cpu" else max(1, frames // per_video))


def run_tasks(
    store: FeatureStore,
    options: ExtractOptions,
    device: str,
    precision: str,
    weights: str,
    todo: list[int],
    summary: ExtractSummary,
) -> None:
    """Submit decode -> encode tasks with a bounded window, commit updates, show progress."""
    batching = Batching.of(store.spec, options.batch_size, device)
    plan = plan_cluster(device, options.workers)
    with dask_client(options.scheduler, local_workers(plan), WORKER_COMMAND) as client:
        try:
            threads = (
                plan.torch_threads if not options.scheduler else threads_per_task(client, "one")
            )
            config = encoder_config(
                store.spec, options, device, precision, weights, batching, threads
            )
            window = TaskWindow(client, store, options, config, batching, todo, plan)
            collect(window.results(), store, summary, len(todo), options.progress)
        finally:
            _close_decoders(client)


def encoder_config(
    spec: dict[str, Any],
    options: ExtractOptions,
    device: str,
    precision: str,
    weights: str,
    batching: Batching,
    torch_threads: int,
) -> EncoderConfig:
    """How every worker builds its encoder for this store."""
    return EncoderConfig(
        model=spec["model"],
        pretrained=weights,
        weights_sha256=spec["weights_sha256"],
        recipe=spec["recipe"],
        layers=tuple(spec["layers"]),
        device=device,
        precision=precision,
        torch_threads=torch_threads,
        batch_frames=batching.frames,
        batch_across_videos=device != "cpu",
        allow_torchscript=options.allow_torchscript,
        taps=tuple(spec.get("taps") or ()),
    )


class TaskWindow:
    """The rows in flight: decode tasks feeding one encode task each, at most `size` videos at once."""

    def __init__(
        self,
        client: Any,
        store: FeatureStore,
        options: ExtractOptions,
        config: EncoderConfig,
        batching: Batching,
        todo: list[int],
        plan: ClusterPlan,
    ) -> None:
        self.client, self.store, self.options, self.config = client, store, options, config
        self.videos_per_task = batching.videos_per_task
        workers = client.scheduler_info().get("workers", {})
        self.resources = {"encode": 1} if _has_encode_resource(workers) else None
        self.size = (
            max(4, max(1, len(workers)) * (plan.threads_per_worker + 2)) * self.videos_per_task
        )
        self.queue = deque(todo)
        self.running = as_completed()
        self.rows_of: dict[Any, list[int]] = {}

    def results(self) -> Iterator[list[dict[str, Any]]]:
        """Each finished task's row updates (failed rows when the task failed even after retries)."""
        self._fill()
        for future in self.running:
            rows = self.rows_of.pop(future)
            try:
                updates = future.result()
            except Exception as error:  # the task failed even after retries: its rows fail
                reason = f"worker error: {type(error).__name__}: {error}".splitlines()[0]
                updates = [failed_update(row, None, reason[:240]) for row in rows]
            yield updates
            self._fill()

    def _fill(self) -> None:
        while self.queue and sum(len(r) for r in self.rows_of.values()) < self.size:
            rows = [self.queue.popleft() for _ in range(min(self.videos_per_task, len(self.queue)))]
            encoded = self.client.submit(
                _encode_on_worker,
                rows,
                [self._decode(row) for row in rows],
                self.config,
                str(self.store.location.local),
                pure=False,
                retries=TASK_RETRIES,
                resources=self.resources,
                priority=10,
            )
            self.rows_of[encoded] = rows
            self.running.add(encoded)

    def _decode(self, row: int) -> Any:
        manifest, spec = self.store.manifest, self.store.spec
        request = DecodeRequest(
            path=str(video_path(Path(self.options.data_root), manifest.at[row, "relpath"])),
            video_id=str(manifest.at[row, "video_id"]),
            frames=spec["frames"],
            views=spec["views"],
            decode=self.options.decode,
        )
        train = bool(manifest.at[row, "split"] == "train")
        return self.client.submit(
            decode_task,
            request,
            spec["preprocess"],
            self.config,
            self.options.timeout,
            train,
            pure=False,
            retries=TASK_RETRIES,
        )


def collect(
    results: Iterator[list[dict[str, Any]]],
    store: FeatureStore,
    summary: ExtractSummary,
    total: int,
    progress: bool,
) -> None:
    """Count every update into `summary`, commit them in batches, and show the rates."""
    frames_per_video = store.spec["frames"] * store.spec["views"]
    pending: list[dict[str, Any]] = []
    last_commit = started = time.monotonic()
    bar = progress_bar(total, progress, unit="video", smoothing=0.1)
    try:
        for updates in results:
            summary.count(updates, frames_per_video)
            pending += updates
            if bar is not None:
                bar.update(len(updates))
                bar.set_postfix(summary.rates(time.monotonic() - started), refresh=False)
            if len(pending) >= COMMIT_EVERY_ROWS or time.monotonic() - last_commit > COMMIT_EVERY_S:
                store.commit(pending)
                pending, last_commit = [], time.monotonic()
    finally:
        if pending:
            store.commit(pending)
        if bar is not None:
            bar.close()


def _has_encode_resource(workers: dict[str, Any]) -> bool:
    return any("encode" in (w.get("resources") or {}) for w in workers.values())


def _close_decoders(client: Any) -> None:
    try:
        client.run(close_decoders)
    except Exception:  # workers already gone: their children die with their pipes
        pass


def _worker_device(device: str) -> str:
    """This Dask worker's GPU: `cuda` -> `cuda:i` for worker i (mod the GPUs); others unchanged."""
    if device != "cuda":
        return device
    import torch

    count = torch.cuda.device_count()
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if isinstance(name, int) or str(name).isdigit() else 0
    except (ImportError, ValueError):
        index = 0
    return f"cuda:{index % max(count, 1)}"


def _encode_on_worker(
    rows: list[int], outcomes: list[Any], config: EncoderConfig, store_path: str
) -> list[dict[str, Any]]:
    """`encode_task` on this worker's own GPU (CUDA), as a Dask task."""
    return encode_task(
        rows, outcomes, replace(config, device=_worker_device(config.device)), store_path
    )
