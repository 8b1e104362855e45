"""fsar-eval end to end: what to evaluate (a trained run, or an untrained head built for the store),
its episodes, and the result files (`--json`, `--per-episode`).

    result = run_evaluation(EvalOptions(store="stores/hmdb51", head="proto", episodes=1000))
"""

from __future__ import annotations

import errno
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from runtime import files
from runtime.device import pick_device
from runtime.values import OptionError

from .base import FewShotHead
from .checkpoint import CheckpointError
from .config import EvalOptions
from .evaluate import EvalResult, evaluate, load_run, store_of_run
from .train import build_head

LATEST_RUN = Path("runs") / "latest"


def run_evaluation(options: EvalOptions) -> EvalResult:
    """Evaluate what `options` name on their episodes, write the result files, return the result."""
    options.validate()
    device = pick_device(options.device)
    head, store = head_and_store(options, device)
    result = evaluate(
        head, store, options.split, options.way, options.shot, options.query, options.episodes,
        options.seed, device, options.max_ram, progress=options.progress, view=options.view,
    )  # fmt: skip
    write_results(result, options)
    return result


def head_and_store(options: EvalOptions, device: torch.device) -> tuple[FewShotHead, Any]:
    """A trained run's head and store (--store overrides the run's; head options are its test-time
    options), or an untrained --head built for the store, seeded so that it has the same weights
    every time."""
    from store import open_store

    if options.head is not None:
        store = open_store(str(options.store))
        torch.manual_seed(options.seed)
        return build_head(options.head, options.head_options, store, device), store
    run_dir = Path(options.checkpoint) if options.checkpoint else LATEST_RUN
    if not (run_dir / "config.json").exists():
        raise CheckpointError(
            f"no run at {run_dir} (train one with fsar-train, or pass --head proto)"
        )
    store = open_store(options.store or store_of_run(run_dir))
    return load_run(run_dir, store, device, options.head_options), store


def write_results(result: EvalResult, options: EvalOptions) -> None:
    """The summary as JSON (--json) and each episode's accuracy as Parquet (--per-episode)."""
    if options.json_out is not None:
        text = json.dumps(result.to_json(), indent=2).encode()
        write_output("--json", options.json_out, lambda f: f.write(text))
    if options.per_episode is not None:
        import pandas as pd

        table = pd.DataFrame({"episode": range(options.episodes), "accuracy": result.per_episode})
        write_output("--per-episode", options.per_episode, table.to_parquet)


def write_output(option: str, target: str, write: Callable[[IO[bytes]], object]) -> None:
    """`write(file)` the file an option names, whole or not at all (runtime.files.write_file: a
    temporary file beside it, renamed over it). A device or pipe the user names (/dev/stdout, a
    link to one) is written directly, and only while someone reads a pipe (else it would block for
    ever). A failure (a full disk) is an OptionError naming the option; the target stays as it was."""
    path = Path(target)
    try:
        if path.is_symlink() or (path.exists() and not path.is_file()):
            _write_direct(path, write)
        else:
            files.write_file(path, write)
    except files.DiskFullError:
        raise OptionError(f"{option} {target}: cannot write it (No space left on device)") from None
    except OSError as error:
        if error.errno == errno.ENXIO:
            raise OptionError(
                f"{option} {target}: a pipe that nobody reads; start its reader first, or give a "
                "file name"
            ) from None
        why = error.strerror or type(error).__name__
        raise OptionError(f"{option} {target}: cannot write it ({why})") from None


def _write_direct(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Render in memory, then write to the device or pipe (a pipe without a reader: ENXIO)."""
    rendered = io.BytesIO()
    write(rendered)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK, 0o666)
    os.set_blocking(descriptor, True)
    with os.fdopen(descriptor, "wb") as out:
        out.write(rendered.getvalue())
