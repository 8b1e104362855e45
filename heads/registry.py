"""Head registry: `create(name, **cfg)` and `available()`, like open_clip's model factory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import FewShotHead

_FACTORIES: dict[str, Callable[..., FewShotHead]] = {}


def register(name: str, factory: Callable[..., FewShotHead]) -> None:
    """Make `factory` available as `create(name, ...)`."""
    _FACTORIES[name] = factory


def available() -> list[str]:
    """Names accepted by `create`."""
    _register_builtin()
    return sorted(_FACTORIES)


def factory(name: str) -> Callable[..., FewShotHead]:
    """The constructor registered under `name` (ValueError if unknown)."""
    _register_builtin()
    if name not in _FACTORIES:
        raise ValueError(f"unknown head {name!r}; available: {', '.join(available())}")
    return _FACTORIES[name]


def create(name: str, **cfg: Any) -> FewShotHead:
    """Build a head by name; unknown names or options raise ValueError with one line."""
    _register_builtin()
    if name not in _FACTORIES:
        raise ValueError(f"unknown head {name!r}; available: {', '.join(available())}")
    try:
        return _FACTORIES[name](**cfg)
    except TypeError as error:
        raise ValueError(f"head {name!r}: {error}") from None


def _register_builtin() -> None:
    if _FACTORIES:
        return
    from .baselines import OTAM, Prototypes, ZeroShot
    from .emp import EMPNet
    from .lastlayer import LastLayer
    from .probe import LinearProbe
    from .tsfsar import TSFSAR

    register("emp", EMPNet)
    register("zeroshot", ZeroShot)
    register("proto", Prototypes)
    register("otam", OTAM)
    register("lastlayer", LastLayer)
    register("probe", LinearProbe)
    register("tsfsar", TSFSAR)
