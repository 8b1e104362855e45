"""Paired comparisons over identical episodes, and means over training seeds, with 95% intervals.

Two heads scored on the same test episodes give paired per-episode accuracies; the episode-wise
difference cancels how hard each episode is, so its interval is far tighter than either head's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for aa in (
            m * (b - m) * x / ((a - 1.0 + 2 * m) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1.0 + 2 * m)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def beta_regularized(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return beta_regularized(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(probability: float, df: float) -> float:
    """The `probability` quantile (> 0.5) of Student's t, by bisection on the two-sided tail."""
    tail = 2.0 * (1.0 - probability)
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > tail:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if t_two_sided_p(mid, df) > tail:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


@dataclass(frozen=True)
class Paired:
    """B - A over identical episodes, in percentage points."""

    mean: float
    ci95: float  # half-width of the t-interval of the mean difference
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
    """Paired difference b - a of per-episode accuracies (fractions in [0, 1]) of the same episodes."""
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
    se = sd / math.sqrt(n)
    t = mean / se
    return Paired(mean, t_quantile(0.975, n - 1) * se, t_two_sided_p(t, n - 1), t, n)


@dataclass(frozen=True)
class SeedMean:
    """Accuracy over training seeds: the mean, and a 95% interval (over seeds when there are several)."""

    mean: float
    ci95: float
    seeds: int
    over: str  # "seeds" (t-interval of the seeds' accuracies) or "episodes" (the one run's own CI)


def mean_over_seeds(accuracies: Sequence[float], episode_ci95: Sequence[float]) -> SeedMean:
    """Mean of the seeds' test accuracies; with one seed, that run's CI over episodes."""
    values = np.asarray(accuracies, dtype=np.float64)
    if len(values) == 0:
        return SeedMean(math.nan, math.nan, 0, "seeds")
    if len(values) == 1:
        return SeedMean(float(values[0]), float(episode_ci95[0]), 1, "episodes")
    n = len(values)
    half = t_quantile(0.975, n - 1) * float(values.std(ddof=1)) / math.sqrt(n)
    return SeedMean(float(values.mean()), half, n, "seeds")


def format_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"
