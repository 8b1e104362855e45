"""Stage 2: few-shot reasoning heads trained and evaluated from cached features only (never open_clip)."""

from .base import Features, FewShotHead
from .registry import available, create, register

__all__ = ["Features", "FewShotHead", "available", "create", "register"]
