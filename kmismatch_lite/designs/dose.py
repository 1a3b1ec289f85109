"""The mismatch dose (protocol step 9): fine-tuning sets that differ only in how much of the
mismatch pool (facts the teacher knew and the student did not) they answer.

Every dose keeps every training question, in the same order; the student-known questions get
their gold target at every dose; a nested, seeded fraction of the mismatch pool gets its gold
target and everything else the abstain target. Dose 0 is the self set of protocol step 4.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from kmismatch_lite.qa import scoring
from kmismatch_lite.qa.data import Question
from kmismatch_lite.errors import KmmError

DOSES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Pools:
    """Indices into the training questions: known to the student, the mismatch pool (teacher
    correct, student not), and the rest (neither student nor teacher correct)."""

    known: tuple[int, ...]
    mismatch: tuple[int, ...]
    rest: tuple[int, ...]


@dataclass(frozen=True)
class DoseSet:
    """One dose's fine-tuning rows (`id`, `question`, `target`) and what they hold."""

    dose: float
    rows: list[dict]
    stats: dict

    @property
    def name(self) -> str:
        return dose_name(self.dose)


def dose_name(dose: float) -> str:
    """The condition name of a dose, e.g. `dose-0.25`."""
    return f"dose-{dose:g}"


def split_pools(train: Sequence[Question], teacher: Sequence[dict], student: Sequence[dict]) -> Pools:
    """Split the training questions by the generators' verdicts (rows aligned with `train`)."""
    if not len(train) == len(teacher) == len(student):
        raise KmmError(f"dose sets need one teacher and one student answer per training question "
                       f"({len(train)} questions, {len(teacher)} teacher, {len(student)} student answers)")
    pools: dict[str, list[int]] = {"known": [], "mismatch": [], "rest": []}
    for i, (q, t, s) in enumerate(zip(train, teacher, student)):
        for row in (t, s):
            if row.get("id", q.id) != q.id:
                raise KmmError(f"answer for '{row['id']}' is out of line with training question '{q.id}'")
        if s["verdict"] == scoring.CORRECT:
            pools["known"].append(i)
        elif t["verdict"] == scoring.CORRECT:
            pools["mismatch"].append(i)
        else:
            pools["rest"].append(i)
    return Pools(*(tuple(pools[k]) for k in ("known", "mismatch", "rest")))


def mismatch_order(pool: Sequence[int], seed: int) -> list[int]:
    """The pool in a seeded random order; dose d answers its first `n_answered(d, len)` items,
    so a lower dose's answered questions are always a subset of a higher one's."""
    order = list(pool)
    # A stream of its own, so the order is not tied to other uses of the same seed.
    random.Random(f"mismatch-dose:{seed}").shuffle(order)
    return order


def n_answered(dose: float, pool_size: int) -> int:
    """round(dose * pool_size), halves rounded up (monotone in the dose, which keeps nesting)."""
    return math.floor(dose * pool_size + 0.5)


def check_doses(doses: Sequence[float]) -> list[float]:
    """The doses as floats; a dose outside [0, 1] or given twice is an error."""
    out = [float(d) for d in doses]
    bad = [d for d in out if not 0.0 <= d <= 1.0]
    if bad:
        raise KmmError(f"dose {bad[0]:g} is outside [0, 1]")
    if len(set(out)) != len(out):
        raise KmmError(f"doses {', '.join(f'{d:g}' for d in out)} name one dose twice")
    if not out:
        raise KmmError("no dose given")
    return out


def dose_sets(train: Sequence[Question], teacher: Sequence[dict], student: Sequence[dict],
              doses: Sequence[float] = DOSES, seed: int = 0) -> list[DoseSet]:
    """One `DoseSet` per dose, from the generation stage's answers (the inputs of run.build_sets)."""
    pools = split_pools(train, teacher, student)
    order = mismatch_order(pools.mismatch, seed)
    sets = []
    for dose in check_doses(doses):
        k = n_answered(dose, len(order))
        gold = set(pools.known) | set(order[:k])
        rows = [{"id": q.id, "question": q.question,
                 "target": q.answers[0] if i in gold else scoring.ABSTAIN_TARGET}
                for i, q in enumerate(train)]
        stats = {
            "dose": dose,
            "n": len(rows),
            "answered": len(gold),
            "known_answered": len(pools.known),
            "mismatch_answered": k,
            "mismatch_pool": len(pools.mismatch),
            "rest": len(pools.rest),
            # As run.build_sets' mismatch_rate: the share of answered targets the student got wrong.
            "mismatch_rate": k / len(gold) if gold else 0.0,
        }
        sets.append(DoseSet(dose, rows, stats))
    return sets
