"""The one Dask starter of fsar-extract and fsar-study: a client of a new LocalCluster with fsar's
worker settings, or of an existing scheduler. The only module of runtime/ that imports Dask.

Local workers start with runtime.memory's malloc policy, their math-library thread count and sleeping
OpenMP threads in their environment, and without Dask's sampling profiler (a thread that takes the
GIL every 10 ms: 10% of an encoder forward). Every worker, local or not, applies the malloc policy
in-process too (`KeepFreedMemory`), so tasks never do it themselves.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dask
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

from runtime.errors import FsarError
from runtime.memory import MALLOC_ENVIRON, keep_freed_memory
from runtime.threads import thread_environ, usable_cores

CONNECT_TIMEOUT = "20s"
WORKERS_TIMEOUT_S = 60  # an existing scheduler must have a worker by then


class ClusterError(FsarError):
    """--scheduler names no reachable scheduler, or one without workers (one line)."""


@dataclass(frozen=True)
class LocalWorkers:
    """A LocalCluster: worker processes, Dask threads and math-library threads per worker, resources."""

    workers: int
    dask_threads: int
    math_threads: int
    resources: dict[str, float] = field(default_factory=dict)
    silence_logs: int = logging.ERROR


def worker_environ(math_threads: int) -> dict[str, str]:
    """What a local worker process starts with (docs/extraction.md gives it for `dask worker`)."""
    return {**MALLOC_ENVIRON, **thread_environ(math_threads)}


def worker_config(math_threads: int) -> dict[str, Any]:
    """Dask settings of the local workers: their environment and no sampling profiler."""
    return {
        "distributed.nanny.pre-spawn-environ": worker_environ(math_threads),
        "distributed.worker.profile.enabled": False,
    }


@contextmanager
def dask_client(scheduler: str | None, local: LocalWorkers, worker_command: str) -> Iterator[Any]:
    """A client of `scheduler`, else of a new LocalCluster of `local`; closed (with it) on exit.

    `worker_command` is how workers for this job are started (named when `scheduler` is unreachable).
    """
    logging.getLogger("distributed").setLevel(logging.ERROR)
    cluster = None if scheduler else _local_cluster(local)
    client = Client(cluster) if cluster is not None else _connect(str(scheduler), worker_command)
    try:
        client.register_plugin(KeepFreedMemory(), name="fsar-keep-freed-memory")
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def threads_per_task(client: Any, tasks_per_worker: str) -> int:
    """Math threads a task may use on any cluster: its host's cores over the tasks that run there at
    once, the fewest of any host. `tasks_per_worker`: "one" (one task at a time per worker) or
    "dask-threads" (one per Dask thread)."""
    workers = client.scheduler_info().get("workers", {})
    if not workers:
        try:
            client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
        except TimeoutError:
            raise ClusterError(
                f"the Dask scheduler has no workers after {WORKERS_TIMEOUT_S} s; start some"
            ) from None
        workers = client.scheduler_info().get("workers", {})
    host_cores = client.run(usable_cores)  # worker address -> cores of its host
    at_once: Counter[str] = Counter()
    for info in workers.values():
        at_once[info.get("host")] += (
            1 if tasks_per_worker == "one" else int(info.get("nthreads", 1))
        )
    shares = [
        max(1, (host_cores.get(address) or 1) // at_once[info.get("host")])
        for address, info in workers.items()
    ]
    return min(shares, default=1)


def _local_cluster(local: LocalWorkers) -> Any:
    settings = worker_config(local.math_threads)
    with dask.config.set(settings), _environment(settings["distributed.nanny.pre-spawn-environ"]):
        return LocalCluster(
            n_workers=local.workers,
            threads_per_worker=local.dask_threads,
            processes=True,
            resources=local.resources or None,
            scheduler_kwargs={"dashboard": False},
            dashboard_address=":0",  # a free port: never clash with another cluster's 8787
            silence_logs=local.silence_logs,
        )


def _connect(scheduler: str, worker_command: str) -> Any:
    try:
        return Client(scheduler, timeout=CONNECT_TIMEOUT)
    except OSError as error:
        raise ClusterError(
            f"--scheduler {scheduler}: cannot connect ({error}); start one with `dask scheduler` "
            f"and workers with `{worker_command}`"
        ) from None


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


class KeepFreedMemory(WorkerPlugin):
    """Applies runtime.memory's policy in each worker process, including ones fsar did not start."""

    def setup(self, worker: Any) -> None:
        keep_freed_memory()
