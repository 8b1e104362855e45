"""Stage 2: few-shot reasoning heads trained and evaluated from cached features only (never open_clip).

`heads.create`, `heads.available` and `heads.register` import no head (nor torch) until one is built.
"""

from typing import Any

from .registry import available, create, register

__all__ = ["Features", "FewShotHead", "available", "create", "register"]


def __getattr__(name: str) -> Any:
    if name in ("Features", "FewShotHead"):  # torch, imported when first asked for
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module 'heads' has no attribute {name!r}")
