"""Shared pieces of the benchmarks: command line, machine record, timing, result files, tables.

Every benchmark script writes `bench/results/<name>.json` with this schema (checked by
tests/test_bench.py):

    {"name": str, "schema": 1, "quick": bool, "command": str, "machine": {...}, "config": {...},
     "figures": [{"key": str, "label": str, "value": float, "unit": str,
                  "target": str | null, "met": bool | null, "note": str}, ...],
     "notes": [str, ...], "seconds": float}

Figures are what the README table shows; `config` says what was measured (model, shapes, sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store.sizes import VIT_B16  # re-exported: store/sizes.py owns the ViT-B/16 shapes

SCHEMA = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

TINY_MODEL = "fsar-tiny-vit"  # pipeline/model_configs: 12 layers, width 64, 16 patches (quick mode)


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for CI (figures meaningless)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for <name>.json")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed)")
    return p


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Cores, CPU model, memory, torch version and threads, accelerator, load at start."""
    import torch

    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info: dict[str, Any] = {
        "cores": usable,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def resolve_device(device: str) -> str:
    """`runtime.device.pick_device` for a benchmark's --device; exits with its message."""
    from runtime.device import DeviceError, pick_device

    try:
        return str(pick_device(device))
    except DeviceError as error:
        raise SystemExit(f"error: {error}") from None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, Any]:
    """Wall seconds of one call (CUDA synchronised) and its result."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median_time(fn: Callable[[], Any], repeat: int, warmup: int = 1, device: str = "cpu") -> float:
    """Median wall seconds over `repeat` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[0] for _ in range(max(1, repeat)))


def matmul_peak(device: str = "cpu", repeat: int = 5) -> float:
    """GFLOP/s of a square fp32 matmul (2048^2 on CPU at torch's thread count, 8192^2 on CUDA),
    median of `repeat` after a warm-up: the rate a FLOP count is set against."""
    import torch

    n = 8192 if device.startswith("cuda") else 2048
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    seconds = median_time(lambda: a @ b, repeat, warmup=1, device=device)
    return 2 * n**3 / seconds / 1e9


@dataclass
class Result:
    """Figures of one benchmark, written as JSON and shown as table rows."""

    name: str
    quick: bool
    device: str
    config: dict[str, Any] = field(default_factory=dict)
    figures: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    module: str = ""  # the module run as `python -m bench.<module>`, when not `name`

    def add(
        self,
        key: str,
        label: str,
        value: float,
        unit: str,
        target: str | None = None,
        met: bool | None = None,
        note: str = "",
    ) -> float:
        self.figures.append(
            {
                "key": key,
                "label": label,
                "value": float(value),
                "unit": unit,
                "target": target,
                "met": None if met is None else bool(met),
                "note": note,
            }
        )
        return float(value)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "schema": SCHEMA,
            "quick": self.quick,
            "command": " ".join(
                shlex.quote(a)
                for a in ["python", "-m", f"bench.{self.module or self.name}", *sys.argv[1:]]
            ),
            "machine": machine_info(self.device),
            "config": self.config,
            "figures": self.figures,
            "notes": self.notes,
            "seconds": round(time.perf_counter() - self.started, 2),
        }

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
        print(markdown_table([self.to_json()]))
        for note in self.notes:
            print(f"- {note}")
        print(f"wrote {path}")
        return path


def format_value(value: float) -> str:
    a = abs(value)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    if a >= 0.01:
        return f"{value:.3f}"
    return f"{value:.2g}"


def markdown_table(results: Iterable[dict[str, Any]]) -> str:
    lines = ["| benchmark | figure | value | unit | target |", "|---|---|---:|---|---|"]
    for res in results:
        for fig in res["figures"]:
            target = fig["target"] or ""
            if fig["met"] is not None and target:
                target += " ✓" if fig["met"] else " ✗"
            lines.append(
                f"| {res['name']} | {fig['label']} | {format_value(fig['value'])} | {fig['unit']} | {target} |"
            )
    return "\n".join(lines)


class Scratch:
    """A scratch folder: `--work DIR` (kept) or a temporary one (removed on exit)."""

    def __init__(self, work: str | None, prefix: str) -> None:
        import tempfile

        self._tmp = None
        if work:
            self.path = Path(work)
            self.path.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"fsar-bench-{prefix}-")
            self.path = Path(self._tmp.name)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def vit_b16_spec(
    recipe: str = "emp", codec: dict | None = None, frames: int = 8, taps: list | None = None
) -> dict:
    """A store spec with ViT-B/16 shapes (T frames, 197 tokens, D 512, W 768, 12 blocks; `taps`
    for recipes with ts) for random stores."""
    from store.random_store import random_spec

    return random_spec(
        frames=frames,
        views=1,
        dim=VIT_B16["dim"],
        width=VIT_B16["width"],
        patches=VIT_B16["patches"],
        recipe=recipe,
        codec=codec,
        taps=taps,
        depth=VIT_B16["depth"],
    )


def tiny_spec(
    recipe: str = "emp", codec: dict | None = None, frames: int = 4, **shape: Any
) -> dict:
    """Shapes of the tiny ViT (D 32, W 64, 16 patches) for quick mode; `shape` overrides them."""
    from store.random_store import random_spec

    sizes = {"views": 1, "dim": 32, "width": 64, "patches": 16} | shape
    return random_spec(frames=frames, recipe=recipe, codec=codec, **sizes)


def peak_rss_of(
    cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None
) -> tuple[float, int, str]:
    """Run `cmd`, return (peak RSS in MiB of that child, exit code, combined output tail)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read().decode(errors="replace")[-4000:]
    return usage.ru_maxrss / 1024.0, proc.returncode, tail


# ---------------------------------------------------------------------- page cache
def _resident_bytes(path: str) -> tuple[int, int]:
    """(bytes of `path` in the page cache, file size), via mmap + mincore."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    if size == 0:
        return 0, 0
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        try:
            buf = (ctypes.c_char * size).from_buffer(mm)
            page = mmap.PAGESIZE
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec)
            del buf
        finally:
            mm.close()
    if rc != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return min(size, sum(v & 1 for v in vec) * page), size


def _files(root: str | Path) -> list[str]:
    out = []
    for base, _dirs, files in os.walk(root):
        out.extend(os.path.join(base, f) for f in files)
    return out


def resident_fraction(root: str | Path) -> float | None:
    """Fraction of the bytes under `root` that sit in the page cache (None if mincore is unusable)."""
    try:
        pairs = [_resident_bytes(f) for f in _files(root)]
    except (OSError, ValueError, AttributeError):
        return None
    total = sum(s for _, s in pairs)
    return sum(r for r, _ in pairs) / total if total else 0.0


def evict(root: str | Path) -> str:
    """Drop the files under `root` from the page cache; returns the method used.

    `posix_fadvise(DONTNEED)` per file after `sync`: it needs no privileges and, unlike
    `echo 3 > /proc/sys/vm/drop_caches`, does not disturb other processes on a shared machine.
    """
    os.sync()
    for f in _files(root):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED) per store file after sync"


def fsar_command(name: str) -> list[str]:
    """The command line of `fsar-<name>`: the installed script, else `python -m cli <name>`."""
    script = Path(sys.executable).parent / f"fsar-{name}"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli", name]


def run_cli(app: str, args: list[str]) -> float:
    """Run an fsar command (`cli.<app>_app`, e.g. `eval` for fsar-eval) in this process; wall seconds.

    In process, so interpreter start-up and imports are not counted (and quick runs stay quick).
    """
    import contextlib
    import io

    import cli

    command = getattr(cli, f"{app}_app")
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        try:
            code = command(args, standalone_mode=False)
        except SystemExit as stop:
            code = stop.code
    seconds = time.perf_counter() - start
    if code not in (None, 0):
        raise RuntimeError(f"fsar-{app} {' '.join(args)} exited {code}:\n{out.getvalue()[-2000:]}")
    return seconds
