"""Summaries over seeds: mean with a Student-t 95% interval, and the largest distance solved."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["mean_ci", "normalized_accuracy", "solved_distance", "t_quantile"]

# two-sided 95% Student-t quantiles t_{0.975, df}; beyond 30 the normal value is within 2%.
# A table, not scipy.stats.t.ppf: the one quantile the reports use does not justify scipy as a
# dependency; tests/test_stats.py checks every entry against a numerical integral of the pdf.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip


def t_quantile(df: int) -> float:
    """``t_{0.975}`` with ``df`` degrees of freedom (1.960 for large ``df``)."""
    if df < 1:
        return math.nan
    return _T975[df - 1] if df <= len(_T975) else 1.960


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t over the values).

    One value: the half-width is ``nan`` (no spread to estimate); no values: both ``nan``.
    """
    xs = [v for v in values if v is not None and not math.isnan(v)]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    mean = sum(xs) / n
    if n == 1:
        return mean, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, t_quantile(n - 1) * sd / math.sqrt(n)


def normalized_accuracy(acc: float, chance: float) -> float:
    """``(acc - chance) / (1 - chance)``: 0 at chance, 1 when perfect."""
    return (acc - chance) / (1.0 - chance)


def solved_distance(score_by_distance: Mapping[int, float], threshold: float = 0.9) -> int | None:
    """Largest distance ``d`` such that every distance up to ``d`` scores ``>= threshold``.

    Scores are normalised accuracies (or ``1 - loss/baseline`` for regression). Requiring
    all shorter distances to pass keeps one lucky long run from counting. ``None`` if even
    the shortest distance fails.
    """
    best = None
    for d in sorted(score_by_distance):
        if score_by_distance[d] >= threshold:
            best = d
        else:
            break
    return best
