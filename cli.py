"""fsar command line: one typer app per stage, plus the umbrella `fsar`.

Each command imports its stage lazily, so `fsar-store info` starts fast and `fsar-train`
never imports the CLIP encoder. Errors users can fix exit with code 2 and one line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="fsar: offline CLIP feature store for few-shot action recognition.", no_args_is_help=True)
store_app = typer.Typer(help="Inspect, verify and share feature stores.", no_args_is_help=True)
extract_app = typer.Typer(help="Stage 1: extract CLIP features from videos into a store.")
train_app = typer.Typer(help="Stage 2: train a reasoning head from a store.")
eval_app = typer.Typer(help="Stage 2: evaluate a head on few-shot episodes from a store.")
synth_app = typer.Typer(help="Generate a synthetic video dataset (time-reversal class pairs).")
app.add_typer(store_app, name="store")


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# ---------------------------------------------------------------- store (issue 2, 5)
# STORE-COMMANDS-BEGIN
# STORE-COMMANDS-END


# ---------------------------------------------------------------- extract (issue 3)
# EXTRACT-COMMANDS-BEGIN
# EXTRACT-COMMANDS-END


# ---------------------------------------------------------------- train / eval (issue 4)
# HEADS-COMMANDS-BEGIN
# HEADS-COMMANDS-END


if __name__ == "__main__":
    sys.exit(app())
