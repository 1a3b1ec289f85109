"""The protocol's prompt (step 2): `Question: ...\\nAnswer:`, few-shot for base models,
zero-shot for fine-tuned ones; greedy, stop at the first newline, a small token cap."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from kmismatch_lite.data import Question

STOP = ["\n"]
MAX_TOKENS = 16
N_SHOTS = 3


def zero_shot(question: str) -> str:
    """The zero-shot form: what fine-tuned models are trained and evaluated on."""
    return f"Question: {question}\nAnswer:"


def target_text(target: str) -> str:
    """What follows the zero-shot prompt in a fine-tuning example (the loss covers only this)."""
    return f" {target}\n"


@dataclass(frozen=True)
class PromptTemplate:
    """A fixed few-shot prefix (possibly empty) followed by the zero-shot form of the question."""

    prefix: str = ""

    @property
    def shots(self) -> int:
        return self.prefix.count("Question:")

    def render(self, question: str) -> str:
        return self.prefix + zero_shot(question)

    def describe(self) -> str:
        return self.render("{question}")


def few_shot(exemplars: Sequence[Question], k: int = N_SHOTS, seed: int = 0) -> PromptTemplate:
    """Draw `k` exemplars once, with the seed, and fix them as the prefix."""
    if k <= 0:
        return PromptTemplate()
    pool = sorted(exemplars, key=lambda q: q.id)
    if len(pool) < k:
        k = len(pool)
    chosen = random.Random(seed).sample(pool, k)
    prefix = "".join(zero_shot(q.question) + target_text(q.answers[0]) + "\n" for q in chosen)
    return PromptTemplate(prefix)


def clean_output(text: str, stop: Sequence[str] = tuple(STOP)) -> str:
    """Cut at the first stop string and strip spaces."""
    for s in stop:
        text = text.split(s, 1)[0]
    return text.strip()
