"""Head registry: every head by name, built into fsar or from another installed package.

Built-ins and plugins take one path: an entry `name -> "module:attribute"` whose module is imported
on first use. Other packages declare theirs in the entry-point group `fsar.heads` (as pytest plugins
declare `pytest11`); `available()` reads names from package metadata only, importing nothing.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from runtime.versions import fsar_version

if TYPE_CHECKING:
    from .base import FewShotHead

ENTRY_POINT_GROUP = "fsar.heads"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
NAME_RULE = "letters, digits and '_.+-', 64 at most, starting with a letter or digit"
BUILTIN: dict[str, str] = {
    "emp": "heads.emp:EMPNet",
    "zeroshot": "heads.baselines:ZeroShot",
    "proto": "heads.baselines:Prototypes",
    "otam": "heads.baselines:OTAM",
    "lastlayer": "heads.lastlayer:LastLayer",
    "probe": "heads.probe:LinearProbe",
    "tsfsar": "heads.tsfsar:TSFSAR",
}


class HeadError(ValueError):
    """A head name, plugin or option users can fix (one line naming the head and its package)."""


@dataclass(frozen=True)
class HeadSource:
    """Where a head comes from: fsar itself, an installed package's entry point, or `register()`."""

    name: str
    target: str  # "module:attribute"; "" for a factory passed to register()
    distribution: str  # "fsar" for built-ins, "" for register()
    version: str = ""

    @property
    def builtin(self) -> bool:
        return self.distribution == "fsar"

    def describe(self) -> str:
        """E.g. `package fsar-my-head 0.1.0 (entry point my-head = my_head:Head)`."""
        if self.builtin:
            return "built into fsar"
        if not self.distribution:
            return "registered in this process"
        return (
            f"package {self.distribution} {self.version} (entry point {self.name} = {self.target})"
        )

    def to_json(self) -> dict[str, str]:
        return {"distribution": self.distribution, "version": self.version, "target": self.target}


@dataclass
class _Entry:
    source: HeadSource
    load: Callable[[], Any]  # imports the factory
    loaded: Any = field(default=None, repr=False)


def _import(target: str) -> Any:
    module, _, attribute = target.partition(":")
    value: Any = importlib.import_module(module)
    for part in attribute.split(".") if attribute else ():
        value = getattr(value, part)
    return value


_registered: dict[str, _Entry] = {}  # register() in this process
_installed: dict[str, _Entry] | None = None  # built-ins, then plugins: read on first use
_refused: dict[str, str] = {}  # entry point -> why it is not a head (a built-in's name)
_contested: dict[str, str] = {}  # name -> why no head has it (packages clash over it)


def _installed_entries() -> dict[str, _Entry]:
    """Built-ins, then every package's `fsar.heads` entry points (metadata only, nothing imported)."""
    global _installed
    if _installed is None:
        version = fsar_version()
        table = {
            name: _Entry(HeadSource(name, target, "fsar", version), lambda t=target: _import(t))
            for name, target in BUILTIN.items()
        }
        claims: dict[str, list[tuple[HeadSource, Callable[[], Any]]]] = {}
        for point in entry_points(group=ENTRY_POINT_GROUP):
            dist = point.dist
            found = HeadSource(
                point.name,
                point.value,
                dist.name if dist is not None else "unknown",
                dist.version if dist is not None else "",
            )
            claims.setdefault(point.name, []).append((found, point.load))
        for name, found in claims.items():
            if not NAME.match(name):  # run folders and plan cells are named after heads
                for plugin, _ in found:
                    _refused[f"{plugin.distribution}:{name}"] = (
                        f"{plugin.describe()} is refused: a head name is {NAME_RULE}"
                    )
            elif name in BUILTIN:  # refused: a built-in is never replaced nor hidden
                for plugin, _ in found:
                    _refused[f"{plugin.distribution}:{name}"] = (
                        f"{plugin.describe()} is refused: {name!r} is a built-in head, and a name "
                        f"must mean one head in every checkpoint and plan; rename the entry point"
                    )
            elif len(found) > 1:
                claimants = " and by ".join(plugin.describe() for plugin, _ in found)
                _contested[name] = f"head {name!r} is claimed by {claimants}: uninstall one of them"
            else:
                table[name] = _Entry(*found[0])
        _installed = table
    return _installed


def reload() -> None:
    """Read installed packages' entry points afresh (after installing one in this process)."""
    global _installed
    _installed = None
    _refused.clear()
    _contested.clear()


def register(name: str, factory: Callable[..., FewShotHead]) -> None:
    """Make `factory` available as `create(name, ...)` in this process; every other head stays.

    A name already held by a built-in or an installed package is refused (HeadError); registering
    a name this process registered before replaces it."""
    if not isinstance(name, str) or not NAME.match(name):
        raise HeadError(f"head name {name!r}: a head name is {NAME_RULE}")
    if not callable(factory):
        raise HeadError(
            f"head {name!r}: the factory must be callable, got {type(factory).__name__}"
        )
    held = _installed_entries().get(name)
    if held is not None or name in _contested:
        owner = held.source.describe() if held is not None else _contested[name]
        raise HeadError(f"head {name!r} is taken ({owner}): register it under another name")
    _registered[name] = _Entry(HeadSource(name, "", ""), lambda: factory)


def available() -> list[str]:
    """Names accepted by `create` (read from metadata: no plugin is imported)."""
    return sorted({**_installed_entries(), **_registered})


def sources() -> list[HeadSource]:
    """Where every available head comes from, in name order."""
    entries = {**_installed_entries(), **_registered}
    return [entries[name].source for name in sorted(entries)]


def problems() -> list[str]:
    """One line per refused entry point (a built-in's name) and per name packages clash over."""
    _installed_entries()
    return [_refused[key] for key in sorted(_refused)] + [
        _contested[name] for name in sorted(_contested)
    ]


def _entry(name: str) -> _Entry:
    entries = {**_installed_entries(), **_registered}
    if name in entries:
        return entries[name]
    if name in _contested:
        raise HeadError(_contested[name])
    raise HeadError(f"unknown head {name!r}; available: {', '.join(available())}")


def source(name: str) -> HeadSource:
    """Where head `name` comes from (HeadError if unknown or contested); imports nothing."""
    return _entry(name).source


def factory(name: str) -> Callable[..., FewShotHead]:
    """The constructor registered under `name`, its module imported now (HeadError naming the
    package when it fails to import)."""
    entry = _entry(name)
    if entry.loaded is None:
        try:
            loaded = entry.load()
        except Exception as error:  # a plugin's import may fail in any way: report, never hide
            if entry.source.builtin:
                raise
            raise HeadError(
                f"head {name!r}: {entry.source.describe()} fails to import "
                f"({_one_line(error)}); fix or uninstall {entry.source.distribution}"
            ) from None
        if not callable(loaded):
            raise HeadError(
                f"head {name!r}: {entry.source.describe()} names a {type(loaded).__name__}, "
                "not a head class or factory"
            )
        entry.loaded = loaded
    return entry.loaded


def create(name: str, **options: Any) -> FewShotHead:
    """Build a head by name; an unknown name, a plugin that fails or a rejected option raises
    HeadError with one line naming the head (and the package of a plugin)."""
    from .base import FewShotHead

    entry = _entry(name)
    build = factory(name)
    try:
        head = build(**options)
    except Exception as error:
        if entry.source.builtin and not isinstance(error, TypeError | ValueError):
            raise  # a bug in fsar, not an option
        origin = "" if entry.source.builtin else f" ({entry.source.describe()})"
        raise HeadError(
            f"head {name!r}{origin}: {_one_line(error, entry.source.builtin)}"
        ) from None
    if not isinstance(head, FewShotHead):
        raise HeadError(
            f"head {name!r} ({entry.source.describe()}) built a {type(head).__name__}, "
            "not a heads.FewShotHead"
        )
    head.name = name  # the registry owns names: checkpoints and results carry this one
    return head


def _one_line(error: BaseException, bare: bool = False) -> str:
    text = " ".join(str(error).split())[:300]
    if bare and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
