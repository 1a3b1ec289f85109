"""The mismatch dose (protocol step 9), whole: the nested dose sets (dose.py), a fine-tune and an
evaluation per dose, and the rates of the test answers against dose with the slope of the
wrong-answer rate (dose_response.py), per cell and pooled over seeds; its table and dose.png.
Dose 0 is the self set, so its fine-tune and evaluation are the paper's `self` stages."""

from __future__ import annotations

from pathlib import Path

import kmismatch_lite.designs.dose_response as dose_response
from kmismatch_lite.qa import scoring
from kmismatch_lite.designs.report_parts import COLORS, Table, count, pts
from kmismatch_lite.designs.stages import answer_stage, finetune_stage, finetuned_adapter, questions, zero_shot
from kmismatch_lite.designs.unit import CellContext, StageContext, StageRecord, Unit
from kmismatch_lite.designs.dose import dose_name, dose_sets
from kmismatch_lite.fingerprint import stage_code
from kmismatch_lite.io import read_jsonl, sha256_file, write_json, write_jsonl
from kmismatch_lite.settings import CellSettings


def _sets_stage() -> StageRecord:
    """The nested mismatch-dose sets, from the generation stage's answers."""
    def inputs(ctx: StageContext) -> dict:
        return {"teacher": ctx.key("generate/teacher"), "student": ctx.key("generate/student"),
                "doses": ctx.settings.raw["design"]["doses"], "seed": ctx.settings.seed,
                "code": stage_code("dose_sets")}

    def work(ctx: StageContext, tmp: Path) -> None:
        built = dose_sets(questions(ctx, "train"), ctx.rows("generate/teacher", "samples.jsonl"),
                          ctx.rows("generate/student", "samples.jsonl"), ctx.settings.design.doses,
                          seed=ctx.settings.seed)
        for ds in built:
            write_jsonl(tmp / f"{ds.name}.jsonl", ds.rows)
        write_json(tmp / "stats.json", {ds.name: ds.stats for ds in built})

    return StageRecord("dose_sets", ("design.doses",), ("data", "generate/teacher", "generate/student"),
                       inputs, work)


def _set_content(ctx: StageContext, path: Path) -> dict:
    # Keyed by the set's content: a dose added later leaves the other doses' fine-tunes be.
    return {"set_sha256": sha256_file(path), "set": path.stem}


def stages(s: CellSettings, earlier: list[StageRecord]) -> list[StageRecord]:
    out = [_sets_stage()]
    for name in (dose_name(d) for d in s.design.doses if d != 0.0):
        out.append(finetune_stage(name, "dose_sets", _set_content))
        out.append(answer_stage(f"evaluate/{name}", "student", "test", zero_shot,
                                adapter=finetuned_adapter(f"finetune/{name}"), adapter_need=f"finetune/{name}"))
    return out


def aliases(s: CellSettings) -> dict[str, str]:
    if 0.0 not in s.design.doses:
        return {}
    return {f"{kind}/{dose_name(0.0)}": f"{kind}/self" for kind in ("finetune", "evaluate")}


def section(s: CellSettings, evaluated: dict, dose_stats: dict) -> dict:
    """One cell's `dose` entry from its conditions' (samples, metrics) and the dose sets' stats."""
    doses = sorted(s.design.doses)
    names = [dose_name(d) for d in doses]
    response = dose_response.by_verdict([{d: evaluated[n][0] for d, n in zip(doses, names)}],
                                        n_boot=s.bootstrap, seed=s.seed)
    return {"doses": doses, "sets": {n: dose_stats[n] for n in names},
            "conditions": {n: scoring.tally_of(evaluated[n][1]) for n in names},
            "mismatch_answered": [dose_stats[n]["mismatch_answered"] for n in names],
            "mismatch_pool": dose_stats[names[0]]["mismatch_pool"],
            "paper_wrong_rate": {c: evaluated[c][1]["hallucination_rate"] for c in ("self", "teacher")},
            "response": response}


def cell(ctx: CellContext) -> dict:
    if 0.0 in ctx.settings.design.doses and (read_jsonl(ctx.folders["dose_sets"] / f"{dose_name(0.0)}.jsonl")
                                      != read_jsonl(ctx.folders["sets"] / "self.jsonl")):
        raise RuntimeError("the dose-0 set differs from the self set it shares stages with")
    return section(ctx.settings, ctx.evaluated, ctx.json("dose_sets", "stats.json"))


def pooled(out: Path, cells: list[dict], n_boot: int) -> dict:
    doses = cells[0]["dose"]["doses"]
    samples = [{d: read_jsonl(out / c["folder"] / "samples" / f"{dose_name(d)}.jsonl") for d in doses}
               for c in cells]
    n = len(cells)
    return {
        "doses": doses,
        "mismatch_answered": [sum(c["dose"]["mismatch_answered"][i] for c in cells) / n for i in range(len(doses))],
        "mismatch_pool": sum(c["dose"]["mismatch_pool"] for c in cells) / n,
        "paper_wrong_rate": {k: sum(c["conditions"][k]["hallucination_rate"] for c in cells) / n
                             for k in ("self", "teacher")},
        "response": dose_response.by_verdict(samples, n_boot=n_boot, seed=0),
    }


COLUMNS = ["dose", "mismatch facts answered (per seed)", "correct (95%)", "wrong (95%)", "abstained (95%)"]


def _rate(res: dict, i: int) -> str:
    lo, hi = res["rates_ci"][i]
    return f"{pts(res['rates'][i])}% [{pts(lo)}, {pts(hi)}]"


def rows(section: dict) -> list[list[str]]:
    """One row per dose: the facts of the mismatch pool it answers, and each verdict's rate."""
    r = section["response"]
    return [[f"{d:g}", f"{count(section['mismatch_answered'][i])} of {count(section['mismatch_pool'])}",
             *(_rate(r[v], i) for v in scoring.VERDICTS)] for i, d in enumerate(section["doses"])]


def text(section: dict) -> str:
    """The slope of the wrong-answer rate per unit dose, its interval and what it allows one to say."""
    w = section["response"][scoring.WRONG]
    lo, hi = w["slope_ci"]
    seeds = f"{w['seeds']} seed{'s' if w['seeds'] > 1 else ''}"
    head = (f"Over {seeds}, the wrong-answer rate changed by {100 * w['slope']:+.1f} points per unit dose "
            f"(from no mismatch fact answered to all of them; 95% interval {100 * lo:+.1f} to {100 * hi:+.1f}, "
            f"hierarchical bootstrap over seeds and test questions)")
    if lo > 0:
        tail = "more of the facts the student did not know in its training targets, more wrong answers."
    elif hi < 0:
        tail = "more of the facts the student did not know in its training targets, fewer wrong answers."
    else:
        tail = "the interval includes zero, so these runs cannot tell the direction (not evidence of no effect)."
    paper = section["paper_wrong_rate"]
    return (f"{head}: {tail} Beside the curve, the paper's conditions: self {pts(paper['self'])}% "
            f"wrong, teacher {pts(paper['teacher'])}% wrong.")


def table(section: dict) -> Table:
    return "Mismatch dose: rates of the test answers", COLUMNS, rows(section), text(section)


def panel(ax, section: dict) -> None:
    x = section["doses"]
    for verdict in scoring.VERDICTS:
        r = section["response"][verdict]
        y = [100 * v for v in r["rates"]]
        err = [[yi - 100 * lo for yi, (lo, _) in zip(y, r["rates_ci"])],
               [100 * hi - yi for yi, (_, hi) in zip(y, r["rates_ci"])]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=COLORS[verdict], label=verdict)
    ax.axhline(100 * section["paper_wrong_rate"]["teacher"], color=COLORS[scoring.WRONG], ls="--", lw=1,
               label="wrong, teacher's set")
    ax.set_xlabel("mismatch dose (share of the mismatch pool answered)")
    ax.set_ylabel("% of test questions")
    ax.legend(fontsize=7)


def _conditions(s: CellSettings) -> dict[str, str]:
    return {dose_name(d): f"evaluate/{dose_name(d)}" for d in s.design.doses}


NOTE = ("A dose-d set holds every training question in the same order; the student-known facts keep "
        "their gold answer, a nested random fraction d of the mismatch pool (facts the teacher "
        "answered and the student did not) gets its gold answer, everything else \"I don't know\". "
        "Dose 0 is the self set. Rates are over the test questions, with 95% intervals.")

UNIT = Unit(
    key="dose",
    enabled=lambda s: bool(s.design.doses),
    stages=stages,
    cell=cell,
    conditions=_conditions,
    aliases=aliases,
    pooled=pooled,
    table=table,
    note=NOTE,
    panel=panel,
)
