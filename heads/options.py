"""Head options users give (`--option KEY=VALUE`, a plan row's options) checked against the head's
own signature before it is built: a name it takes, a value of the annotated type, finite, bounded
(`OPTION_RANGES` for the options that divide by or sample with their value).

    check_head_options("emp", EMPNet, {"otam_lambda": float("nan")})  # ConfigError, one line
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Sequence
from typing import Any

from .config import ConfigError

MAX_OPTION_INT = 1 << 16  # widths, heads, steps: larger would allocate beyond any head's need
MAX_OPTION_FLOAT = 1e6  # weights, temperatures, ratios: larger is a typo (and overflows an exp)
# (low, high, low itself allowed) of the options a head divides by or draws with; other whole numbers
# are 0..MAX_OPTION_INT, other numbers 0..MAX_OPTION_FLOAT.
POSITIVE = (0.0, MAX_OPTION_FLOAT, False)
PROBABILITY = (0.0, 0.999, True)
OPTION_RANGES: dict[str, tuple[float, float, bool]] = {
    "otam_lambda": POSITIVE, "temperature": POSITIVE, "text_temperature": POSITIVE,
    "temp_clip": POSITIVE, "temp_side": POSITIVE, "kd_t": POSITIVE, "gate_t": POSITIVE,
    "mlp_ratio": POSITIVE, "novel_lr": POSITIVE,
    "dropout": PROBABILITY, "attn_dropout": PROBABILITY, "ffn_dropout": PROBABILITY,
}  # fmt: skip


def check_head_options(
    name: str,
    build: Callable[..., Any],
    options: dict[str, Any],
    refusal: type[ConfigError] = ConfigError,
) -> None:
    """`refusal` naming the option when `build` does not take it or its value is out of kind."""
    try:
        inspect.signature(build).bind(**options)
    except TypeError as error:  # an option the head does not take
        raise refusal(f"head {name!r}: {error}") from None
    hints = _hints(build)
    for key, value in options.items():
        want = _accepts(hints.get(key), value) or _in_range(key, value)
        if want is not None:
            raise refusal(f"--option {key}={value!r}: head {name!r} takes {want}")


def _hints(build: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(build.__init__ if inspect.isclass(build) else build)
    except Exception:  # annotations this Python cannot evaluate: the head checks its own values
        return {}


def _accepts(annotation: Any, value: Any) -> str | None:
    """None when `value` fits `annotation`, else what it should be (unknown annotations fit)."""
    kinds = (
        typing.get_args(annotation) if typing.get_origin(annotation) in _UNIONS else (annotation,)
    )
    if value is None:
        return None if type(None) in kinds or annotation is None else "a value (not null)"
    wants = [_fits(kind, value) for kind in kinds if kind is not type(None)]
    if not wants or any(w is None for w in wants):
        return None
    return " or ".join(w for w in wants if w)


def _fits(kind: Any, value: Any) -> str | None:
    """None when `value` is a `kind`, else a description of a `kind` ("" for kinds not checked)."""
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is int:
        whole = isinstance(value, int) and not isinstance(value, bool)
        return (
            None
            if whole and 0 <= value <= MAX_OPTION_INT
            else f"a whole number 0..{MAX_OPTION_INT}"
        )
    if kind is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        fits = number and math.isfinite(value) and 0 <= value <= MAX_OPTION_FLOAT
        return None if fits else f"a finite number 0..{MAX_OPTION_FLOAT:g}"
    if kind is str:
        return None if isinstance(value, str) else "text"
    if typing.get_origin(kind) in (Sequence, list, tuple):
        return None if isinstance(value, list | tuple | str) else "a list"
    return None


def _in_range(key: str, value: Any) -> str | None:
    """None when a number is within its option's `OPTION_RANGES` entry (or has none)."""
    if key not in OPTION_RANGES or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    low, high, low_allowed = OPTION_RANGES[key]
    if (low <= value if low_allowed else low < value) and value <= high:
        return None
    return f"a number {'from' if low_allowed else 'above'} {low:g} to {high:g}"


_UNIONS = (typing.Union, type(int | None))
