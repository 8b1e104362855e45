"""Process settings have one owner (runtime/), the one Dask starter refuses a bad --scheduler in one
line, and the packages import one way (runtime <- pipeline -> store <- heads) without circles."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from runtime import cluster, threads

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "store", "pipeline", "heads")
# which packages each may import (the data flows pipeline -> store -> heads; runtime is a leaf)
MAY_IMPORT = {
    "runtime": {"runtime"},
    "store": {"store", "runtime"},
    "pipeline": {"pipeline", "store", "runtime"},
    "heads": {"heads", "store", "runtime"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every fsar module `path` imports, at the top or inside a function (TYPE_CHECKING too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in _imports(path, name):
            while imported and imported not in files:  # `from pkg.mod import function`
                imported = imported.rpartition(".")[0]
            if imported and imported != name and files[imported].name != "__init__.py":
                targets.add(imported)  # (a package's __init__ only re-exports)
        graph[name] = targets
    return graph


def test_no_module_imports_itself_through_others() -> None:
    graph = import_graph()
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_packages_import_one_way() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if target.split(".")[0] not in MAY_IMPORT[module.split(".")[0]]
    ]
    assert wrong == []


def test_openmp_threads_sleep_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads.sleep_idle_threads()
    import os

    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.sleep_idle_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_local_workers_get_the_memory_policy_and_thread_counts() -> None:
    from runtime.memory import MALLOC_ENVIRON

    settings = cluster.worker_config(3)
    environ = settings["distributed.nanny.pre-spawn-environ"]
    assert {k: environ[k] for k in MALLOC_ENVIRON} == MALLOC_ENVIRON
    assert environ["OMP_NUM_THREADS"] == environ["MKL_NUM_THREADS"] == "3"
    assert environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert settings["distributed.worker.profile.enabled"] is False


def test_an_unreachable_scheduler_is_one_line_naming_the_worker_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", "1s")
    local = cluster.LocalWorkers(1, 1, 1, silence_logs=logging.CRITICAL)
    with pytest.raises(cluster.ClusterError) as error:
        with cluster.dask_client("tcp://127.0.0.1:9", local, "dask worker ADDRESS --nthreads 1"):
            pass
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        "--scheduler tcp://127.0.0.1:9: cannot connect"
    )
    assert message.endswith("workers with `dask worker ADDRESS --nthreads 1`")
