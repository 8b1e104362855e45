"""Checks of the numbers users give (options, FSAR_* variables): the right kind, finite, in range.

Each refusal is an OptionError naming the option and what to use:

    episodes = whole_number("--episodes", value, 1, MAX_EPISODES)
    retries = env_number("FSAR_REMOTE_RETRIES", 3, whole=True, low=1, high=100)
"""

from __future__ import annotations

import math
import os
from typing import Any

from runtime.errors import FsarError

MAX_SEED = 2**63 - 1  # seeds are hashed as unsigned 64-bit counters


class OptionError(FsarError, ValueError):
    """An option or an FSAR_* variable whose value fsar cannot use (one line naming it)."""


def whole_number(
    name: str, value: Any, low: int, high: int, error: type[OptionError] = OptionError
) -> int:
    """`value`, an int within low..high (a bool, a float or text is refused: `error`)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise error(f"{name} {value!r}: use a whole number from {low} to {high}")
    return value


def real_number(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    above_low: bool = False,
    error: type[OptionError] = OptionError,
) -> float:
    """`value` as a finite float within low..high (`above_low`: low itself refused; else `error`)."""
    finite = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not finite or value < low or value > high or (above_low and value == low):
        bound = f"above {low:g}" if above_low else f"from {low:g}"
        upper = "" if math.isinf(high) else f" to {high:g}"
        raise error(f"{name} {value!r}: use a finite number {bound}{upper}")
    return float(value)


def seed(name: str, value: Any, error: type[OptionError] = OptionError) -> int:
    """A seed: a whole number from 0 to 2**63 - 1."""
    return whole_number(name, value, 0, MAX_SEED, error)


def env_number(
    variable: str, default: float, *, whole: bool, low: float, high: float
) -> float | int:
    """The FSAR_* variable `variable` as a number in low..high, `default` when unset or empty."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    kind = "a whole number" if whole else "a number"
    refusal = OptionError(
        f"{variable}={text[:40]!r}: use {kind} from {low:g} to {high:g} (or unset it)"
    )
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        raise refusal from None
    if not math.isfinite(value) or not low <= value <= high:
        raise refusal
    return value


FLAG_WORDS = {"1": True, "on": True, "yes": True, "true": True, "0": False, "off": False, "no": False, "false": False}  # fmt: skip


def env_flag(variable: str) -> bool | None:
    """The FSAR_* variable `variable` as on (1/on/yes/true) or off (0/off/no/false), None when unset."""
    text = os.environ.get(variable, "").strip().lower()
    if not text:
        return None
    if text not in FLAG_WORDS:
        raise OptionError(f"{variable}={text[:40]!r}: use 1 or 0 (or unset it)")
    return FLAG_WORDS[text]
