"""95% intervals and paired tests on accuracies: one rule for `fsar-eval` and for studies.

Every interval fsar prints is Student's t interval of a mean, `t(0.975, n - 1) * s / sqrt(n)` with
`s` the sample standard deviation (ddof=1): over 10,000 episodes t(0.975, 9999) = 1.9602, the normal
1.96 to four digits; over a handful of training seeds it is the exact small-sample interval (4.30 for
three seeds, where 1.96 would claim twice the confidence it has). Quantiles come from scipy.stats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95


def t_critical(n: int) -> float:
    """The two-sided 95% critical value of Student's t for a mean of `n` values (n - 1 df)."""
    return float(stats.t.ppf(0.5 + LEVEL / 2, n - 1))


def ci95_half_width(values: Sequence[float] | np.ndarray) -> float:
    """Half-width of the 95% t interval of the mean of `values` (NaN for fewer than two)."""
    array = np.asarray(values, dtype=np.float64)
    n = len(array)
    if n < 2:
        return math.nan
    return t_critical(n) * float(array.std(ddof=1)) / math.sqrt(n)


@dataclass(frozen=True)
class Paired:
    """B - A over identical episodes, in percentage points."""

    mean: float
    ci95: float  # half-width of the t interval of the mean difference
    p_value: float  # two-sided paired t-test
    t: float
    episodes: int

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95

    def summary(self, a: str = "A", b: str = "B") -> str:
        return (
            f"{b} - {a}: {self.mean:+.2f} pp (95% CI {self.low:+.2f} to {self.high:+.2f}), "
            f"paired t-test p = {format_p(self.p_value)}, {self.episodes} episodes"
        )


def paired_comparison(a: np.ndarray, b: np.ndarray) -> Paired:
    """Paired difference b - a of per-episode accuracies (fractions in [0, 1]) of the same episodes.

    The difference of each episode cancels how hard that episode is, so its interval is far
    tighter than either head's own."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired accuracies need two vectors of one length (got {a.shape}, {b.shape})"
        )
    n = len(a)
    diffs = (b - a) * 100.0
    if n < 2:
        return Paired(float(diffs.mean()) if n else math.nan, math.nan, math.nan, math.nan, n)
    mean, sd = float(diffs.mean()), float(diffs.std(ddof=1))
    if sd == 0.0:  # every episode differs by the same amount
        return Paired(mean, 0.0, 1.0 if mean == 0.0 else 0.0, 0.0 if mean == 0.0 else math.inf, n)
    t = mean / (sd / math.sqrt(n))
    p_value = float(2.0 * stats.t.sf(abs(t), n - 1))
    return Paired(mean, ci95_half_width(diffs), p_value, t, n)


@dataclass(frozen=True)
class SeedMean:
    """Accuracy over training seeds: the mean, and a 95% interval (over seeds when there are several)."""

    mean: float
    ci95: float
    seeds: int
    over: str  # "seeds" (t interval of the seeds' accuracies) or "episodes" (the one run's own CI)


def mean_over_seeds(accuracies: Sequence[float], episode_ci95: Sequence[float]) -> SeedMean:
    """Mean of the seeds' test accuracies; with one seed, that run's CI over episodes."""
    values = np.asarray(accuracies, dtype=np.float64)
    if len(values) == 0:
        return SeedMean(math.nan, math.nan, 0, "seeds")
    if len(values) == 1:
        return SeedMean(float(values[0]), float(episode_ci95[0]), 1, "episodes")
    return SeedMean(float(values.mean()), ci95_half_width(values), len(values), "seeds")


def format_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"
