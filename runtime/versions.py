"""Versions recorded with stores and runs: python, fsar (installed or `unknown`), imported packages.

`versions("torch", "open_clip", "fsar")` -> {"torch": "2.14.1", ...}, in the order asked.
"""

from __future__ import annotations

import importlib
import platform
from importlib.metadata import PackageNotFoundError, version


def fsar_version() -> str:
    """The installed fsar distribution's version, `unknown` when it is not installed."""
    try:
        return version("fsar")
    except PackageNotFoundError:
        return "unknown"


def versions(*names: str) -> dict[str, str]:
    """`python`, `fsar`, or a module's `__version__` (e.g. `torch`, `open_clip`), by name."""
    out: dict[str, str] = {}
    for name in names:
        if name == "python":
            out[name] = platform.python_version()
        elif name == "fsar":
            out[name] = fsar_version()
        else:
            out[name] = str(importlib.import_module(name).__version__)
    return out
