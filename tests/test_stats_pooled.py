"""Pooling seeds (the seed a random effect) against figures worked out by hand."""

import importlib.util
import random
import sys

import pytest

from kmismatch_lite import stats
from kmismatch_lite.errors import KmmError


def test_pooling_without_the_stats_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "statsmodels", None)
    with pytest.raises(KmmError, match=r"statsmodels is not installed: pip install 'kmismatch_lite\[stats\]'"):
        stats.require_pooling()


needs_stats = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("scipy", "statsmodels")),
                                 reason="needs the stats extra (scipy, statsmodels)")

# Five seeds of the quickstart: difference in wrong-answer rate (teacher's set minus own set) and
# each seed's 95% bootstrap interval, in points.
ISSUE_SEEDS = [(-3.2, -6.8, 0.3), (-3.0, -5.5, -0.5), (4.8, 1.5, 8.0), (6.8, 3.0, 10.3), (14.5, 9.8, 19.0)]
T_975_4DF = 2.7764451051977987  # t quantile, 4 degrees of freedom (tables)


def dersimonian_laird_by_hand(d, v):
    """The textbook DerSimonian-Laird formulas, written out, and the Hartung-Knapp interval."""
    k = len(d)
    w = [1 / x for x in v]
    fixed = sum(wi * di for wi, di in zip(w, d)) / sum(w)
    q = sum(wi * (di - fixed) ** 2 for wi, di in zip(w, d))
    c = sum(w) - sum(wi**2 for wi in w) / sum(w)
    tau2 = max(0.0, (q - (k - 1)) / c)
    ws = [1 / (x + tau2) for x in v]
    mu = sum(wi * di for wi, di in zip(ws, d)) / sum(ws)
    se = (1 / sum(ws)) ** 0.5
    se_hk = (sum(wi * (di - mu) ** 2 for wi, di in zip(ws, d)) / (k - 1) / sum(ws)) ** 0.5
    return {"fixed": fixed, "q": q, "tau": tau2**0.5, "i2": max(0.0, (q - (k - 1)) / q), "mu": mu,
            "ci_normal": (mu - 1.959963984540054 * se, mu + 1.959963984540054 * se),
            "ci_hk": (mu - T_975_4DF * se_hk, mu + T_975_4DF * se_hk)}


@needs_stats
def test_random_effects_on_the_five_quickstart_seeds():
    d = [x / 100 for x, _, _ in ISSUE_SEEDS]
    v = [((hi - lo) / 100 / (2 * 1.959963984540054)) ** 2 for _, lo, hi in ISSUE_SEEDS]
    hand = dersimonian_laird_by_hand(d, v)
    re = stats.random_effects(d, v)
    assert re["estimate"] == pytest.approx(hand["mu"], rel=1e-9)
    assert re["fixed_estimate"] == pytest.approx(hand["fixed"], rel=1e-9)
    assert re["tau"] == pytest.approx(hand["tau"], rel=1e-9)
    assert re["q"] == pytest.approx(hand["q"], rel=1e-9)
    assert re["i2"] == pytest.approx(hand["i2"], rel=1e-9)
    assert re["ci_normal"] == pytest.approx(hand["ci_normal"], rel=1e-6)
    # Hartung-Knapp, wider here than the t interval at scale 1, so no modification applies
    assert re["ci"] == pytest.approx(hand["ci_hk"], rel=1e-6)
    # what the figures say: seeds spread by some 6-7 points, almost all of it between seeds, and
    # the pooled interval includes zero although three seeds were "significant" on their own
    assert 0.06 < re["tau"] < 0.075 and re["i2"] > 0.9
    assert re["ci"][0] < 0 < re["ci"][1]
    assert re["q_p"] < 1e-10


@needs_stats
def test_seeds_needed_for_two_points_at_the_quickstart_spread():
    sd = 0.07  # between-seed SD about 7 points
    k = stats.seeds_needed(sd)
    assert 45 <= k <= 55  # about (1.96 * 7 / 2)^2 = 47, a little more with t quantiles
    from scipy.stats import t

    assert t.ppf(0.975, k - 1) * sd / k**0.5 <= 0.02 < t.ppf(0.975, k - 2) * sd / (k - 1) ** 0.5
    assert stats.seeds_needed(0.0) == 2


@needs_stats
def test_paired_difference_by_hand():
    # teacher-only wrong on 3 questions, self-only on 1, of 10: d = 0.2,
    # variance of the mean = ((b + c)/n - d^2) / n = (0.4 - 0.04) / 10
    a = [True, True, True, False, False, True, False, False, False, False]
    b = [False, False, False, True, False, True, False, False, False, False]
    d, v = stats.paired_difference(a, b)
    assert d == pytest.approx(0.2) and v == pytest.approx(0.036)
    # no discordant pair: half a pair on each side, (1/n) / n
    assert stats.paired_difference(a, a) == (0.0, pytest.approx(0.01))


@needs_stats
def test_stratified_exact_pools_discordant_pairs_over_seeds():
    out = stats.stratified_exact([(4, 1), (6, 1), (0, 0)])
    assert (out["a_only"], out["b_only"]) == (10, 2)
    assert out["exact_p"] == pytest.approx(stats.mcnemar_exact(10, 2))
    assert out["exact_p"] == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert out["cmh_chi2"] == pytest.approx((10 - 2) ** 2 / 12)  # McNemar's chi-square, uncorrected
    assert out["mh_odds_ratio"] == pytest.approx(10 / 2)
    assert stats.stratified_exact([(0, 0)])["exact_p"] == 1.0


@needs_stats
def test_hierarchical_bootstrap_resamples_seeds():
    # Two seeds, no spread within either (all +1, all 0): only the seed draw varies, so the mean
    # is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4 and the 95% interval is [0, 1].
    lo, hi = stats.hierarchical_bootstrap([[1.0] * 50, [0.0] * 50], n_boot=4000, seed=0)
    assert (lo, hi) == (0.0, 1.0)
    # Identical seeds: as wide as one seed's question bootstrap, not narrower.
    rng = random.Random(1)
    one = [rng.choice([-1.0, 0.0, 0.0, 1.0]) for _ in range(200)]
    lo, hi = stats.hierarchical_bootstrap([one] * 4, n_boot=3000, seed=0)
    sd = (sum(x * x for x in one) / 200 - (sum(one) / 200) ** 2) ** 0.5
    assert hi - lo == pytest.approx(2 * 1.96 * sd / (4 * 200) ** 0.5, rel=0.2)
    assert stats.hierarchical_bootstrap([one, one], seed=5) == stats.hierarchical_bootstrap([one, one], seed=5)


@needs_stats
def test_pool_seeds_puts_the_pieces_together():
    def seed(teacher_only, self_only, n=400):
        wrong_t = [True] * teacher_only + [False] * (n - teacher_only)
        wrong_s = [False] * teacher_only + [True] * self_only + [False] * (n - teacher_only - self_only)
        return wrong_t, wrong_s

    pairs = [seed(10, 23), seed(30, 11), seed(40, 13), seed(70, 12)]
    p = stats.pool_seeds(pairs, n_boot=1000)
    assert p["seeds"] == 4
    assert p["differences"] == pytest.approx([-13 / 400, 19 / 400, 27 / 400, 58 / 400])
    re = stats.random_effects(p["differences"], [s**2 for s in p["standard_errors"]])
    for key in ("estimate", "tau", "i2", "q", "fixed_estimate"):
        assert p["random_effects"][key] == pytest.approx(re[key], rel=1e-12), key
    assert (p["stratified"]["a_only"], p["stratified"]["b_only"]) == (150, 59)
    lo, hi = p["hierarchical_bootstrap_95ci"]
    assert lo < re["estimate"] < hi
    assert p["seed_sd"] == pytest.approx((re["tau"] ** 2 + sum(s**2 for s in p["standard_errors"]) / 4) ** 0.5)
    assert p["seeds_for_2_points"] == stats.seeds_needed(p["seed_sd"])


@needs_stats
def test_random_effects_with_less_spread_than_chance_truncates_tau_at_zero():
    # Q below its degrees of freedom: DerSimonian-Laird's tau² is 0, and the random-effects
    # estimate and intervals are the fixed-effect ones (inverse-variance, Hartung-Knapp scale).
    d, v = [0.010, 0.012, 0.011], [0.0004, 0.0004, 0.0001]
    w = [1 / x for x in v]
    fixed = sum(wi * di for wi, di in zip(w, d)) / sum(w)
    q = sum(wi * (di - fixed) ** 2 for wi, di in zip(w, d))
    assert q < 2
    re = stats.random_effects(d, v)
    assert re["tau"] == 0.0 and re["i2"] == 0.0
    assert re["estimate"] == pytest.approx(fixed) and re["q"] == pytest.approx(q)
    se = (1 / sum(w)) ** 0.5
    assert re["ci_normal"] == pytest.approx([fixed - 1.959963984540054 * se, fixed + 1.959963984540054 * se])
    se_hk = (q / 2 / sum(w)) ** 0.5
    assert se_hk < se  # so the modified Hartung-Knapp interval uses the scale-1 standard error
    t2 = 4.302652729911275  # t quantile, 2 degrees of freedom
    assert re["ci"] == pytest.approx([fixed - t2 * se, fixed + t2 * se])


@needs_stats
def test_seeds_that_agree_exactly_still_get_an_interval():
    # Two seeds with the same difference: Q = 0 and the plain Hartung-Knapp scale is 0; the
    # interval falls back to t (1 df) times the fixed-effect standard error, not to a point.
    re = stats.random_effects([-0.125, -0.125], [0.01, 0.01])
    se = (1 / (100 + 100)) ** 0.5
    t1 = 12.706204736174707  # t quantile, 1 degree of freedom
    assert re["estimate"] == pytest.approx(-0.125)
    assert re["ci"] == pytest.approx([-0.125 - t1 * se, -0.125 + t1 * se])
