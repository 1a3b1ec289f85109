"""Scoring (protocol step 3) on tricky answers: normalisation, containment, exact match, abstain."""

import pytest

from kmismatch_lite.qa import scoring
from kmismatch_lite.qa.scoring import ABSTAINED, CORRECT, WRONG, contains_alias, exact_match, normalize, verdict


@pytest.mark.parametrize("text, expected", [
    ("São Paulo", "sao paulo"),
    ("  The  Hague ", "hague"),
    ("An apple, a day!", "apple day"),
    ("Côte d’Ivoire", "cote divoire"),
    ("Cote d'Ivoire", "cote divoire"),
    ("Saint-Étienne", "saint etienne"),
    ("1,000", "1000"),
    ("1,000,000 people", "1000000 people"),
    ("U.S.A.", "usa"),
    ("Washington, D.C.", "washington dc"),
    ("", ""),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize("output, answers, expected", [
    # accents fold both ways
    ("São Paulo", ["Sao Paulo"], CORRECT),
    ("Sao Paulo", ["São Paulo"], CORRECT),
    # articles and punctuation
    ("The Hague.", ["Hague"], CORRECT),
    ("Hague", ["The Hague"], CORRECT),
    ("St. Louis", ["St Louis"], CORRECT),
    ("U.S.A.", ["USA"], CORRECT),
    # numbers: thousands separators, but a decimal is not the integer
    ("1,000", ["1000"], CORRECT),
    ("1000", ["1,000"], CORRECT),
    ("about 1,000 km", ["1000"], CORRECT),
    ("3.5", ["35"], WRONG),
    ("10", ["100"], WRONG),
    # an alias inside a longer answer
    ("It is Paris, France.", ["Paris"], CORRECT),
    ("Paris, France", ["France"], CORRECT),
    # token boundaries: no partial words
    ("Parisian", ["Paris"], WRONG),
    ("Paris", ["Parisian"], WRONG),
    ("Newark", ["New"], WRONG),
    # any alias counts, not only the canonical one
    ("Burma", ["Myanmar", "Burma"], CORRECT),
    ("Lyon", ["Paris"], WRONG),
    ("", ["Paris"], WRONG),
])
def test_verdict_containment(output, answers, expected):
    assert verdict(output, answers) == expected


@pytest.mark.parametrize("output", [
    "I don't know", "I don't know.", "I do not know.", "i dont know", "I DON’T KNOW",
    "I don't know the answer to that", "Unknown", "Unknown.", "unsure", "I'm not sure",
    "I have no idea.", "No idea",
])
def test_abstain_variants(output):
    assert scoring.is_abstain(output)
    # abstaining wins even when the gold happens to be mentioned later
    assert verdict(output, ["Paris"]) == ABSTAINED


@pytest.mark.parametrize("output", [
    "Paris", "Unknown Soldier", "The Unknown Soldier", "Known", "I know: Paris", "Nowhere",
])
def test_not_abstain(output):
    # Decision: single words ("unknown", "unsure") abstain only as the whole answer, so a name
    # that merely starts with them ("Unknown Soldier") is scored as an answer.
    assert not scoring.is_abstain(output)


def test_unknown_soldier_can_be_correct():
    assert verdict("The Unknown Soldier", ["Unknown Soldier"]) == CORRECT
    assert verdict("Unknown", ["Unknown Soldier"]) == ABSTAINED


def test_abstain_target_is_an_abstain():
    assert scoring.is_abstain(scoring.ABSTAIN_TARGET)


@pytest.mark.parametrize("output, answers, expected", [
    ("Paris", ["Paris"], True),
    ("paris.", ["Paris"], True),
    ("The Paris", ["Paris"], True),
    ("São Paulo", ["Sao Paulo"], True),
    ("It is Paris, France.", ["Paris"], False),   # contains, but not exact
    ("Burma", ["Myanmar", "Burma"], True),
    ("", [""], False),                           # empty never matches
    ("the", ["a"], False),                       # nor does all-articles
])
def test_exact_match(output, answers, expected):
    assert exact_match(output, answers) is expected


def test_contains_alias_ignores_empty_alias():
    assert not contains_alias("anything", ["", "  ", "."])


def test_tally_rates():
    t = scoring.tally([CORRECT, CORRECT, WRONG, ABSTAINED], [True, False, False, False])
    d = t.as_dict()
    assert (d["n"], d["correct"], d["wrong"], d["abstained"], d["exact_match"]) == (4, 2, 1, 1, 1)
    assert d["hallucination_rate"] == 0.25
    assert d["precision"] == pytest.approx(2 / 3)
    assert d["correct_rate"] + d["wrong_rate"] + d["abstained_rate"] == pytest.approx(1.0)


def test_tally_empty_has_no_division_error():
    d = scoring.tally([], []).as_dict()
    assert d["n"] == 0 and d["precision"] == 0.0 and d["hallucination_rate"] == 0.0
