"""Statistics of a multi-seed comparison: confidence intervals, tests against the best, Holm correction.

Plain functions over lists of numbers (one per seed), so they can be checked on hand-computed inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class MeanCI:
    """Mean of a sample with a two-sided t-based confidence interval (mean ± half_width)."""

    mean: float
    half_width: float
    n: int
    std: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> MeanCI:
    """t-based interval: mean ± t_{(1+c)/2, n-1} · s / sqrt(n); NaN half-width for fewer than 2 values."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return MeanCI(math.nan, math.nan, 0, math.nan)
    if n == 1:
        return MeanCI(float(x[0]), math.nan, 1, math.nan)
    std = float(x.std(ddof=1))
    t = float(sps.t.ppf((1 + confidence) / 2, df=n - 1))
    return MeanCI(float(x.mean()), t * std / math.sqrt(n), n, std)


def compare_samples(a: Sequence[float], b: Sequence[float], test: str = "welch") -> float:
    """Two-sided p-value that samples a and b differ: Welch's t-test or Mann-Whitney U.

    Identical constant samples have no evidence of a difference (p = 1), where scipy would give NaN.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or len(y) < 2:
        return math.nan
    if np.ptp(np.concatenate([x, y])) == 0:
        return 1.0
    if test == "welch":
        if x.std() == 0 and y.std() == 0:
            return 0.0  # two different constants: the difference is certain
        p = sps.ttest_ind(x, y, equal_var=False).pvalue
    elif test == "mannwhitney":
        p = sps.mannwhitneyu(x, y, alternative="two-sided").pvalue
    else:
        raise ValueError(f"unknown test {test!r}; use welch or mannwhitney")
    return float(p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaN entries stay NaN."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(len(p), math.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    running = 0.0
    for rank, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def first_reach(history: Sequence[dict], threshold: float, key: str = "val_accuracy") -> dict | None:
    """The first report whose `key` reaches `threshold` (its step and elapsed time), or None."""
    for row in history:
        value = row.get(key)
        if value is not None and value >= threshold:
            return row
    return None


def mean_band(curves: Sequence[Sequence[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and 95% t-band of several (step, value) curves on their common steps.

    Seeds stop at different epochs (target reached, diverged): a step is kept while >= 2 seeds have it, so
    the band never silently averages over a changing set of seeds without one.
    """
    by_step: dict[float, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            if value is not None and math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    steps = sorted(s for s, v in by_step.items() if len(v) >= min(2, len(curves)))
    cis = [mean_ci(by_step[s]) for s in steps]
    mean = np.array([c.mean for c in cis])
    half = np.array([0.0 if math.isnan(c.half_width) else c.half_width for c in cis])
    return np.array(steps, dtype=float), mean, half
