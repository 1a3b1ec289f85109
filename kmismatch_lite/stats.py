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


# --- Many seeds: the seed is a random effect (protocol step 8) ---

HALF_WIDTH = 0.02  # the interval half-width the "seeds needed" figure is for: +/-2 points


def require_pooling() -> None:
    """Fail early, before any stage runs, if the pooled statistics' libraries are missing."""
    from kmismatch_lite.errors import missing_extra

    for package in ("scipy", "statsmodels"):
        try:
            __import__(package)
        except ImportError:
            raise missing_extra(package, "stats") from None


def paired_difference(wrong_a: Sequence[bool], wrong_b: Sequence[bool]) -> tuple[float, float]:
    """mean(a) - mean(b) over paired questions and the variance of that mean. With no discordant
    pair the variance would be 0 (infinite weight); half a pair on each side stands in (the usual
    continuity correction)."""
    d = np.asarray(wrong_a, dtype=float) - np.asarray(wrong_b, dtype=float)
    n = len(d)
    if not np.any(d):
        return 0.0, 1.0 / n**2
    return float(d.mean()), float(d.var() / n)


def random_effects(effects: Sequence[float], variances: Sequence[float], level: float = 0.95) -> dict:
    """DerSimonian-Laird random-effects pooling (statsmodels): the pooled effect with its
    Hartung-Knapp interval (t with k-1 df, honest for few seeds) and the plain normal one, the
    between-seed SD tau, Cochran's Q with its p-value, I², and the fixed-effect estimate."""
    from statsmodels.stats.meta_analysis import combine_effects

    # An untruncated negative tau² can zero a weight's denominator; those figures are replaced below.
    with np.errstate(divide="ignore", invalid="ignore"):
        res = combine_effects(np.asarray(effects, float), np.asarray(variances, float), method_re="dl",
                              alpha=1 - level)
        ci_fe, ci_re = res.conf_int(alpha=1 - level, use_t=False)[:2]
        ci_fe_t, ci_re_t, ci_fe_hk, ci_re_hk = res.conf_int(alpha=1 - level, use_t=True)
    estimate = res.mean_effect_re
    if res.tau2 < 0:
        # statsmodels leaves the moment estimate untruncated when Q < k-1; DerSimonian-Laird
        # truncates tau² at 0, where the random-effects model is the fixed-effect one.
        estimate, ci_re, ci_re_t, ci_re_hk = res.mean_effect_fe, ci_fe, ci_fe_t, ci_fe_hk
    # Seeds that happen to agree shrink the Hartung-Knapp scale towards 0 and the interval with
    # it; the usual modification keeps it no narrower than the t interval at scale 1.
    ci = ci_re_hk if ci_re_hk[1] - ci_re_hk[0] >= ci_re_t[1] - ci_re_t[0] else ci_re_t
    return {
        "estimate": float(estimate),
        "ci": [float(ci[0]), float(ci[1])],
        "ci_normal": [float(ci_re[0]), float(ci_re[1])],
        "tau": float(np.sqrt(max(res.tau2, 0.0))),
        "q": float(res.q),
        "q_p": float(res.test_homogeneity().pvalue),
        "i2": float(max(res.i2, 0.0)),
        "fixed_estimate": float(res.mean_effect_fe),
        "fixed_ci": [float(ci_fe[0]), float(ci_fe[1])],
    }


def resample_seeds_then_questions(arrays: Sequence[np.ndarray], n_boot: int,
                                  rng: np.random.Generator) -> np.ndarray:
    """Means over the questions (each array's last axis) of `n_boot` hierarchical resamples: seeds
    drawn with replacement, then each drawn seed's questions drawn with replacement (one draw shared
    by the array's leading axes). Shape: (n_boot, seeds, *leading axes)."""
    picks = rng.integers(0, len(arrays), size=(n_boot, len(arrays)))
    out = np.empty(picks.shape + arrays[0].shape[:-1])
    for s, a in enumerate(arrays):
        drawn = picks == s
        idx = rng.integers(0, a.shape[-1], size=(int(drawn.sum()), a.shape[-1]))
        out[drawn] = np.moveaxis(a[..., idx].mean(axis=-1), -1, 0)
    return out


def hierarchical_bootstrap(diffs: Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0,
                           level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean over seeds of each seed's mean paired difference,
    resampling seeds, then the questions within each resampled seed."""
    arrays = [np.asarray(d, dtype=float) for d in diffs]
    means = resample_seeds_then_questions(arrays, n_boot, np.random.default_rng(seed))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means.mean(axis=1), [alpha, 1 - alpha])
    return float(lo), float(hi)


def stratified_exact(tables: Sequence[tuple[int, int]]) -> dict:
    """The fixed-effect view: seeds as strata of matched pairs. Pooled over strata, the
    Cochran-Mantel-Haenszel test for matched pairs conditions on the discordant pairs; its exact
    form is a binomial test of a-only against b-only pairs (scipy), and the CMH chi-square and
    Mantel-Haenszel odds ratio come from statsmodels' StratifiedTable over the pairs."""
    from scipy import stats as st
    from statsmodels.stats.contingency_tables import StratifiedTable

    a_only = sum(b for b, _ in tables)
    b_only = sum(c for _, c in tables)
    exact_p = float(st.binomtest(a_only, a_only + b_only, 0.5).pvalue) if a_only + b_only else 1.0
    out = {"a_only": a_only, "b_only": b_only, "exact_p": exact_p, "cmh_chi2": None, "cmh_p": None,
           "mh_odds_ratio": None}
    if a_only and b_only:
        # Each discordant pair is a stratum (concordant pairs add nothing to the CMH sums).
        pairs = [np.array([[1, 0], [0, 1]])] * a_only + [np.array([[0, 1], [1, 0]])] * b_only
        table = StratifiedTable(pairs)
        test = table.test_null_odds(correction=False)
        out.update(cmh_chi2=float(test.statistic), cmh_p=float(test.pvalue),
                   mh_odds_ratio=float(table.oddsratio_pooled))
    return out


def seeds_needed(sd: float, half_width: float = HALF_WIDTH, level: float = 0.95, most: int = 100_000) -> int:
    """The fewest seeds k whose t interval (k-1 df) on the mean of k per-seed differences, each
    spread with SD `sd` around the true mean, is no wider than +/-half_width."""
    from scipy import stats as st

    q = 1 - (1 - level) / 2
    k = 2
    while k < most and st.t.ppf(q, k - 1) * sd / np.sqrt(k) > half_width:
        k += 1
    return k


def pool_seeds(pairs: Sequence[tuple[Sequence[bool], Sequence[bool]]], n_boot: int = 2000,
               seed: int = 0) -> dict:
    """The teacher-vs-self comparison pooled over seeds, `pairs` holding per seed (wrong_a,
    wrong_b): random effects (headline), hierarchical bootstrap, stratified exact test, and the
    seeds the observed spread needs for a +/-2-point interval."""
    diffs = [np.asarray(a, dtype=float) - np.asarray(b, dtype=float) for a, b in pairs]
    per_seed = [paired_difference(a, b) for a, b in pairs]
    effects, variances = [e for e, _ in per_seed], [v for _, v in per_seed]
    re = random_effects(effects, variances)
    spread = float(np.sqrt(re["tau"] ** 2 + np.mean(variances)))
    return {
        "seeds": len(pairs),
        "differences": effects,
        "standard_errors": [float(np.sqrt(v)) for v in variances],
        "random_effects": re,
        "hierarchical_bootstrap_95ci": list(hierarchical_bootstrap(diffs, n_boot, seed)),
        "stratified": stratified_exact([(int((d > 0).sum()), int((d < 0).sum())) for d in diffs]),
        "seed_sd": spread,
        "seeds_for_2_points": seeds_needed(spread),
    }
