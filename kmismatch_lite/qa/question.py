"""One question with its gold answers: the unit every data set, prompt and score works on."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Question:
    """One question: gold aliases in `answers`, the first one canonical."""

    id: str
    question: str
    answers: list[str]
    relation: str | None = None
    subject: str | None = None
    popularity: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}
