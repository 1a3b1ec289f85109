"""The paper's comparison (protocol steps 1 to 8): teacher and student answer the training
questions, each answer becomes a fine-tuning target (the gold answer where it was right, else the
abstain target), the student is fine-tuned on each set, and the fine-tuned students answer the
test questions beside the two base models. Per cell: the McNemar test and bootstrap interval of
the difference in wrong answers; over seeds: the random-effects pool (stats.py)."""

from __future__ import annotations

import json
from pathlib import Path

from kmismatch_lite import stats
from kmismatch_lite.qa import scoring
from kmismatch_lite.designs.stages import (answer_stage, data_stage, few_shot, finetune_stage, finetuned_adapter,
                                           questions, zero_shot)
from kmismatch_lite.designs.unit import CellContext, StageContext, StageRecord, Unit
from kmismatch_lite.fingerprint import stage_code
from kmismatch_lite.io import write_json, write_jsonl
from kmismatch_lite.qa.question import Question
from kmismatch_lite.qa.scoring import tally_of
from kmismatch_lite.settings import CellSettings

CONDITIONS = ("base_student", "self", "teacher", "base_teacher")
ALPHA = 0.05


def build_sets(train: list[Question], teacher: list[dict], student: list[dict]) -> tuple[list, list, dict]:
    """Protocol step 4: the gold answer where the generator was right, else the abstain target."""
    sets: dict[str, list[dict]] = {"self": [], "teacher": []}
    for q, t, s in zip(train, teacher, student):
        for name, row in (("teacher", t), ("self", s)):
            target = q.answers[0] if row["verdict"] == scoring.CORRECT else scoring.ABSTAIN_TARGET
            sets[name].append({"id": q.id, "question": q.question, "target": target})
    t_ok = [r["verdict"] == scoring.CORRECT for r in teacher]
    s_ok = [r["verdict"] == scoring.CORRECT for r in student]
    mismatch = sum(1 for a, b in zip(t_ok, s_ok) if a and not b)
    stats = {
        "n": len(train),
        "teacher_answered": sum(t_ok),
        "self_answered": sum(s_ok),
        "both_answered": sum(1 for a, b in zip(t_ok, s_ok) if a and b),
        "teacher_only": mismatch,
        "self_only": sum(1 for a, b in zip(t_ok, s_ok) if b and not a),
        "mismatch_rate": mismatch / sum(t_ok) if sum(t_ok) else 0.0,
    }
    return sets["self"], sets["teacher"], stats


def _sets_stage() -> StageRecord:
    """Protocol steps 3-4: the two fine-tuning sets and the mismatch between them."""
    def inputs(ctx: StageContext) -> dict:
        return {"teacher": ctx.key("generate/teacher"), "student": ctx.key("generate/student"),
                "code": stage_code("sets")}

    def work(ctx: StageContext, tmp: Path) -> None:
        self_set, teacher_set, set_stats = build_sets(questions(ctx, "train"),
                                                      ctx.rows("generate/teacher", "samples.jsonl"),
                                                      ctx.rows("generate/student", "samples.jsonl"))
        write_jsonl(tmp / "self.jsonl", self_set)
        write_jsonl(tmp / "teacher.jsonl", teacher_set)
        write_json(tmp / "stats.json", set_stats)

    return StageRecord("sets", (), ("data", "generate/teacher", "generate/student"), inputs, work)


def _named_set(ctx: StageContext, path: Path) -> dict:
    return {"sets": ctx.key("sets"), "set": path.stem}


def stages(s: CellSettings, earlier: list[StageRecord]) -> list[StageRecord]:
    return [
        data_stage(),
        answer_stage("generate/teacher", "teacher", "train", few_shot),
        answer_stage("generate/student", "student", "train", few_shot),
        _sets_stage(),
        finetune_stage("self", "sets", _named_set),
        finetune_stage("teacher", "sets", _named_set),
        # Protocol step 6: the base models few-shot, each fine-tuned student zero-shot.
        answer_stage("evaluate/base_student", "student", "test", few_shot),
        answer_stage("evaluate/self", "student", "test", zero_shot, adapter=finetuned_adapter("finetune/self"),
                     adapter_need="finetune/self"),
        answer_stage("evaluate/teacher", "student", "test", zero_shot,
                     adapter=finetuned_adapter("finetune/teacher"), adapter_need="finetune/teacher"),
        answer_stage("evaluate/base_teacher", "teacher", "test", few_shot),
    ]


def results(recipe: dict, evaluated: dict, set_stats: dict, models: dict) -> dict:
    """Every figure of protocol steps 4 and 6; nothing time-dependent, so reruns compare equal."""
    conditions = {c: tally_of(m) for c, (_, m) in evaluated.items()}
    wrong = {c: [s["verdict"] == scoring.WRONG for s in samples] for c, (samples, _) in evaluated.items()}
    test = stats.paired_wrong_test(wrong["teacher"], wrong["self"], n_boot=recipe["report"]["bootstrap"],
                                   seed=recipe["seed"])
    held = test.wrong_a > test.wrong_b and test.p_value < ALPHA
    return {
        "recipe": recipe["name"],
        "student": models["student"].name,
        "teacher": models["teacher"].name,
        "dataset": recipe["data"]["dataset"],
        "seed": recipe["seed"],
        "n_train": set_stats["n"],
        "n_test": test.n,
        "finetune_sets": set_stats,
        "conditions": conditions,
        "hypothesis": {
            "statement": "the student fine-tuned on the teacher's answers gives more wrong answers "
                         "than the student fine-tuned on its own answers",
            "wrong_teacher": test.wrong_a,
            "wrong_self": test.wrong_b,
            "teacher_wrong_only": test.a_only,
            "self_wrong_only": test.b_only,
            "wrong_rate_difference": test.diff_rate,
            "bootstrap_95ci": [test.ci_low, test.ci_high],
            "mcnemar_p": test.p_value,
            "alpha": ALPHA,
            "held": held,
        },
    }


def cell(ctx: CellContext) -> dict:
    paper = {cond: ctx.evaluated[cond] for cond in CONDITIONS}
    return results(dict(ctx.settings.raw), paper, ctx.json("sets", "stats.json"), ctx.models)


def _wrong(folder: Path, cond: str) -> list[bool]:
    return [json.loads(line)["verdict"] == scoring.WRONG
            for line in (folder / "samples" / f"{cond}.jsonl").read_text(encoding="utf-8").splitlines() if line]


def conclusion(pooled: dict | None) -> str | None:
    """What a pooled interval allows one to say of the direction."""
    if pooled is None:
        return None
    lo, hi = pooled["random_effects"]["ci"]
    return "more wrong answers" if lo > 0 else "fewer wrong answers" if hi < 0 else "undecided"


def pooled(out: Path, cells: list[dict], n_boot: int) -> dict:
    """The teacher-vs-self difference of one grid point pooled over its seeds (the seed a random effect)."""
    pairs = [(_wrong(out / c["folder"], "teacher"), _wrong(out / c["folder"], "self")) for c in cells]
    result = stats.pool_seeds(pairs, n_boot=n_boot) if len(cells) > 1 else None
    return {"pooled": result, "conclusion": conclusion(result)}


UNIT = Unit(
    key=None,
    enabled=lambda s: True,
    stages=stages,
    cell=cell,
    conditions=lambda s: {c: f"evaluate/{c}" for c in CONDITIONS},
    pooled=pooled,
)
