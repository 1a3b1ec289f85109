"""The report of a recipe's `[design]` (protocol steps 9 to 11): the mismatch dose (rates
against dose, the slope of the wrong-answer rate), the knowledge categories (every
condition's verdicts per category) and training length (rates against epoch, epoch_curve.py),
per cell and pooled over seeds, as results, tables, markdown and the figures dose.png,
categories.png and epochs.png."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from kmismatch_lite import categories, dose_response, epoch_curve, scoring
from kmismatch_lite.dose import dose_name
from kmismatch_lite.io import atomic_path, read_jsonl

COUNTS = ("n", "correct", "wrong", "abstained")


def cell_results(recipe: dict, evaluated: dict, dose_stats: dict | None, cats: dict[str, str] | None,
                 by_epoch: tuple[dict, dict] | None = None) -> dict:
    """The `dose`, `categories` and `epochs` entries of one cell's results (absent when off)."""
    out: dict = {}
    if dose_stats is not None:
        out["dose"] = _dose_cell(recipe, evaluated, dose_stats)
    if cats is not None:
        design = recipe["design"]
        out["categories"] = {
            "mode": design["categories"],
            **({"prompts": design["slick_prompts"], "samples": design["slick_samples"]}
               if design["categories"] == "slick" else {}),
            "counts": _ordered(Counter(cats.values())),
            "by_condition": {cond: categories.breakdown(s, cats) for cond, (s, _) in evaluated.items()},
        }
    if by_epoch is not None:
        out["epochs"] = epoch_curve.cell_section(recipe, evaluated, by_epoch)
    return out


def _ordered(counts: dict) -> dict:
    return {c: counts[c] for c in categories.CATEGORIES if c in counts}


def _dose_cell(recipe: dict, evaluated: dict, dose_stats: dict) -> dict:

    doses = sorted(map(float, recipe["design"]["doses"]))
    names = [dose_name(d) for d in doses]
    response = dose_response.by_verdict([{d: evaluated[n][0] for d, n in zip(doses, names)}],
                                        n_boot=recipe["report"]["bootstrap"], seed=recipe["seed"])
    return {"doses": doses, "sets": {n: dose_stats[n] for n in names},
            "conditions": {n: scoring.tally_of(evaluated[n][1]) for n in names},
            "mismatch_answered": [dose_stats[n]["mismatch_answered"] for n in names],
            "mismatch_pool": dose_stats[names[0]]["mismatch_pool"],
            "paper_wrong_rate": _paper_rates([evaluated[c][1] for c in ("self", "teacher")]),
            "response": response}


def _paper_rates(metrics: Sequence[dict]) -> dict:
    return {c: m["hallucination_rate"] for c, m in zip(("self", "teacher"), metrics)}


def pooled(out: Path, cells: list[dict], n_boot: int) -> dict:
    """The `dose`, `categories` and `epochs` entries of one grid point, pooled over its seeds' cells."""
    res: dict = {}
    if "dose" in cells[0]:
        doses = cells[0]["dose"]["doses"]
        samples = [{d: read_jsonl(out / c["folder"] / "samples" / f"{dose_name(d)}.jsonl") for d in doses}
                   for c in cells]
        n = len(cells)
        res["dose"] = {
            "doses": doses,
            "mismatch_answered": [sum(c["dose"]["mismatch_answered"][i] for c in cells) / n
                                  for i in range(len(doses))],
            "mismatch_pool": sum(c["dose"]["mismatch_pool"] for c in cells) / n,
            "paper_wrong_rate": {k: sum(c["conditions"][k]["hallucination_rate"] for c in cells) / n
                                 for k in ("self", "teacher")},
            "response": dose_response.by_verdict(samples, n_boot=n_boot, seed=0),
        }
    if "categories" in cells[0]:
        res["categories"] = _pooled_categories([c["categories"] for c in cells])
    if "epochs" in cells[0]:
        res["epochs"] = epoch_curve.pooled(out, cells, n_boot)
    return res


def _pooled_categories(per_cell: list[dict]) -> dict:
    """Counts summed over seeds; rates and shares of wrong answers recomputed from the sums."""
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


# --- tables (report.md and the terminal) ---

def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _count(x: float) -> str:
    # Pooled over seeds these are means; one decimal says so without a run of digits.
    return f"{x:g}" if float(x).is_integer() else f"{x:.1f}"


def _rate(res: dict, i: int) -> str:
    lo, hi = res["rates_ci"][i]
    return f"{_pts(res['rates'][i])}% [{_pts(lo)}, {_pts(hi)}]"


DOSE_COLUMNS = ["dose", "mismatch facts answered (per seed)", "correct (95%)", "wrong (95%)", "abstained (95%)"]


def dose_rows(section: dict) -> list[list[str]]:
    """One row per dose: the facts of the mismatch pool it answers, and each verdict's rate."""
    r = section["response"]
    return [[f"{d:g}", f"{_count(section['mismatch_answered'][i])} of {_count(section['mismatch_pool'])}",
             *(_rate(r[v], i) for v in scoring.VERDICTS)] for i, d in enumerate(section["doses"])]


def dose_text(section: dict) -> str:
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
    return (f"{head}: {tail} Beside the curve, the paper's conditions: self {_pts(paper['self'])}% wrong, "
            f"teacher {_pts(paper['teacher'])}% wrong.")


def category_columns(section: dict) -> list[str]:
    return ["condition"] + [f"{cat} wrong / n (share)" for cat in section["counts"]]


def category_rows(section: dict) -> list[list[str]]:
    """Per condition and category: wrong answers of all its questions, and that category's share
    of the condition's wrong answers."""
    rows = []
    for cond, cats in section["by_condition"].items():
        cells = [f"{cats[c]['wrong']} / {cats[c]['n']} ({cats[c]['share_of_wrong']:.0%})" if c in cats else "-"
                 for c in section["counts"]]
        rows.append([cond, *cells])
    return rows


def category_title(section: dict) -> str:
    how = ("Known / Unknown from the base student's one greedy few-shot answer" if section["mode"] == "cheap"
           else f"SliCK, {section['prompts']} few-shot prompts greedily, {section['samples']} samples"
           + (f" at temperature {categories.TEMPERATURE:g}" if section["samples"] else ""))
    return f"Knowledge categories of the test questions: {how}"


def tables(section: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, columns, rows, sentence) of each design in a cell's results or a pooled grid point."""
    out = []
    if "dose" in section:
        out.append(("Mismatch dose: rates of the test answers", DOSE_COLUMNS, dose_rows(section["dose"]),
                    dose_text(section["dose"])))
    if "categories" in section:
        c = section["categories"]
        counts = ", ".join(f"{k} {v}" for k, v in c["counts"].items())
        out.append((category_title(c), category_columns(c), category_rows(c),
                    f"Test questions per category{' (summed over seeds)' if c.get('seeds') else ''}: {counts}."))
    if "epochs" in section:
        out.append(("Training length: wrong answers against epoch", epoch_curve.COLUMNS,
                    epoch_curve.rows(section["epochs"]), epoch_curve.text(section["epochs"])))
    return out


def _md_table(columns: list[str], rows: list[list[str]]) -> str:
    return (f"| {' | '.join(columns)} |\n|{'---|' * len(columns)}\n"
            + "".join(f"| {' | '.join(map(str, r))} |\n" for r in rows))


NOTES = {
    "dose": ("A dose-d set holds every training question in the same order; the student-known facts keep "
             "their gold answer, a nested random fraction d of the mismatch pool (facts the teacher "
             "answered and the student did not) gets its gold answer, everything else \"I don't know\". "
             "Dose 0 is the self set. Rates are over the test questions, with 95% intervals."),
    "categories": ("Each cell: wrong answers of the condition on the questions of that category / the "
                   "category's questions, and (in brackets) the category's share of the condition's wrong "
                   "answers. Where the extra wrong answers come from is the change in that share."),
    "epochs": ("Each fine-tuned condition's LoRA as saved at the end of every epoch answers the test questions "
               "(zero-shot). Counts are means over seeds (each seed's wrong answers in brackets); rates are over "
               "the test questions, with 95% intervals. A dose-0 condition is the self one."),
}


def markdown(section: dict, level: str = "##", images: bool = True) -> str:
    """The design sections of report.md ('' when the recipe has no design)."""
    parts = []
    for (title, columns, rows, text), kind in zip(tables(section), [k for k in NOTES if k in section]):
        image = f"\n![{kind}]({kind}.png)\n" if images else ""
        parts.append(f"{level} {title}\n\n{NOTES[kind]}\n\n{_md_table(columns, rows)}\n{text}\n{image}\n")
    return "".join(parts)


def image_links(section: dict) -> str:
    return "".join(f"![{k}]({k}.png)\n\n" for k in NOTES if k in section)


# --- figures ---

def figures(entries: list[tuple[str, dict]], res: dict, out: Path) -> None:
    """dose.png, categories.png and epochs.png (one panel per labelled section) where the sections
    have them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    title = f"student {res['student']}, teacher {res['teacher']}"
    for kind, draw in (("dose", _dose_panel), ("categories", _categories_panel), ("epochs", epoch_curve.panel)):
        panels = [(label, e[kind]) for label, e in entries if kind in e]
        if not panels:
            # A rerun without the design must not leave an earlier run's figure beside the report.
            (out / f"{kind}.png").unlink(missing_ok=True)
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
        for ax, (label, section) in zip(axes[0], panels):
            draw(ax, section)
            ax.set_title(f"{title}{': ' + label if label else ''}", fontsize=9)
        fig.tight_layout()
        with atomic_path(out / f"{kind}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)


COLORS = {scoring.CORRECT: "#2e7d32", scoring.WRONG: "#c62828", scoring.ABSTAINED: "#9e9e9e"}


def _dose_panel(ax, section: dict) -> None:
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


def _categories_panel(ax, section: dict) -> None:
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
