"""The Dask runner of fsar-extract: size or join a cluster, stream tasks through it, commit rows.

The only module of pipeline/ that imports Dask; the tasks themselves are in pipeline/tasks.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.datasets import video_path
from pipeline.decode_child import DecodeRequest, close_decoders
from pipeline.errors import ExtractError
from pipeline.tasks import EncoderConfig, decode_task, encode_task, failed_update
from runtime.memory import MALLOC_ENVIRON
from runtime.progress import progress_bar

if TYPE_CHECKING:
    from pipeline.extract import ExtractOptions, ExtractSummary
    from store import FeatureStore

COMMIT_EVERY_S = 2.0
COMMIT_EVERY_ROWS = 256
TASK_RETRIES = 2  # a task whose worker died is retried this many times, then its rows fail


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
    cores = cores or os.cpu_count() or 1
    if device == "cuda":
        import torch

        n = workers or max(1, torch.cuda.device_count())
        return ClusterPlan(n, max(2, cores // n), 1)
    n = workers or max(1, cores // 4)
    if n > cores:
        raise ExtractError(f"--workers {n}: this machine has {cores} cores; use at most {cores}")
    return ClusterPlan(n, 2, max(1, cores // n))


# Dask settings for the workers of our LocalCluster (`fsar-extract` without --scheduler;
# docs/extraction.md, "Worker settings", says what to set on the workers of an existing cluster).
# Measured on 2 cores with ViT-B/16: the encoder's forward took 3.6 s per 8-frame video in a default
# Dask worker against 2.4 s in a plain loop. Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536,
# which pins glibc's mmap threshold at 128 KiB, so every activation is a fresh mmap (millions of page
# faults); keeping freed memory brought it to 2.9 s. Dask's statistical profiler (a thread that takes
# the GIL every 10 ms to walk the stacks) cost another 10%: 2.6 s.
WORKER_ENVIRON = {
    **MALLOC_ENVIRON,  # runtime.memory's policy: keep freed heap for the next forward
    "OMP_NUM_THREADS": "1",  # Dask's defaults, kept: tasks set torch threads themselves
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}
LOCAL_WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ": WORKER_ENVIRON,
    "distributed.worker.profile.enabled": False,
}


def _start_client(options: ExtractOptions, plan: ClusterPlan) -> tuple[Any, Any]:
    import dask
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    if options.scheduler:
        try:
            client = Client(options.scheduler, timeout="20s")
        except OSError as error:
            raise ExtractError(
                f"--scheduler {options.scheduler}: cannot connect ({error}); start one with "
                "`dask scheduler` and `dask worker ADDRESS --resources encode=1`"
            ) from None
        return client, None
    with dask.config.set(LOCAL_WORKER_CONFIG):
        cluster = LocalCluster(
            n_workers=plan.workers,
            threads_per_worker=plan.threads_per_worker,
            processes=True,
            resources={"encode": 1},
            scheduler_kwargs={"dashboard": False},
            silence_logs=logging.ERROR,
        )
    return Client(cluster), cluster


def _torch_threads_for(client: Any, plan: ClusterPlan, scheduler: str | None) -> int:
    """Torch threads per worker: the plan's, or on an external cluster host cores / workers there."""
    if not scheduler:
        return plan.torch_threads
    cores = client.run(os.cpu_count)  # worker address -> cores of its host
    workers = client.scheduler_info().get("workers", {})
    per_host = Counter(w.get("host") for w in workers.values())
    shares = [
        max(1, (cores.get(address) or 1) // per_host[info.get("host")])
        for address, info in workers.items()
    ]
    return min(shares, default=1)


def _has_encode_resource(client: Any) -> bool:
    workers = client.scheduler_info().get("workers", {})
    return any("encode" in (w.get("resources") or {}) for w in workers.values())


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
    from distributed import as_completed

    spec = store.spec
    manifest = store.manifest
    data_root = Path(options.data_root)
    per_video_frames = spec["frames"] * spec["views"]
    if options.batch_size is not None and options.batch_size < 1:
        raise ExtractError(f"--batch-size {options.batch_size}: use at least 1")
    batch_frames = options.batch_size or (256 if device == "cuda" else per_video_frames)
    videos_per_task = 1 if device == "cpu" else max(1, batch_frames // per_video_frames)
    plan = plan_cluster(device, options.workers)
    client, cluster = _start_client(options, plan)
    try:
        config = EncoderConfig(
            model=spec["model"],
            pretrained=weights,
            weights_sha256=spec["weights_sha256"],
            recipe=spec["recipe"],
            layers=tuple(spec["layers"]),
            device=device,
            precision=precision,
            torch_threads=_torch_threads_for(client, plan, options.scheduler),
            batch_frames=batch_frames,
            batch_across_videos=device != "cpu",
            allow_torchscript=options.allow_torchscript,
            taps=tuple(spec.get("taps") or ()),
        )
        resources = {"encode": 1} if _has_encode_resource(client) else None
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        window = max(4, n_workers * (plan.threads_per_worker + 2)) * videos_per_task
        queue = deque(todo)
        running = as_completed()
        rows_of: dict[Any, list[int]] = {}

        def submit_next() -> None:
            rows = [queue.popleft() for _ in range(min(videos_per_task, len(queue)))]
            decoded = [
                client.submit(
                    decode_task,
                    DecodeRequest(
                        path=str(video_path(data_root, manifest.at[row, "relpath"])),
                        video_id=str(manifest.at[row, "video_id"]),
                        frames=spec["frames"],
                        views=spec["views"],
                        decode=options.decode,
                    ),
                    spec["preprocess"],
                    config,
                    options.timeout,
                    bool(manifest.at[row, "split"] == "train"),
                    pure=False,
                    retries=TASK_RETRIES,
                )
                for row in rows
            ]
            encoded = client.submit(
                _encode_on_worker,
                rows,
                decoded,
                config,
                str(store.location.local),
                pure=False,
                retries=TASK_RETRIES,
                resources=resources,
                priority=10,
            )
            rows_of[encoded] = rows
            running.add(encoded)

        in_flight = lambda: sum(len(r) for r in rows_of.values())  # noqa: E731
        while queue and in_flight() < window:
            submit_next()
        pending_updates: list[dict[str, Any]] = []
        last_commit = time.monotonic()
        bar = progress_bar(len(todo), options.progress, unit="video", smoothing=0.1)
        loop_started = time.monotonic()
        try:
            for future in running:
                rows = rows_of.pop(future)
                try:
                    updates = future.result()
                except Exception as error:  # the task failed even after retries
                    reason = f"worker error: {type(error).__name__}: {error}".splitlines()[0]
                    updates = [failed_update(row, None, reason[:240]) for row in rows]
                for update in updates:
                    if update["status"] == "ok":
                        summary.ok += 1
                        summary.frames += per_video_frames
                    else:
                        summary.failed[update["error"]] += 1
                pending_updates += updates
                if bar is not None:
                    elapsed = max(time.monotonic() - loop_started, 1e-9)
                    done = summary.ok + sum(summary.failed.values())
                    bar.update(len(updates))
                    bar.set_postfix(
                        {
                            "videos/s": f"{done / elapsed:.2f}",
                            "frames/s": f"{summary.frames / elapsed:.1f}",
                            "failed": sum(summary.failed.values()),
                        },
                        refresh=False,
                    )
                now = time.monotonic()
                if len(pending_updates) >= COMMIT_EVERY_ROWS or now - last_commit > COMMIT_EVERY_S:
                    store.commit(pending_updates)
                    pending_updates, last_commit = [], now
                while queue and in_flight() < window:
                    submit_next()
        finally:
            if pending_updates:
                store.commit(pending_updates)
            if bar is not None:
                bar.close()
    finally:
        try:
            client.run(close_decoders)
        except Exception:  # workers already gone: their children die with their pipes
            pass
        client.close()
        if cluster is not None:
            cluster.close()
