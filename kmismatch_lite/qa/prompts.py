"""The protocol's prompt (step 2): `Question: ...\\nAnswer:`, few-shot for base models,
zero-shot for fine-tuned ones; greedy, stop at the first newline, a small token cap."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from kmismatch_lite.qa.data import Question

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


def draw(exemplars: Sequence[Question], k: int = N_SHOTS, seed: int = 0) -> list[Question]:
    """`k` exemplars (all, if fewer), drawn once with the seed from the set sorted by id."""
    if k <= 0:
        return []
    pool = sorted(exemplars, key=lambda q: q.id)
    return random.Random(seed).sample(pool, min(k, len(pool)))


def few_shot(exemplars: Sequence[Question], k: int = N_SHOTS, seed: int = 0) -> PromptTemplate:
    """Draw `k` exemplars once, with the seed, and fix them as the prefix."""
    chosen = draw(exemplars, k, seed)
    prefix = "".join(zero_shot(q.question) + target_text(q.answers[0]) + "\n" for q in chosen)
    return PromptTemplate(prefix)


@dataclass(frozen=True)
class ChatPromptTemplate:
    """The model's own chat template: each exemplar a user turn (its question) and an assistant
    turn (its answer), then the question as the last user turn. `format` renders the messages as
    the backend renders them (backends/llamacpp.py: chat_formatter)."""

    format: Callable[[list[dict]], str]
    exemplars: tuple[tuple[str, str], ...] = ()

    @property
    def shots(self) -> int:
        return len(self.exemplars)

    def messages(self, question: str) -> list[dict]:
        turns = []
        for q, a in self.exemplars:
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return turns + [{"role": "user", "content": question}]

    def render(self, question: str) -> str:
        return self.format(self.messages(question))

    def describe(self) -> str:
        return self.render("{question}")


def clean_output(text: str, stop: Sequence[str] = tuple(STOP)) -> str:
    """Cut at the first stop string and strip spaces."""
    for s in stop:
        text = text.split(s, 1)[0]
    return text.strip()
