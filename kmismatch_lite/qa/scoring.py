"""Scoring (protocol step 3): normalise, then abstained / correct / wrong, plus exact match."""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

CORRECT, WRONG, ABSTAINED = "correct", "wrong", "abstained"
VERDICTS = (CORRECT, WRONG, ABSTAINED)

ABSTAIN_TARGET = "I don't know"

# Normalised forms: an answer abstains when it starts with one of these ("I don't know, sorry").
ABSTAIN_PHRASES = (
    "i dont know",
    "i do not know",
    "dont know",
    "i dont have",
    "i do not have",
    "i am not sure",
    "im not sure",
    "not sure",
    "i have no idea",
    "no idea",
    "i cannot answer",
    "i cant answer",
    "i cannot say",
    "i cant say",
    "i am unsure",
    "no answer",
)
# Single words that abstain only as the whole answer: "Unknown" abstains, but "Unknown Soldier"
# or "Unsure River" is a real (possibly correct) answer.
ABSTAIN_WORDS = ("unknown", "unsure")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation if c not in "'"})
_SPACES = re.compile(r"\s+")
_ACRONYM = re.compile(r"(?<![\w.])(?:[a-z]\.){2,}(?![\w])")


def normalize(text: str) -> str:
    """Fold to ASCII, lower-case, drop punctuation and articles, squeeze spaces."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = text.lower().replace("'", "")
    # Dotted acronyms: "U.S.A." is "usa" (else the article rule would eat its "a").
    text = _ACRONYM.sub(lambda m: m.group(0).replace(".", ""), text)
    # Thousands separators: "1,000" and "1000" are the same number.
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = text.translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def is_abstain(output: str) -> bool:
    """True if the answer is an "I don't know" or a close variant."""
    norm = normalize(output)
    return norm in ABSTAIN_WORDS or any(norm == p or norm.startswith(p + " ") for p in ABSTAIN_PHRASES)


def contains_alias(output: str, answers: Iterable[str]) -> bool:
    """True if a normalised gold alias occurs in the normalised output on token boundaries."""
    norm = f" {normalize(output)} "
    for alias in answers:
        a = normalize(alias)
        if a and f" {a} " in norm:
            return True
    return False


def exact_match(output: str, answers: Iterable[str]) -> bool:
    """True if the normalised output equals a normalised gold alias (as lm-eval's triviaqa)."""
    norm = normalize(output)
    return bool(norm) and any(norm == normalize(a) for a in answers)


def verdict(output: str, answers: Sequence[str]) -> str:
    """The protocol's verdict: abstained, else correct by containment, else wrong."""
    if is_abstain(output):
        return ABSTAINED
    if contains_alias(output, answers):
        return CORRECT
    return WRONG


@dataclass(frozen=True)
class Tally:
    """Counts and rates of one condition's verdicts."""

    n: int
    correct: int
    wrong: int
    abstained: int
    exact_match: int

    @property
    def hallucination_rate(self) -> float:
        return self.wrong / self.n if self.n else 0.0

    @property
    def precision(self) -> float:
        answered = self.correct + self.wrong
        return self.correct / answered if answered else 0.0

    def as_dict(self) -> dict:
        n = self.n or 1
        return {
            "n": self.n,
            "correct": self.correct,
            "wrong": self.wrong,
            "abstained": self.abstained,
            "correct_rate": self.correct / n,
            "wrong_rate": self.wrong / n,
            "abstained_rate": self.abstained / n,
            "hallucination_rate": self.hallucination_rate,
            "precision": self.precision,
            "exact_match": self.exact_match,
            "exact_match_rate": self.exact_match / n,
        }


def tally(verdicts: Sequence[str], exact: Sequence[bool]) -> Tally:
    return Tally(
        n=len(verdicts),
        correct=sum(v == CORRECT for v in verdicts),
        wrong=sum(v == WRONG for v in verdicts),
        abstained=sum(v == ABSTAINED for v in verdicts),
        exact_match=sum(bool(e) for e in exact),
    )


def tally_of(metrics: dict) -> dict:
    """The counts and rates of an evaluation's metrics.json (no timings or file names)."""
    return {k: v for k, v in metrics.items()
            if k in Tally.__dataclass_fields__ or k.endswith("_rate") or k == "precision"}
