"""Intervals checked for their level and width, not only for holding the estimate: the per-seed
bootstrap and the dose slope's interval by their coverage over simulated data sets with a known
answer (paired data, where resampling questions in pairs and resampling each condition alone
disagree), the fixed-effect interval, Cochran's Q p-value and the matched-pairs CMH test against
scipy, and the "SD of a seed's difference" against its definition.

Each simulation is seeded; its bar is three binomial standard errors of the coverage estimate
around the nominal level."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("statsmodels", reason="needs the stats extra (scipy, statsmodels)")

from scipy import stats as st  # noqa: E402
from statsmodels.stats.contingency_tables import mcnemar  # noqa: E402

from kmismatch_lite import stats  # noqa: E402
from kmismatch_lite.designs import dose_response

LEVEL = 0.95


def coverage_bar(reps: int, level: float = LEVEL) -> float:
    """Three binomial standard errors of a coverage estimated from `reps` data sets."""
    return 3 * np.sqrt(level * (1 - level) / reps)


# --- the per-seed bootstrap of the paired difference ---

# Joint chance per question of (teacher-set student wrong, self-set student wrong): mostly the
# same questions are wrong for both, so the paired SE is about half the unpaired one.
JOINT = {(1, 1): 0.25, (1, 0): 0.08, (0, 1): 0.04, (0, 0): 0.63}


def test_per_seed_bootstrap_covers_the_true_difference_at_its_level_on_paired_data():
    n, reps = 200, 1000
    cells = list(JOINT)
    probs = np.array([JOINT[c] for c in cells])
    true_diff = JOINT[(1, 0)] - JOINT[(0, 1)]
    se_paired = np.sqrt((JOINT[(1, 0)] + JOINT[(0, 1)] - true_diff**2) / n)
    pt, ps = JOINT[(1, 1)] + JOINT[(1, 0)], JOINT[(1, 1)] + JOINT[(0, 1)]
    se_unpaired = np.sqrt((pt * (1 - pt) + ps * (1 - ps)) / n)
    assert se_unpaired > 1.8 * se_paired  # resampling the two conditions apart would be far wider
    rng = np.random.default_rng(20240601)
    table = np.array(cells)
    covered, widths = 0, []
    for r in range(reps):
        drawn = table[rng.choice(len(cells), size=n, p=probs)]
        lo, hi = stats.bootstrap_diff(drawn[:, 0].astype(bool), drawn[:, 1].astype(bool), n_boot=1000, seed=r)
        covered += lo <= true_diff <= hi
        widths.append(hi - lo)
    coverage = covered / reps
    assert abs(coverage - LEVEL) <= coverage_bar(reps), coverage
    # The mean width is that of the normal interval on the paired SE (the unpaired one is 1.9 times it).
    expected = 2 * st.norm.ppf(0.975) * se_paired
    assert np.mean(widths) == pytest.approx(expected, rel=0.05)


def test_per_seed_bootstrap_level_sets_the_width():
    rng = np.random.default_rng(7)
    x = rng.random(400) < 0.3
    y = x ^ (rng.random(400) < 0.15)
    d = x.astype(float) - y.astype(float)
    se = d.std() / np.sqrt(len(d))
    for level in (0.8, 0.95):
        lo, hi = stats.bootstrap_diff(x, y, n_boot=8000, seed=1, level=level)
        z = st.norm.ppf(1 - (1 - level) / 2)
        # eight thousand resamples: each end within about a tenth of an SE, plus one lattice step
        assert lo == pytest.approx(d.mean() - z * se, abs=0.15 * se + 1 / len(d))
        assert hi == pytest.approx(d.mean() + z * se, abs=0.15 * se + 1 / len(d))


# --- the fixed effect, Cochran's Q and the matched-pairs CMH test ---

D = np.array([0.03, 0.055, 0.01, 0.06, 0.02])
V = np.array([0.0004, 0.0003, 0.0005, 0.0004, 0.0002])


@pytest.mark.parametrize("level", [0.95, 0.90])
def test_fixed_effect_interval_and_q_p_against_scipy(level):
    k = len(D)
    w = 1 / V
    fixed = np.sum(w * D) / np.sum(w)
    q = np.sum(w * (D - fixed) ** 2)
    z = st.norm.ppf(1 - (1 - level) / 2)
    re = stats.random_effects(D, V, level=level)
    assert re["fixed_estimate"] == pytest.approx(fixed, rel=1e-12)
    assert re["fixed_ci"] == pytest.approx([fixed - z / np.sqrt(w.sum()), fixed + z / np.sqrt(w.sum())], rel=1e-9)
    assert re["q"] == pytest.approx(q, rel=1e-12)
    assert re["q_p"] == pytest.approx(st.chi2.sf(q, k - 1), rel=1e-9)
    # the degrees of freedom matter here: k or k - 2 would give another p by far more than the bar
    for wrong_df in (k, k - 2):
        assert abs(st.chi2.sf(q, wrong_df) - st.chi2.sf(q, k - 1)) > 0.05
    tau2 = max(0.0, (q - (k - 1)) / (w.sum() - (w**2).sum() / w.sum()))
    ws = 1 / (V + tau2)
    mu = np.sum(ws * D) / ws.sum()
    assert re["ci_normal"] == pytest.approx([mu - z / np.sqrt(ws.sum()), mu + z / np.sqrt(ws.sum())], rel=1e-9)


@pytest.mark.parametrize("tables", [[(4, 1), (6, 1), (0, 0)], [(12, 7), (9, 10), (15, 6)]])
def test_matched_pairs_cmh_is_mcnemars_chi_square(tables):
    b, c = sum(t[0] for t in tables), sum(t[1] for t in tables)
    out = stats.stratified_exact(tables)
    chi2 = (b - c) ** 2 / (b + c)
    assert out["cmh_chi2"] == pytest.approx(chi2, rel=1e-9)
    assert out["cmh_p"] == pytest.approx(st.chi2.sf(chi2, 1), rel=1e-9)
    assert out["cmh_p"] == pytest.approx(mcnemar([[0, b], [c, 0]], exact=False, correction=False).pvalue, rel=1e-9)
    assert out["exact_p"] == pytest.approx(st.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


# --- seed_sd: the SD of a seed's difference ---

def seed(a_only: int, b_only: int, n: int, both: int = 20) -> tuple[list[bool], list[bool]]:
    """One seed's wrong flags: `both` wrong for both, then a-only, then b-only questions."""
    wrong_a = [True] * (both + a_only) + [False] * (n - both - a_only)
    wrong_b = [True] * both + [False] * a_only + [True] * b_only + [False] * (n - both - a_only - b_only)
    return wrong_a, wrong_b


def test_seed_sd_is_the_sample_sd_of_the_seeds_differences_when_their_variances_are_equal():
    # n = 100; (a + b)/n - ((a - b)/n)^2 is 0.41 for every seed, so each seed's difference has the
    # same sampling variance and the SD of a seed's difference is the seeds' sample SD (ddof=1).
    counts = [(26, 16), (16, 26), (40, 10), (10, 40), (58, 8)]
    pairs = [seed(a, b, 100) for a, b in counts]
    d = np.array([(a - b) / 100 for a, b in counts])
    p = stats.pool_seeds(pairs, n_boot=200)
    assert p["differences"] == pytest.approx(d, abs=1e-12)
    assert len(set(np.round(p["standard_errors"], 12))) == 1
    assert p["random_effects"]["tau"] > 0
    assert p["seed_sd"] == pytest.approx(np.std(d, ddof=1), rel=1e-9)
    k = p["seeds_for_2_points"]
    half = [st.t.ppf(0.975, m - 1) * np.std(d, ddof=1) / np.sqrt(m) for m in (k - 1, k)]
    assert half[1] <= 0.02 < half[0]


def test_seed_sd_estimates_the_spread_of_simulated_seeds():
    # Seeds with a true difference drawn from N(0.05, 0.03²) and 200 or 400 questions each: a
    # seed's observed difference spreads with SD sqrt(0.03² + E[within-seed variance]).
    rng = np.random.default_rng(11)
    k, mu, tau, discordant = 300, 0.05, 0.03, 0.2
    pairs, within = [], []
    for _ in range(k):
        true = rng.normal(mu, tau)
        n = int(rng.choice([200, 400]))
        draw = rng.choice(3, size=n, p=[(discordant + true) / 2, (discordant - true) / 2, 1 - discordant])
        pairs.append((list(draw == 0), list(draw == 1)))
        within.append((discordant - true**2) / n)
    true_sd = np.sqrt(tau**2 + np.mean(within))
    p = stats.pool_seeds(pairs, n_boot=50)
    # three standard errors of an SD estimated from k values, about sd / sqrt(2 (k - 1)) each
    bar = 3 * true_sd / np.sqrt(2 * (k - 1))
    assert abs(p["seed_sd"] - true_sd) <= bar, (p["seed_sd"], true_sd)
    assert abs(np.std(p["differences"], ddof=1) - true_sd) <= bar
    assert abs(p["random_effects"]["tau"] - true_sd) > bar  # tau alone would miss the within-seed part


# --- the dose slope's interval ---

DOSES = (0.0, 0.25, 0.5, 0.75, 1.0)
BASE, SLOPE = 0.2, 0.2


def slope_contrast() -> tuple[float, float, float]:
    """A question is wrong at dose x when its latent u ~ U(0, 1) is below BASE + SLOPE x, so its
    answers at the doses are nested. Per question the least-squares slope through its 0/1
    outcomes is c(u) = sum_j a_j y_j(u), a_j = (x_j - mean x) / Sxx; the slope of the rates is the
    mean of c over the questions. Returns E c, SD c, and the SD the slope would have per question
    if the doses' outcomes were independent."""
    x = np.array(DOSES)
    a = (x - x.mean()) / np.sum((x - x.mean()) ** 2)
    p = BASE + SLOPE * x
    cuts = np.concatenate([[0.0], np.sort(p), [1.0]])
    mean = second = 0.0
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        c = float(np.sum(a * (((lo + hi) / 2) < p)))
        mean += (hi - lo) * c
        second += (hi - lo) * c * c
    return mean, np.sqrt(second - mean**2), float(np.sqrt(np.sum(a**2 * p * (1 - p))))


def test_dose_slope_interval_covers_the_true_slope_at_its_level_with_one_seed():
    n, reps = 300, 500
    mean, sd, sd_independent = slope_contrast()
    assert mean == pytest.approx(SLOPE, abs=1e-12)
    assert sd_independent > 1.3 * sd  # resampling each dose's questions apart would be far wider
    rng = np.random.default_rng(5)
    covered, widths = 0, []
    for r in range(reps):
        u = rng.random(n)
        outcome = {d: u < BASE + SLOPE * d for d in DOSES}
        res = dose_response.dose_slope([outcome], n_boot=500, seed=r)
        lo, hi = res["slope_ci"]
        covered += lo <= SLOPE <= hi
        widths.append(hi - lo)
    coverage = covered / reps
    assert abs(coverage - LEVEL) <= coverage_bar(reps), coverage
    assert np.mean(widths) == pytest.approx(2 * st.norm.ppf(0.975) * sd / np.sqrt(n), rel=0.06)


def test_dose_slope_interval_resamples_seeds():
    # Every question of a seed answers alike, so resampling questions changes nothing and the
    # interval comes from the seed draw alone: slopes 0 and 1, means 0, 1/2, 1 with chances
    # 1/4, 1/2, 1/4, a 95% interval of [0, 1] around the mean slope 1/2.
    flat = {0.0: [True] * 40, 1.0: [True] * 40}
    rising = {0.0: [False] * 40, 1.0: [True] * 40}
    res = dose_response.dose_slope([flat, rising], n_boot=4000, seed=3)
    assert res["slope"] == pytest.approx(0.5)
    assert res["slope_ci"] == pytest.approx([0.0, 1.0])
    assert [p["slope"] for p in res["per_seed"]] == pytest.approx([0.0, 1.0])
