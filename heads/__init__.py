"""Stage 2: few-shot reasoning heads trained and evaluated from cached features only (never open_clip).

`heads.create`, `heads.available`, `heads.register`, `heads.FewShotHead` load torch on first use, so
`heads.config` (options and their defaults, which the CLI's help shows) imports without it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Features": "heads.base",
    "FewShotHead": "heads.base",
    "available": "heads.registry",
    "create": "heads.registry",
    "register": "heads.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'heads' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
