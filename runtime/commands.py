"""The typer app every fsar command runs in: a user's error (fsar's own, a command line click cannot
parse, memory or disk exhausted) prints one line and exits 2, a bug keeps its traceback, a warning
prints as one line; plus the small parsers of command-line values that several commands share.

    app = App(help="...")   # its commands and callback run inside one_line_errors
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from runtime.errors import user_message
from runtime.values import OptionError


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Errors a user can act on print one line and exit 2: fsar's own (FsarError), a command line
    click cannot parse, memory or disk exhausted (runtime.errors.user_message). Anything else is a
    bug in fsar and keeps its traceback."""
    try:
        yield
    except typer.TyperException as error:  # typer's (vendored click) usage errors: bad options
        fail(f"{error.format_message().splitlines()[0]} (see --help)")
    except Exception as error:
        message = user_message(error)
        if message is None:
            raise
        fail(message)


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """Python warnings a command raises (e.g. a checkpoint of another plugin version) print as one
    `warning: <message>` line, without Python's source line."""

    def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
        typer.echo(f"warning: {' '.join(str(message).split())}", err=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


class _Handled:
    """Parses its options and runs inside `one_line_errors` (a command, or a group: its callback,
    e.g. `fsar-study` itself, and its sub-command names)."""

    def make_context(self, *args: Any, **kwargs: Any) -> typer.Context:
        with one_line_errors():
            return super().make_context(*args, **kwargs)  # type: ignore[misc]

    def invoke(self, ctx: typer.Context) -> Any:
        with one_line_errors(), one_line_warnings():
            return super().invoke(ctx)  # type: ignore[misc]


class Command(_Handled, TyperCommand):
    pass


class Group(_Handled, TyperGroup):
    pass


class App(typer.Typer):
    """A typer app whose commands and callback run inside `one_line_errors`. Help texts are plain
    text: rich markup would swallow defaults written as [runs/latest]."""

    def __init__(self, **options: Any) -> None:
        super().__init__(
            rich_markup_mode=None,
            pretty_exceptions_show_locals=False,  # a bug's traceback, without every local value
            **{"cls": Group, **options},
        )

    def command(self, *args: Any, **options: Any) -> Any:
        return super().command(*args, **{"cls": Command, **options})


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# ---------------------------------------------------------------- values several commands parse
def check_output_file(option: str, path: str) -> None:
    """Refuse an output path that cannot be written, before any long work starts."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OptionError(f"{option} {path} is a directory; give a file name")
    if not parent.is_dir():
        raise OptionError(f"{option} {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise OptionError(f"{option} {path} cannot be written (permission denied)")


def check_output_place(option: str, path: str) -> None:
    """Refuse a new output (file or folder) whose nearest existing ancestor is not a folder fsar
    can write: a path under a regular file, or under a read-only folder. An existing output is
    left to its command (resume, overwrite or refuse)."""
    target = Path(path).expanduser()
    if target.exists() or target.is_symlink():
        return
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OptionError(f"{option} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OptionError(
                    f"{option} {path}: {parent} cannot be written (permission denied)"
                )
            return


def comma_list(text: str | None) -> list[str] | None:
    """`a,b,c` -> ["a", "b", "c"] (None stays None; an empty list is refused)."""
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise OptionError(f"empty list {text!r}")
    return items


def key_values(pairs: list[str], option: str = "--option") -> dict[str, Any]:
    """KEY=VALUE pairs -> {key: JSON value, or the text when it is not JSON}."""
    values: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise OptionError(f"{option} takes KEY=VALUE (got {pair!r})")
        key, value = pair.split("=", 1)
        try:
            values[key.replace("-", "_")] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            values[key.replace("-", "_")] = value
    return values


def option_values(ctx: typer.Context, options: type) -> dict[str, Any]:
    """The command's parameters that are fields of the `options` dataclass, by name."""
    return {f.name: ctx.params[f.name] for f in fields(options) if f.name in ctx.params}


def given(ctx: typer.Context, names: tuple[str, ...]) -> dict[str, Any]:
    """The parameters among `names` that the command line set (not their defaults)."""
    sources = {name: ctx.get_parameter_source(name) for name in names}  # (typer's own click)
    return {
        name: ctx.params[name]
        for name in names
        if getattr(sources[name], "name", "DEFAULT") != "DEFAULT"
    }
