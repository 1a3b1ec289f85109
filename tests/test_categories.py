"""SliCK knowledge categories, their prompts and the per-category breakdown, on hand-made tables."""

import pytest

from kmismatch_lite.designs import categories as cat
from kmismatch_lite.qa import prompts, scoring
from kmismatch_lite.qa.data import Question
from kmismatch_lite.errors import KmmError

C, W, A = scoring.CORRECT, scoring.WRONG, scoring.ABSTAINED


@pytest.mark.parametrize(
    "greedy, sampled, expected",
    [
        ([C, C, C, C], [W, W, W, W], cat.HIGHLY_KNOWN),  # samples do not matter once greedy is sure
        ([C], [], cat.HIGHLY_KNOWN),  # K = 1, M = 0
        ([C, C, C, W], [C, C, C, C], cat.MAYBE_KNOWN),
        ([W, C, A, A], [], cat.MAYBE_KNOWN),
        ([C, W], [W, W], cat.MAYBE_KNOWN),  # a tie: half the greedy answers right
        ([W, W, A, W], [W, C, W, W], cat.WEAKLY_KNOWN),
        ([W], [A, A, A, C], cat.WEAKLY_KNOWN),  # K = 1
        ([W, W, W, W], [W, A, W, A], cat.UNKNOWN),
        ([A, A, A, A], [A, A, A, A], cat.UNKNOWN),  # abstaining is not knowing
        ([W, W], [], cat.UNKNOWN),  # M = 0: P(sampled) undefined, taken as 0
        ([W], [], cat.UNKNOWN),
    ],
)
def test_slick_rules(greedy, sampled, expected):
    assert cat.slick(greedy, sampled) == expected


def test_shares_and_edges():
    assert cat.p_correct([C, W, A, C]) == 0.5
    assert cat.p_correct([]) is None
    with pytest.raises(ValueError, match="at least one greedy"):
        cat.slick([], [C])


def test_cheap_mode():
    assert [cat.cheap(v) for v in (C, W, A)] == [cat.KNOWN, cat.UNKNOWN, cat.UNKNOWN]


def test_categorize_a_table():
    greedy = {"a": [C, C], "b": [C, W], "c": [W, W], "d": [W, A]}
    sampled = {"a": [W], "b": [W], "c": [W, C]}  # "d" has no samples
    assert cat.categorize(greedy, sampled) == {"a": cat.HIGHLY_KNOWN, "b": cat.MAYBE_KNOWN,
                                               "c": cat.WEAKLY_KNOWN, "d": cat.UNKNOWN}
    assert cat.categorize({"c": [W]}) == {"c": cat.UNKNOWN}


def pool(n):
    return [Question(f"e{i}", f"Capital of {i}?", [f"City {i}"]) for i in range(n)]


def exemplar_set(t):
    return frozenset(line for line in t.prefix.splitlines() if line.startswith("Question:"))


def test_slick_templates_differ_and_start_with_the_run_prompt():
    ts = cat.slick_templates(pool(16), k_prompts=4, shots=3, seed=5)
    assert len(ts) == 4
    assert ts[0] == prompts.few_shot(pool(16), k=3, seed=5)
    assert all(t.shots == 3 for t in ts)
    assert len({exemplar_set(t) for t in ts}) == 4
    assert ts == cat.slick_templates(pool(16), k_prompts=4, shots=3, seed=5)
    assert ts[1:] != cat.slick_templates(pool(16), k_prompts=4, shots=3, seed=6)[1:]


def test_slick_templates_use_every_exemplar_set_when_the_pool_just_suffices():
    ts = cat.slick_templates(pool(4), k_prompts=4, shots=3)  # C(4, 3) = 4 sets
    assert len({exemplar_set(t) for t in ts}) == 4
    assert cat.slick_templates(pool(2), k_prompts=1, shots=3)[0].shots == 2  # as few_shot: all there is
    with pytest.raises(KmmError, match="cannot make 5 prompts"):
        cat.slick_templates(pool(4), k_prompts=5, shots=3)
    with pytest.raises(KmmError, match="cannot make 2 prompts"):
        cat.slick_templates(pool(4), k_prompts=2, shots=0)
    twins = [Question(f"e{i}", "Capital of France?", ["Paris"]) for i in range(5)]
    with pytest.raises(KmmError, match="only 1 different exemplar sets for 2"):
        cat.slick_templates(twins, k_prompts=2, shots=3)


def sample(qid, verdict, output="x"):
    return {"id": qid, "answers": ["Paris"], "output": output, "verdict": verdict}


def test_breakdown_per_category():
    cats = {"a": cat.HIGHLY_KNOWN, "b": cat.HIGHLY_KNOWN, "c": cat.UNKNOWN, "d": cat.UNKNOWN,
            "e": cat.UNKNOWN, "f": cat.WEAKLY_KNOWN}
    samples = [sample("a", C, "Paris"), sample("b", A), sample("c", W), sample("d", W),
               sample("e", C, "It is Paris"), sample("f", W)]
    out = cat.breakdown(samples, cats)
    assert list(out) == [cat.HIGHLY_KNOWN, cat.WEAKLY_KNOWN, cat.UNKNOWN]  # absent ones left out
    hk, wk, un = out[cat.HIGHLY_KNOWN], out[cat.WEAKLY_KNOWN], out[cat.UNKNOWN]
    assert (hk["n"], hk["correct"], hk["wrong"], hk["abstained"], hk["exact_match"]) == (2, 1, 0, 1, 1)
    assert (un["n"], un["correct"], un["wrong"], un["exact_match"]) == (3, 1, 2, 0)
    assert un["wrong_rate"] == pytest.approx(2 / 3)
    assert (un["share_of_wrong"], wk["share_of_wrong"], hk["share_of_wrong"]) == pytest.approx((2 / 3, 1 / 3, 0))


def test_breakdown_errors():
    with pytest.raises(ValueError, match="'z' has no knowledge category"):
        cat.breakdown([sample("z", C)], {"a": cat.KNOWN})
    with pytest.raises(ValueError, match="'Famous' is not a knowledge category"):
        cat.breakdown([sample("a", C)], {"a": "Famous"})
    assert cat.breakdown([sample("a", W)], {"a": cat.KNOWN})[cat.KNOWN]["share_of_wrong"] == 1.0


def test_tables_from_runs():
    runs = [[sample("a", C), sample("b", W)], [sample("b", C), sample("a", C)], [sample("a", A), sample("b", W)]]
    table = cat.verdicts_by_question(runs)
    assert table == {"a": [C, C, A], "b": [W, C, W]}
    assert cat.categorize(table, cat.verdicts_by_question([])) == {"a": cat.MAYBE_KNOWN, "b": cat.MAYBE_KNOWN}
    assert cat.categorize_cheap(runs[0]) == {"a": cat.KNOWN, "b": cat.UNKNOWN}
    with pytest.raises(ValueError, match="same questions"):
        cat.verdicts_by_question([[sample("a", C), sample("b", W)], [sample("a", C)]])
    with pytest.raises(ValueError, match="same questions"):
        cat.verdicts_by_question([[sample("a", C)], [sample("b", C)]])
