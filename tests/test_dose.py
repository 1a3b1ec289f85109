"""The mismatch dose sets and the dose-response slope, on hand-made answer tables."""

import numpy as np
import pytest

from kmismatch_lite.designs import dose, dose_response
from kmismatch_lite.qa import scoring
from kmismatch_lite.qa.data import Question
from kmismatch_lite.errors import KmmError
from kmismatch_lite.designs.paper import build_sets

C, W, A = scoring.CORRECT, scoring.WRONG, scoring.ABSTAINED


def table(pairs):
    """Training questions and aligned teacher / student rows from (teacher, student) verdicts."""
    train = [Question(f"q{i}", f"Where is {i}?", [f"Place {i}", f"alias {i}"]) for i in range(len(pairs))]
    teacher = [{"id": q.id, "verdict": t} for q, (t, _) in zip(train, pairs)]
    student = [{"id": q.id, "verdict": s} for q, (_, s) in zip(train, pairs)]
    return train, teacher, student


# 3 known (one the teacher got wrong), 8 in the mismatch pool, 4 rest
PAIRS = [(C, C), (W, C), (A, C)] + [(C, W), (C, A)] * 4 + [(W, W), (A, A), (W, A), (A, W)]


def answered_ids(ds):
    return {r["id"] for r in ds.rows if r["target"] != scoring.ABSTAIN_TARGET}


def test_pools_split_by_verdicts():
    pools = dose.split_pools(*table(PAIRS))
    assert pools.known == (0, 1, 2)
    assert pools.mismatch == tuple(range(3, 11))
    assert pools.rest == (11, 12, 13, 14)


def test_dose_zero_is_the_self_set():
    train, teacher, student = table(PAIRS)
    self_set, _, _ = build_sets(train, teacher, student)
    assert dose.dose_sets(train, teacher, student, doses=[0.0], seed=3)[0].rows == self_set


def test_every_dose_has_the_same_questions_in_the_same_order():
    train, teacher, student = table(PAIRS)
    sets = dose.dose_sets(train, teacher, student)
    assert [s.dose for s in sets] == list(dose.DOSES)
    for s in sets:
        assert [(r["id"], r["question"]) for r in s.rows] == [(q.id, q.question) for q in train]


def test_doses_are_nested_and_answer_gold_targets():
    train, teacher, student = table(PAIRS)
    sets = dose.dose_sets(train, teacher, student, seed=7)
    for lower, higher in zip(sets, sets[1:]):
        assert answered_ids(lower) < answered_ids(higher)
    gold = {q.id: q.answers[0] for q in train}
    for s in sets:
        assert all(r["target"] == gold[r["id"]] for r in s.rows if r["target"] != scoring.ABSTAIN_TARGET)
        assert {"q0", "q1", "q2"} <= answered_ids(s)  # student-known: gold at every dose
        assert not answered_ids(s) & {"q11", "q12", "q13", "q14"}  # rest: never answered


def test_counts_per_dose():
    train, teacher, student = table(PAIRS)
    stats = [s.stats for s in dose.dose_sets(train, teacher, student)]
    assert [s["mismatch_answered"] for s in stats] == [0, 2, 4, 6, 8]
    assert [s["answered"] for s in stats] == [3, 5, 7, 9, 11]
    assert all(s["n"] == 15 and s["mismatch_pool"] == 8 and s["rest"] == 4 for s in stats)
    assert stats[-1]["mismatch_rate"] == pytest.approx(8 / 11)
    assert stats[0]["mismatch_rate"] == 0.0


def test_rounding_is_monotone_with_halves_up():
    # a pool of 2: doses 0.25 and 0.75 fall on halves
    assert [dose.n_answered(d, 2) for d in dose.DOSES] == [0, 1, 1, 2, 2]
    assert [dose.n_answered(d, 7) for d in dose.DOSES] == [0, 2, 4, 5, 7]


def test_same_seed_same_sets_other_seed_other_order():
    train, teacher, student = table(PAIRS)
    a = dose.dose_sets(train, teacher, student, seed=1)
    b = dose.dose_sets(train, teacher, student, seed=1)
    assert [s.rows for s in a] == [s.rows for s in b]
    pool = dose.split_pools(train, teacher, student).mismatch
    orders = {tuple(dose.mismatch_order(pool, s)) for s in range(6)}
    assert len(orders) > 1
    assert all(sorted(o) == list(pool) for o in orders)


def test_empty_mismatch_pool_gives_the_self_set_at_every_dose():
    train, teacher, student = table([(C, C), (W, C), (W, W), (A, A)])
    self_set, _, _ = build_sets(train, teacher, student)
    sets = dose.dose_sets(train, teacher, student)
    assert all(s.rows == self_set and s.stats["mismatch_answered"] == 0 for s in sets)


def test_names_and_bad_input():
    assert [dose.dose_name(d) for d in dose.DOSES] == ["dose-0", "dose-0.25", "dose-0.5", "dose-0.75", "dose-1"]
    train, teacher, student = table(PAIRS)
    with pytest.raises(KmmError, match="outside"):
        dose.dose_sets(train, teacher, student, doses=[0, 1.5])
    with pytest.raises(KmmError, match="twice"):
        dose.dose_sets(train, teacher, student, doses=[0.5, 0.5])
    with pytest.raises(KmmError, match="one teacher and one student answer"):
        dose.dose_sets(train, teacher[:-1], student)
    with pytest.raises(KmmError, match="out of line"):
        dose.dose_sets(train, teacher[::-1], student)


# --- the slope of the wrong-answer rate per unit dose ---

def exact_rates(intercept, slope, n=100, doses=dose.DOSES):
    """Flags whose rate at dose d is exactly intercept + slope * d (n questions)."""
    return {d: [i < round((intercept + slope * d) * n) for i in range(n)] for d in doses}


def test_slope_of_exactly_linear_rates():
    res = dose_response.dose_slope([exact_rates(0.1, 0.2), exact_rates(0.3, 0.2)], n_boot=300)
    assert res["slope"] == pytest.approx(0.2)
    assert [p["intercept"] for p in res["per_seed"]] == pytest.approx([0.1, 0.3])
    assert res["rates"] == pytest.approx([0.2 + 0.2 * d for d in dose.DOSES])
    lo, hi = res["slope_ci"]
    assert lo <= 0.2 <= hi
    assert all(lo <= r <= hi for r, (lo, hi) in zip(res["rates"], res["rates_ci"]))


def test_bootstrap_agrees_with_linregress_when_resampling_changes_nothing():
    # every question the same at each dose: resampled rates equal the observed ones
    flags = {0.0: [False] * 20, 0.5: [False] * 20, 1.0: [True] * 20}
    res = dose_response.dose_slope([flags], n_boot=50)
    assert res["slope"] == pytest.approx(1.0)
    assert res["slope_ci"] == pytest.approx([1.0, 1.0])


def test_slope_recovered_from_noisy_seeds():
    rng = np.random.default_rng(0)
    seeds = [{d: rng.random(1500) < 0.15 + 0.04 * s + 0.12 * d for d in dose.DOSES} for s in range(4)]
    res = dose_response.dose_slope(seeds, n_boot=1000, seed=2)
    lo, hi = res["slope_ci"]
    assert lo < 0.12 < hi
    assert abs(res["slope"] - 0.12) < 0.03
    assert hi - lo < 0.1


def test_seed_spread_widens_the_interval():
    same = [exact_rates(0.2, 0.2, n=200) for _ in range(4)]
    spread = [exact_rates(0.2, s, n=200) for s in (0.0, 0.1, 0.3, 0.4)]
    width = [np.diff(dose_response.dose_slope(x, n_boot=1000)["slope_ci"])[0] for x in (same, spread)]
    assert dose_response.dose_slope(spread, n_boot=100)["slope"] == pytest.approx(0.2)
    assert width[1] > 2 * width[0]


def test_slope_input_errors():
    with pytest.raises(ValueError, match="two doses"):
        dose_response.dose_slope([{0.0: [True]}])
    with pytest.raises(ValueError, match="same doses"):
        dose_response.dose_slope([exact_rates(0.1, 0.1), exact_rates(0.1, 0.1, doses=(0.0, 1.0))])
    with pytest.raises(ValueError, match="same, non-empty"):
        dose_response.dose_slope([{0.0: [True], 1.0: [True, False]}])


def test_by_verdict_splits_the_three_rates():
    verdicts = {0.0: [C, C, A, A], 0.5: [C, W, A, A], 1.0: [C, W, W, A]}
    rows = {d: [{"id": f"t{i}", "verdict": v} for i, v in enumerate(vs)] for d, vs in verdicts.items()}
    res = dose_response.by_verdict([rows], n_boot=50)
    # rates: correct 1/2, 1/4, 1/4; wrong 0, 1/4, 1/2; abstained 1/2, 1/2, 1/4
    assert res[C]["slope"] == pytest.approx(-0.25)
    assert res[W]["slope"] == pytest.approx(0.5)
    assert res[A]["slope"] == pytest.approx(-0.25)
    assert res[W]["rates"] == pytest.approx([0.0, 0.25, 0.5])
    rows[1.0] = rows[1.0][::-1]
    with pytest.raises(ValueError, match="seed 0: the doses were not evaluated on the same questions"):
        dose_response.by_verdict([rows])


def test_the_two_sets_and_the_mismatch_rate_every_run_prints():
    # teacher right on q0 q1 q2 q5, the student on q0 q4: the teacher's set answers 4, 3 of them
    # facts the student did not know (q1 q2 q5), so the mismatch rate is 3/4.
    train, teacher, student = table([(C, C), (C, W), (C, A), (W, W), (A, C), (C, W)])
    self_set, teacher_set, stats = build_sets(train, teacher, student)
    gold = {q.id: q.answers[0] for q in train}
    assert [r["target"] for r in teacher_set] == [gold["q0"], gold["q1"], gold["q2"], scoring.ABSTAIN_TARGET,
                                                  scoring.ABSTAIN_TARGET, gold["q5"]]
    assert [r["target"] for r in self_set] == [gold["q0"]] + [scoring.ABSTAIN_TARGET] * 3 + [gold["q4"],
                                                                                            scoring.ABSTAIN_TARGET]
    assert stats == {"n": 6, "teacher_answered": 4, "self_answered": 2, "both_answered": 1, "teacher_only": 3,
                     "self_only": 1, "mismatch_rate": 0.75}
    assert [r["question"] for r in teacher_set] == [q.question for q in train]
