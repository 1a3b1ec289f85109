"""The hypothesis test against cases worked out by hand."""

import pytest

from kmismatch_lite import stats


@pytest.mark.parametrize(
    "b, c, expected",
    [
        (0, 0, 1.0),
        (0, 6, 2 / 64),  # both tails of Binomial(6, 1/2) at the extremes
        (6, 0, 2 / 64),
        (1, 5, 2 * (1 + 6) / 64),
        (3, 3, 1.0),  # symmetric: the two-sided p-value is capped at 1
        (2, 10, 2 * (1 + 12 + 66) / 4096),
        (10, 2, 2 * (1 + 12 + 66) / 4096),
    ],
)
def test_mcnemar_exact_by_hand(b, c, expected):
    assert stats.mcnemar_exact(b, c) == pytest.approx(expected)


def test_paired_test_counts_discordant_pairs():
    # teacher wrong on questions 0-5, self wrong on 4-6: teacher-only 4, self-only 1
    teacher = [True] * 6 + [False] * 4
    self_ = [False] * 4 + [True] * 3 + [False] * 3
    t = stats.paired_wrong_test(teacher, self_, n_boot=500, seed=1)
    assert (t.n, t.wrong_a, t.wrong_b, t.a_only, t.b_only) == (10, 6, 3, 4, 1)
    assert t.diff_rate == pytest.approx(0.3)
    assert t.p_value == pytest.approx(2 * (1 + 5) / 32)
    assert t.ci_low <= t.diff_rate <= t.ci_high


def test_bootstrap_interval_contains_observed_difference():
    import random

    rng = random.Random(0)
    x = [rng.random() < 0.4 for _ in range(300)]
    y = [rng.random() < 0.3 for _ in range(300)]
    lo, hi = stats.bootstrap_diff(x, y, n_boot=2000, seed=0)
    observed = sum(x) / 300 - sum(y) / 300
    assert lo < observed < hi
    assert hi - lo < 0.2  # about 4 standard errors of a difference of two rates at n=300


def test_bootstrap_identical_samples_give_zero_width():
    x = [True, False, True, True]
    assert stats.bootstrap_diff(x, x, n_boot=200) == (0.0, 0.0)


def test_bootstrap_is_deterministic_per_seed():
    x, y = [True, False] * 20, [False, True, True, False] * 10
    assert stats.bootstrap_diff(x, y, seed=3) == stats.bootstrap_diff(x, y, seed=3)


def test_unpaired_input_is_an_error():
    with pytest.raises(ValueError):
        stats.paired_wrong_test([True], [True, False])

