"""The experiment's statistics: paired differences over seeds with t intervals, bootstrap intervals, detector scores.

    t_interval([0.05, 0.02, 0.08])          -> Interval(mean, low, high, n): Student-t 95% CI of a mean over seeds
    verdict(interval)                       -> "higher" / "lower" / "no difference detected" (the CI must exclude 0)
    bootstrap(statistic, n_items, seed)     -> percentile 95% CI of a statistic over resampled items

A comparison is claimed only where its 95% CI excludes 0; otherwise the table says "no difference detected".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate and its 95% confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    """Units it was computed over (seeds, or items for a bootstrap)."""

    def excludes_zero(self) -> bool:
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def t_interval(values: Sequence[float]) -> Interval:
    """Mean and Student-t 95% CI over independent replicates (seeds); NaN bounds with fewer than 2."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    n = x.size
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def verdict(interval: Interval, higher: str = "higher", lower: str = "lower") -> str:
    """The ordering a CI supports: `higher` / `lower` where it excludes 0, else "no difference detected"."""
    if not interval.excludes_zero():
        return "no difference detected"
    return higher if interval.low > 0 else lower


def bootstrap(statistic: Callable[[np.ndarray], float], n_items: int, *, seed: int = 0, draws: int = 2000) -> Interval:
    """Percentile 95% CI of `statistic(indices)` over `draws` resamples of the items 0..n_items-1 with replacement
    (resamples where the statistic is undefined, NaN, are left out)."""
    point = statistic(np.arange(n_items))
    if n_items == 0:
        return Interval(point, math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n_items, n_items)) for _ in range(draws)], dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return Interval(point, math.nan, math.nan, n_items)
    lo, hi = np.quantile(values, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return Interval(point, float(lo), float(hi), n_items)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties one half; NaN scores rank above every number
    (a candidate without a window is always flagged). NaN when a class is empty."""
    s = np.nan_to_num(scores.astype(np.float64), nan=np.inf)
    pos, neg = s[positive], s[~positive]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    above = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(above / (pos.size * neg.size))


def precision_recall(flagged: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """Precision and recall of `flagged` for the positive class (NaN where undefined)."""
    tp = int((flagged & positive).sum())
    n_flag, n_pos = int(flagged.sum()), int(positive.sum())
    return (tp / n_flag if n_flag else math.nan), (tp / n_pos if n_pos else math.nan)


def youden_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """The threshold tau maximising TPR - FPR of "score >= tau" (Youden's J), midway between adjacent distinct
    scores; NaN scores are always flagged and do not move it. NaN when a class is empty."""
    finite = ~np.isnan(scores)
    if positive.sum() == 0 or (~positive).sum() == 0 or not finite.any():
        return math.nan
    values = np.unique(scores[finite])
    cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    best, best_j = cuts[0], -math.inf
    for tau in cuts:
        flagged = ~finite | (scores >= tau)
        j = flagged[positive].mean() - flagged[~positive].mean()
        if j > best_j + 1e-12:
            best, best_j = tau, j
    return float(best)
