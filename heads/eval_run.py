"""fsar-eval end to end: what to evaluate (a trained run, or an untrained head built for the store),
its episodes, and the result files (`--json`, `--per-episode`).

    result = run_evaluation(EvalOptions(store="stores/hmdb51", head="proto", episodes=1000))
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

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
        text = json.dumps(result.to_json(), indent=2)
        write_output("--json", options.json_out, lambda path: path.write_text(text))
    if options.per_episode is not None:
        import pandas as pd

        table = pd.DataFrame({"episode": range(options.episodes), "accuracy": result.per_episode})
        write_output("--per-episode", options.per_episode, table.to_parquet)


def write_output(option: str, target: str, write: Callable[[Path], object]) -> None:
    """`write(path)` the file an option names, whole or not at all: into a temporary file beside it,
    renamed over it at the end (a device such as /dev/stdout is written directly). A failure (a full
    disk) is an OptionError naming the option, and leaves the target as it was."""
    path = Path(target)
    direct = path.exists() and not path.is_file()
    temporary = path if direct else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        if not direct:
            os.replace(temporary, path)
    except BaseException as error:  # (Ctrl-C included: no temporary file stays behind)
        if not direct:
            temporary.unlink(missing_ok=True)
        if not isinstance(error, OSError):
            raise
        why = error.strerror or type(error).__name__
        raise OptionError(f"{option} {target}: cannot write it ({why})") from None
