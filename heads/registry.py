"""Head registry: `create(name, **cfg)` and `available()`, like open_clip's model factory."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .base import FewShotHead
from .config import ConfigError

_FACTORIES: dict[str, Callable[..., FewShotHead]] = {}


def register(name: str, factory: Callable[..., FewShotHead]) -> None:
    """Make `factory` available as `create(name, ...)`."""
    _FACTORIES[name] = factory


def available() -> list[str]:
    """Names accepted by `create`."""
    _register_builtin()
    return sorted(_FACTORIES)


def factory(name: str) -> Callable[..., FewShotHead]:
    """The constructor registered under `name` (ConfigError if unknown)."""
    _register_builtin()
    if name not in _FACTORIES:
        raise ConfigError(f"unknown head {name!r}; available: {', '.join(available())}")
    return _FACTORIES[name]


def create(name: str, **cfg: Any) -> FewShotHead:
    """Build a head by name; an unknown name or option, or a bad value, is a one-line ConfigError."""
    build = factory(name)
    try:
        inspect.signature(build).bind(**cfg)
    except TypeError as error:  # an option the head does not take
        raise ConfigError(f"head {name!r}: {error}") from None
    return build(**cfg)


def _register_builtin() -> None:
    if _FACTORIES:
        return
    from .baselines import OTAM, Prototypes, ZeroShot
    from .emp import EMPNet
    from .lastlayer import LastLayer
    from .probe import LinearProbe

    register("emp", EMPNet)
    register("zeroshot", ZeroShot)
    register("proto", Prototypes)
    register("otam", OTAM)
    register("lastlayer", LastLayer)
    register("probe", LinearProbe)
