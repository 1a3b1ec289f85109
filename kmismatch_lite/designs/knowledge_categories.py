"""Knowledge categories (protocol step 10), whole: each test question's category from the base
student's answers (categories.py; cheap: its one greedy few-shot run; SliCK: K few-shot prompts
greedily and M samples with the run's own prompt, each a stage), every condition's verdicts per
category, per cell and summed over seeds; its table, categories.json and categories.png."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import kmismatch_lite.designs.categories as categories
from kmismatch_lite.designs.report_parts import Table
from kmismatch_lite.designs.stages import answer_stage, few_shot, questions
from kmismatch_lite.designs.unit import CellContext, StageContext, StageRecord, Unit
from kmismatch_lite.io import read_jsonl
from kmismatch_lite.qa.question import Question
from kmismatch_lite.settings import CellSettings

COUNTS = ("n", "correct", "wrong", "abstained")


def _slick_template(i: int):
    def template(ctx: StageContext):
        s = ctx.settings
        return categories.slick_templates(questions(ctx, "exemplars"), s.design.slick_prompts, s.data.shots,
                                          s.seed)[i - 1]
    return template


def stages(s: CellSettings, earlier: list[StageRecord]) -> list[StageRecord]:
    d = s.design
    if d.categories != "slick":
        return []
    # Prompt 1 is the run's own: its greedy answers are evaluate/base_student's.
    out = [answer_stage(f"slick/prompt-{i}", "student", "test", _slick_template(i))
           for i in range(2, d.slick_prompts + 1)]
    out += [answer_stage(f"slick/sample-{j}", "student", "test", few_shot,
                         sampling=categories.sample_settings(s.seed, j))
            for j in range(1, d.slick_samples + 1)]
    return out


def _categorize(ctx: CellContext) -> dict[str, str]:
    s, base = ctx.settings, ctx.evaluated["base_student"][0]
    d = s.design
    if d.categories == "cheap":
        return categories.categorize_cheap(base)
    data = ctx.folders["data"]
    exemplars = [Question(**r) for r in read_jsonl(data / "exemplars.jsonl")]
    first = categories.slick_templates(exemplars, d.slick_prompts, s.data.shots, s.seed)[0]
    if first.prefix != (data / "prompt.txt").read_text(encoding="utf-8"):
        raise RuntimeError("SliCK's first prompt is not the run's few-shot prompt")
    runs = [base] + [read_jsonl(ctx.folders[f"slick/prompt-{i}"] / "samples.jsonl")
                     for i in range(2, d.slick_prompts + 1)]
    sampled = [read_jsonl(ctx.folders[f"slick/sample-{j}"] / "samples.jsonl")
               for j in range(1, d.slick_samples + 1)]
    # With M = 0 there are no sampled answers, so WeaklyKnown merges into Unknown.
    return categories.categorize(categories.verdicts_by_question(runs), categories.verdicts_by_question(sampled))


def _ordered(counts: dict) -> dict:
    return {c: counts[c] for c in categories.CATEGORIES if c in counts}


def cell(ctx: CellContext) -> dict:
    cats = _categorize(ctx)
    ctx.files["categories.json"] = cats
    return section(ctx.settings, ctx.evaluated, cats)


def section(s: CellSettings, evaluated: dict, cats: dict[str, str]) -> dict:
    """One cell's `categories` entry: each question's category and every condition's verdicts by category."""
    d = s.design
    return {
        "mode": d.categories,
        **({"prompts": d.slick_prompts, "samples": d.slick_samples} if d.categories == "slick" else {}),
        "counts": _ordered(Counter(cats.values())),
        "by_condition": {cond: categories.breakdown(s, cats) for cond, (s, _) in evaluated.items()},
    }


def pooled(out: Path, cells: list[dict], n_boot: int) -> dict:
    """Counts summed over seeds; rates and shares of wrong answers recomputed from the sums."""
    per_cell = [c["categories"] for c in cells]
    first = per_cell[0]
    counts: Counter = Counter()
    for c in per_cell:
        counts.update(c["counts"])
    by_condition = {}
    for cond in first["by_condition"]:
        sums: dict[str, Counter] = {}
        for c in per_cell:
            for cat, t in c["by_condition"][cond].items():
                sums.setdefault(cat, Counter()).update({k: t[k] for k in COUNTS})
        wrong = sum(s["wrong"] for s in sums.values())
        by_condition[cond] = {cat: {**{k: s[k] for k in COUNTS}, "wrong_rate": s["wrong"] / s["n"],
                                    "share_of_wrong": s["wrong"] / wrong if wrong else 0.0}
                              for cat, s in _ordered(sums).items()}
    return {k: v for k, v in first.items() if k in ("mode", "prompts", "samples")} | {
        "seeds": len(per_cell), "counts": _ordered(counts), "by_condition": by_condition}


def columns(section: dict) -> list[str]:
    return ["condition"] + [f"{cat} wrong / n (share)" for cat in section["counts"]]


def rows(section: dict) -> list[list[str]]:
    """Per condition and category: wrong answers of all its questions, and that category's share
    of the condition's wrong answers."""
    out = []
    for cond, cats in section["by_condition"].items():
        cells = [f"{cats[c]['wrong']} / {cats[c]['n']} ({cats[c]['share_of_wrong']:.0%})" if c in cats else "-"
                 for c in section["counts"]]
        out.append([cond, *cells])
    return out


def title(section: dict) -> str:
    how = ("Known / Unknown from the base student's one greedy few-shot answer" if section["mode"] == "cheap"
           else f"SliCK, {section['prompts']} few-shot prompts greedily, {section['samples']} samples"
           + (f" at temperature {categories.TEMPERATURE:g}" if section["samples"] else ""))
    return f"Knowledge categories of the test questions: {how}"


def table(section: dict) -> Table:
    counts = ", ".join(f"{k} {v}" for k, v in section["counts"].items())
    return (title(section), columns(section), rows(section),
            f"Test questions per category{' (summed over seeds)' if section.get('seeds') else ''}: {counts}.")


def panel(ax, section: dict) -> None:
    conds = list(section["by_condition"])
    bottom = [0] * len(conds)
    palette = ("#1b5e20", "#66bb6a", "#ffb300", "#42a5f5", "#b71c1c")
    for cat, color in zip(categories.CATEGORIES, palette):
        if cat not in section["counts"]:
            continue
        vals = [section["by_condition"][c].get(cat, {}).get("wrong", 0) for c in conds]
        ax.bar(conds, vals, bottom=bottom, color=color, label=cat)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("wrong answers, by the question's category")
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.legend(fontsize=7)


def manifest(s: CellSettings, seeds: list[int]) -> dict:
    if s.design.categories == "slick" and s.design.slick_samples > 0:
        return {"sampling": categories.sampling_record(s.design.slick_samples, seeds)}
    return {}


NOTE = ("Each cell: wrong answers of the condition on the questions of that category / the "
        "category's questions, and (in brackets) the category's share of the condition's wrong "
        "answers. Where the extra wrong answers come from is the change in that share.")

UNIT = Unit(
    key="categories",
    enabled=lambda s: s.design.categories in ("cheap", "slick"),
    stages=stages,
    cell=cell,
    pooled=pooled,
    table=table,
    note=NOTE,
    panel=panel,
    files=("categories.json",),
    manifest=manifest,
)
