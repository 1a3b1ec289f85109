"""The hypothesis test (protocol step 6): paired McNemar exact test and a bootstrap interval."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import comb
from typing import Sequence

import numpy as np


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_diff(x: Sequence[bool], y: Sequence[bool], n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(x) - mean(y), resampling the paired questions."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(xa) != len(ya) or len(xa) == 0:
        raise ValueError("bootstrap needs two paired, non-empty samples")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(xa), size=(n_boot, len(xa)))
    diffs = xa[idx].mean(axis=1) - ya[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    return float(lo), float(hi)


@dataclass(frozen=True)
class PairedTest:
    """wrong(a) vs wrong(b) on the same questions."""

    n: int
    wrong_a: int
    wrong_b: int
    a_only: int
    b_only: int
    diff_rate: float
    ci_low: float
    ci_high: float
    p_value: float

    def as_dict(self) -> dict:
        return asdict(self)


def paired_wrong_test(wrong_a: Sequence[bool], wrong_b: Sequence[bool], n_boot: int = 2000,
                      seed: int = 0) -> PairedTest:
    """McNemar on the discordant pairs, and the bootstrap 95% interval of the rate difference."""
    if len(wrong_a) != len(wrong_b):
        raise ValueError("the two conditions must answer the same questions")
    a_only = sum(1 for a, b in zip(wrong_a, wrong_b) if a and not b)
    b_only = sum(1 for a, b in zip(wrong_a, wrong_b) if b and not a)
    n = len(wrong_a)
    lo, hi = bootstrap_diff(wrong_a, wrong_b, n_boot, seed)
    return PairedTest(n, sum(map(bool, wrong_a)), sum(map(bool, wrong_b)), a_only, b_only,
                      (sum(map(bool, wrong_a)) - sum(map(bool, wrong_b))) / n, lo, hi,
                      mcnemar_exact(a_only, b_only))
