"""Knowledge categories (protocol step 10; SliCK, Gekhman et al. 2024): how well the base
student knew each question, from its greedy answers under K few-shot prompts and M answers
sampled at temperature 0.5, and every condition's verdicts broken down by those categories.
"""

from __future__ import annotations

import random
from math import comb
from typing import Mapping, Sequence

from kmismatch_lite.qa import prompts, scoring
from kmismatch_lite.qa.data import Question
from kmismatch_lite.errors import KmmError
from kmismatch_lite.qa.sampling import Sampling, derive_seed

HIGHLY_KNOWN, MAYBE_KNOWN, WEAKLY_KNOWN, UNKNOWN = "HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"
KNOWN = "Known"  # the cheap mode's only other category
SLICK = (HIGHLY_KNOWN, MAYBE_KNOWN, WEAKLY_KNOWN, UNKNOWN)
CHEAP = (KNOWN, UNKNOWN)
CATEGORIES = (HIGHLY_KNOWN, MAYBE_KNOWN, WEAKLY_KNOWN, KNOWN, UNKNOWN)

K_PROMPTS = 4
M_SAMPLES = 4
TEMPERATURE = 0.5


def p_correct(verdicts: Sequence[str]) -> float | None:
    """The share of verdicts that are correct (abstained counts as not correct); None if empty."""
    if not verdicts:
        return None
    return sum(v == scoring.CORRECT for v in verdicts) / len(verdicts)


def slick(greedy: Sequence[str], sampled: Sequence[str]) -> str:
    """The SliCK category from the verdicts of the K greedy and the M sampled answers.

    HighlyKnown: every greedy answer correct; MaybeKnown: some; WeaklyKnown: none, but some
    sample correct; Unknown: none of either. With no samples (M = 0) P(sampled) is undefined
    and taken as 0: a question no greedy answer got right is Unknown, WeaklyKnown never occurs.
    """
    pg = p_correct(greedy)
    if pg is None:
        raise ValueError("SliCK needs at least one greedy answer per question")
    if pg == 1.0:
        return HIGHLY_KNOWN
    if pg > 0.0:
        return MAYBE_KNOWN
    return WEAKLY_KNOWN if (p_correct(sampled) or 0.0) > 0.0 else UNKNOWN


def sample_settings(seed: int, j: int) -> Sampling:
    """The sampling of SliCK's j-th sampled run (j = 1..M) in the cell of `seed`: temperature
    TEMPERATURE with a sampling seed of its own, derived from the cell's seed and j."""
    return Sampling(TEMPERATURE, derive_seed(f"slick-sample:{seed}:{j}"))


def sampling_record(m_samples: int, seeds: Sequence[int]) -> dict:
    """What a run's manifest records of SliCK's sampled runs: the stages, temperature,
    truncation and, per cell seed, each run's sampling seed."""
    first = sample_settings(seeds[0], 1).describe()
    return {"stages": [f"slick/sample-{j}" for j in range(1, m_samples + 1)],
            **{k: v for k, v in first.items() if k != "seed"},
            "seeds": {str(s): [sample_settings(s, j).seed for j in range(1, m_samples + 1)] for s in seeds}}


def cheap(greedy_verdict: str) -> str:
    """The cheap mode: Known if the one greedy few-shot answer is correct, else Unknown."""
    return KNOWN if greedy_verdict == scoring.CORRECT else UNKNOWN


def categorize(greedy: Mapping[str, Sequence[str]], sampled: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """Question id -> SliCK category, from id -> greedy verdicts and id -> sampled verdicts
    (a question missing from `sampled`, or `sampled` None, has no samples)."""
    sampled = sampled or {}
    return {qid: slick(g, sampled.get(qid, ())) for qid, g in greedy.items()}


def verdicts_by_question(runs: Sequence[Sequence[dict]]) -> dict[str, list[str]]:
    """Question id -> its verdicts, one per run (a run: check.score rows for one prompt or one
    sampling seed, over the same questions)."""
    table: dict[str, list[str]] = {}
    for run in runs:
        if table and sorted(r["id"] for r in run) != sorted(table):
            raise ValueError("every run must answer the same questions")
        for row in run:
            table.setdefault(row["id"], []).append(row["verdict"])
    return table


def categorize_cheap(samples: Sequence[dict]) -> dict[str, str]:
    """Question id -> Known / Unknown from one greedy few-shot run (e.g. the base student's)."""
    return {row["id"]: cheap(row["verdict"]) for row in samples}


def slick_templates(exemplars: Sequence[Question], k_prompts: int = K_PROMPTS, shots: int = prompts.N_SHOTS,
                    seed: int = 0) -> list[prompts.PromptTemplate]:
    """K few-shot templates whose exemplar sets all differ. The first is the run's own prompt
    (`prompts.few_shot` with the seed), so its greedy answers are the base student's."""
    if k_prompts < 1:
        raise KmmError("SliCK needs at least one prompt")
    if k_prompts > 1 and (shots < 1 or comb(len(exemplars), shots) < k_prompts):
        raise KmmError(f"{len(exemplars)} exemplars cannot make {k_prompts} prompts of {shots} "
                       f"different exemplars each")
    templates = [prompts.few_shot(exemplars, k=shots, seed=seed)]
    seen = {_exemplar_set(templates[0])}
    # Seeds for the other prompts come from a stream of their own, derived from the run's seed.
    rng = random.Random(f"slick-prompts:{seed}")
    for _ in range(1000 * k_prompts):
        if len(templates) == k_prompts:
            return templates
        t = prompts.few_shot(exemplars, k=shots, seed=rng.getrandbits(32))
        if _exemplar_set(t) not in seen:
            seen.add(_exemplar_set(t))
            templates.append(t)
    # Only exemplars repeating one another's text get here.
    raise KmmError(f"found only {len(templates)} different exemplar sets for {k_prompts} prompts")


def _exemplar_set(template: prompts.PromptTemplate) -> frozenset[str]:
    # Each exemplar is one "Question: ...\nAnswer: ...\n\n" block of the prefix.
    return frozenset(b for b in template.prefix.split("\n\n") if b)


def breakdown(samples: Sequence[dict], categories: Mapping[str, str]) -> dict[str, dict]:
    """Per category (in CATEGORIES order, only those present): the tally of one condition's
    verdicts on the questions of that category, with the category's share of all wrong answers.
    `samples` are rows of check.score (id, answers, output, verdict)."""
    missing = [s["id"] for s in samples if s["id"] not in categories]
    if missing:
        raise ValueError(f"question '{missing[0]}' has no knowledge category")
    strange = set(categories.values()) - set(CATEGORIES)
    if strange:
        raise ValueError(f"'{sorted(strange)[0]}' is not a knowledge category")
    total_wrong = sum(s["verdict"] == scoring.WRONG for s in samples)
    out = {}
    for cat in CATEGORIES:
        rows = [s for s in samples if categories[s["id"]] == cat]
        if not rows:
            continue
        t = scoring.tally([s["verdict"] for s in rows],
                          [scoring.exact_match(s["output"], s["answers"]) for s in rows])
        out[cat] = {**t.as_dict(), "share_of_wrong": t.wrong / total_wrong if total_wrong else 0.0}
    return out
