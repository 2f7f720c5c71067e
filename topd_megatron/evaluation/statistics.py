"""Accuracy statistics over problems: avg@k, unbiased pass@k and their standard errors.

avg@k   mean over problems of (correct samples / k)
pass@k  mean over problems of the unbiased estimator 1 - C(n - c, k) / C(n, k) (n = samples drawn, c correct)
stderr  standard deviation of the per-problem values / sqrt(number of problems)
"""

from __future__ import annotations

import math
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(records: list[dict[str, Any]], k: int) -> dict[str, float]:
    """avg@k, pass@k and standard errors from per-problem records ({'correct': [bool] * n})."""
    avg = [sum(r["correct"]) / len(r["correct"]) for r in records]
    pk = [pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in records]
    avg_m, avg_se = mean_stderr(avg)
    pk_m, pk_se = mean_stderr(pk)
    return {
        f"avg@{k}": avg_m,
        f"avg@{k}_stderr": avg_se,
        f"pass@{k}": pk_m,
        f"pass@{k}_stderr": pk_se,
        "problems": float(len(records)),
    }
