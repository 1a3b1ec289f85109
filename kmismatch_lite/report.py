"""Protocol step 7: results.json, report.md, report.png and samples/<condition>.jsonl."""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from kmismatch_lite import designs, report_designs
from kmismatch_lite.designs.paper import results  # noqa: F401  (a cell's results.json)
from kmismatch_lite.errors import KmmError
from kmismatch_lite.io import atomic_path, write_json, write_jsonl, write_text

LABELS = {
    "base_student": "student, not fine-tuned",
    "self": "student fine-tuned on its own answers",
    "teacher": "student fine-tuned on the teacher's answers",
    "base_teacher": "teacher, not fine-tuned",
}
# report.html of a many-seed run reloads itself, for a screen that watches seeds arrive.
REFRESH_SECONDS = 10


def table_rows(res: dict) -> list[list[str]]:
    rows = []
    for c, m in res["conditions"].items():
        rows.append([c, m["n"], m["correct"], m["wrong"], m["abstained"], f"{m['hallucination_rate']:.1%}",
                     f"{m['precision']:.1%}", f"{m['exact_match_rate']:.1%}"])
    return rows


def verdict_text(res: dict) -> str:
    h = res["hypothesis"]
    lo, hi = h["bootstrap_95ci"]
    direction = "more" if h["wrong_teacher"] > h["wrong_self"] else ("fewer" if h["wrong_teacher"] < h["wrong_self"] else "as many")
    line = (f"Fine-tuned on the teacher's answers, the student gave {h['wrong_teacher']} wrong answers; "
            f"on its own answers, {h['wrong_self']} ({direction}; difference in wrong-answer rate "
            f"{h['wrong_rate_difference']:+.1%}, 95% bootstrap interval [{lo:+.1%}, {hi:+.1%}], "
            f"McNemar exact p = {h['mcnemar_p']:.3g}).")
    if h["held"]:
        return line + f" The hypothesis held at this scale (p < {h['alpha']})."
    return line + f" The hypothesis did not hold at this scale (it needs more wrong answers with p < {h['alpha']})."


def markdown(res: dict) -> str:
    s = res["finetune_sets"]
    header = "| condition | what it is | n | correct | wrong | abstained | hallucination rate | precision | exact match |\n|---|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {c} | {LABELS.get(c, c)} | {m['n']} | {m['correct']} | {m['wrong']} | {m['abstained']} | "
        f"{m['hallucination_rate']:.1%} | {m['precision']:.1%} | {m['exact_match_rate']:.1%} |\n"
        for c, m in res["conditions"].items())
    return f"""# Knowledge mismatch: {res['student']} (student) and {res['teacher']} (teacher)

Recipe `{res['recipe']}`, data set `{res['dataset']}`, seed {res['seed']}: {res['n_train']} training
questions, {res['n_test']} test questions (no subject shared with training).

## Result

{verdict_text(res)}

{header}{body}
![correct, wrong and abstained answers per condition](report.png)

{report_designs.markdown(res)}## What the numbers mean

- **correct**: a gold answer (or an alias) appears in the answer; **wrong**: an answer was given and
  it is not a gold one (a hallucination); **abstained**: the model said "I don't know" or similar.
- **hallucination rate** = wrong / all questions; **precision** = correct / (correct + wrong).
- The two fine-tuning sets hold the same {s['n']} questions. Where the generating model answered a
  question correctly, its target is the gold answer; elsewhere it is "I don't know". The teacher
  answered {s['teacher_answered']}, the student {s['self_answered']}. **Mismatch rate**
  {s['mismatch_rate']:.1%}: of the targets the teacher answered, the share the student itself did not
  know ({s['teacher_only']} of {s['teacher_answered']}). Those are the facts the teacher's set asks the
  student to state without knowing them.
- The test compares, question by question, wrong answers of the two fine-tuned students (McNemar's
  exact test on the {res['hypothesis']['teacher_wrong_only']} + {res['hypothesis']['self_wrong_only']}
  questions where exactly one of them was wrong), with a bootstrap 95% interval on the difference.

## Caveats

- Small models and a small test set: a difference can be real yet not significant here, and one
  run is one seed; seeds differ by more than this interval shows. Run several seeds
  (`-s seeds=0,1,2,3,4`, or `recipes/classroom.toml`) to pool them with their spread.
- Answers are scored by containment of a gold alias after normalisation, so a long answer that
  names several candidates can count as correct; exact match is reported beside it.
- The fine-tuned students are trained and tested on the zero-shot prompt, the base models on the
  few-shot prompt, as in the protocol.
"""


def chart(res: dict, path: Path) -> bool:
    """Stacked bars of correct / wrong / abstained per condition; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    conds = list(res["conditions"])
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = [0.0] * len(conds)
    for verdict, color in (("correct", "#2e7d32"), ("wrong", "#c62828"), ("abstained", "#9e9e9e")):
        vals = [res["conditions"][c][verdict] for c in conds]
        ax.bar(conds, vals, bottom=bottom, label=verdict, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("test questions")
    ax.set_title(f"student {res['student']}, teacher {res['teacher']}: {res['n_test']} test questions",
                 fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def write(out: Path, res: dict, samples: dict[str, list[dict]]) -> None:
    for cond, rows in samples.items():
        write_jsonl(out / "samples" / f"{cond}.jsonl", rows)
    chart(res, out / "report.png")
    report_designs.figures([("", res)], res, out)
    write_text(out / "report.md", markdown(res))
    write_json(out / "results.json", res)


def load(run_dir: Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise KmmError(f"no results.json in {run_dir} (is it a finished run folder?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise KmmError(f"{path} is not valid JSON") from None


def compare_rows(a: dict, b: dict) -> list[list[str]]:
    rows = []
    for c in a["conditions"]:
        ma, mb = a["conditions"][c], b["conditions"].get(c)
        if mb is None:
            continue
        for k in ("correct", "wrong", "abstained"):
            rows.append([f"{c} {k}", ma[k], mb[k], f"{mb[k] - ma[k]:+d}"])
    ha, hb = a["hypothesis"], b["hypothesis"]
    rows.append(["mismatch rate", f"{a['finetune_sets']['mismatch_rate']:.1%}",
                 f"{b['finetune_sets']['mismatch_rate']:.1%}", ""])
    rows.append(["wrong-rate diff", f"{ha['wrong_rate_difference']:+.1%}", f"{hb['wrong_rate_difference']:+.1%}", ""])
    rows.append(["McNemar p", f"{ha['mcnemar_p']:.3g}", f"{hb['mcnemar_p']:.3g}", ""])
    rows.append(["hypothesis held", str(ha["held"]), str(hb["held"]), ""])
    return rows


# --- Many cells: each cell's results, pooled over seeds per grid point (protocol step 8) ---

def point_label(point: dict) -> str:
    """A grid point as `key=value, ...`."""
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "all cells"


def pooled_results(out: Path, the_plan, cell_results: list[dict], machines: dict | None = None) -> dict:
    """results.json of a many-cell run: every cell's results, and per grid point the
    teacher-vs-self comparison pooled over its seeds (the seed a random effect); `machines`
    (by seed) when the seeds were pooled from hand-ins."""
    cells = [{"seed": c.seed, "point": c.point, "folder": c.folder, **r}
             for c, r in zip(the_plan.cells, cell_results)]
    points = []
    for point in the_plan.points():
        at = [c for c in cells if c["point"] == point]
        n_boot = the_plan.cells_at(point)[0].recipe["report"]["bootstrap"]
        points.append({"point": point, "seeds": [c["seed"] for c in at], **designs.pooled(out, at, n_boot)})
    first = cells[0]
    return {"recipe": first["recipe"], "student": first["student"], "teacher": first["teacher"],
            "dataset": first["dataset"], "seeds": the_plan.seeds, "sweep": the_plan.grid,
            "statement": first["hypothesis"]["statement"], "points": points, "cells": cells,
            **({"machines": {str(k): v for k, v in machines.items()}} if machines else {})}


def machine_key(m: dict) -> tuple:
    return (m.get("platform"), m.get("machine"), m.get("cpu"), m.get("cpus"))


def machines_text(res: dict) -> str:
    """For seeds pooled from hand-ins: whether they ran on one machine or several."""
    machines = res.get("machines") or {}
    distinct = {machine_key(m) for m in machines.values()}
    if not machines:
        return ""
    label = next(iter(machines.values()))["label"]
    if len(machines) == 1:
        return f"The seed ran on {label}."
    if len(distinct) == 1:
        return f"All {len(machines)} seeds ran on one machine ({label})."
    return (f"These {len(machines)} seeds ran on {len(distinct)} different machines: a seed's counts can "
            f"differ between machines on near-tie answers and with the core count, so the pooled sign and "
            f"size is what reproduces, not one seed's counts.")


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def pooled_text(res: dict, entry: dict) -> str:
    """One sentence: the pooled difference, its interval, what that allows one to say and not."""
    p = entry["pooled"]
    if p is None:
        cell = next(c for c in res["cells"] if c["point"] == entry["point"])
        return verdict_text(cell)
    re = p["random_effects"]
    lo, hi = re["ci"]
    head = (f"Over {p['seeds']} seeds, fine-tuning on the teacher's answers instead of its own changed "
            f"the student's wrong-answer rate by {_pts(re['estimate'])} points on average (95% interval "
            f"{_pts(lo)} to {_pts(hi)}, seeds as a random effect)")
    spread = (f"the between-seed SD is {100 * re['tau']:.1f} points, and about {p['seeds_for_2_points']} "
              f"seeds would pin the average to +/-2 points")
    if entry["conclusion"] == "undecided":
        return (f"{head}: the interval includes zero, so these seeds cannot say whether the teacher's "
                f"answers bring more or fewer wrong answers, which is not evidence of no effect; {spread}.")
    more = entry["conclusion"] == "more wrong answers"
    return (f"{head}: on average over seeds of this setup the teacher's answers bring "
            f"{'more' if more else 'fewer'} wrong answers ({'as' if more else 'against what'} the "
            f"hypothesis predicts), but this does not say that every seed, model pair or data set "
            f"will; {spread}.")


def seed_rows(res: dict, point: dict) -> list[list[str]]:
    """One row per seed at a grid point, then the pooled rows."""
    rows = []
    for c in (c for c in res["cells"] if c["point"] == point):
        h, cond = c["hypothesis"], c["conditions"]
        lo, hi = h["bootstrap_95ci"]
        rows.append([f"seed {c['seed']}", f"{h['wrong_teacher']} / {h['wrong_self']}",
                     f"{_pts(h['wrong_rate_difference'])} [{_pts(lo)}, {_pts(hi)}]", f"{h['mcnemar_p']:.3g}",
                     f"{cond['teacher']['abstained']} / {cond['self']['abstained']}", c["n_test"],
                     f"{c['finetune_sets']['mismatch_rate']:.1%}"])
    p = next(e for e in res["points"] if e["point"] == point)["pooled"]
    if p:
        re, st = p["random_effects"], p["stratified"]
        b_lo, b_hi = p["hierarchical_bootstrap_95ci"]
        rows += [["random effects", "", f"{_pts(re['estimate'])} [{_pts(re['ci'][0])}, {_pts(re['ci'][1])}]",
                  "", "", "", ""],
                 ["hierarchical bootstrap", "", f"[{_pts(b_lo)}, {_pts(b_hi)}]", "", "", "", ""],
                 ["fixed effect", f"{st['a_only']} / {st['b_only']} only",
                  f"{_pts(re['fixed_estimate'])} [{_pts(re['fixed_ci'][0])}, {_pts(re['fixed_ci'][1])}]",
                  f"{st['exact_p']:.3g}", "", "", ""]]
    return rows


# t / s: the student fine-tuned on the teacher's set / on its own set
SEED_COLUMNS = ["", "wrong t / s", "difference (95%)", "p", "abstained t / s", "n", "mismatch"]


def heterogeneity_text(p: dict) -> str:
    re = p["random_effects"]
    return (f"Between-seed SD tau = {100 * re['tau']:.1f} points; Cochran's Q = {re['q']:.1f} on "
            f"{p['seeds'] - 1} df (p = {re['q_p']:.3g}), I² = {re['i2']:.0%}. Seeds needed for a +/-2-point "
            f"interval at this spread (SD of a seed's difference {100 * p['seed_sd']:.1f} points): "
            f"{p['seeds_for_2_points']}.")


def pooled_markdown(res: dict) -> str:
    """report.md of a many-cell run: the pooled answer first, then a table per grid point."""
    lead = "\n\n".join(f"- **{point_label(e['point'])}**: {pooled_text(res, e)}" if res["sweep"]
                       else pooled_text(res, e) for e in res["points"])
    sections = []
    machines = res.get("machines") or {}
    columns = SEED_COLUMNS + (["machine"] if machines else [])
    for e in res["points"]:
        rows = seed_rows(res, e["point"])
        if machines:
            at = [c for c in res["cells"] if c["point"] == e["point"]]
            rows = [r + [machines[str(at[i]["seed"])]["label"] if i < len(at) else ""] for i, r in enumerate(rows)]
        table = (f"| {' | '.join(columns)} |\n|{'---|' * len(columns)}\n"
                 + "".join(f"| {' | '.join(map(str, r))} |\n" for r in rows))
        extra = heterogeneity_text(e["pooled"]) if e["pooled"] else ""
        title = point_label(e["point"]) if res["sweep"] else "Seeds"
        designs = report_designs.markdown(e, "####", images=False)
        sections.append(f"### {title}\n\n{table}\n{extra}\n\n{designs}")
    cells = ", ".join(f"[{c['folder']}]({c['folder']}/report.md)" for c in res["cells"])
    return f"""# Knowledge mismatch over seeds: {res['student']} (student) and {res['teacher']} (teacher)

Recipe `{res['recipe']}`, data set `{res['dataset']}`, seeds {', '.join(map(str, res['seeds']))}.
Hypothesis: {res['statement']}.

## Result

{lead}
{(chr(10) + machines_text(res) + chr(10)) if machines else ""}
{''.join(sections)}{report_designs.image_links(res['points'][0])}
![each seed's difference in wrong-answer rate with its interval, and the pooled one](forest.png)

## What the numbers mean

- **difference**: wrong-answer rate of the student fine-tuned on the teacher's answers minus that of
  the student fine-tuned on its own, in percentage points; above zero is what the hypothesis predicts.
  Each seed's interval is its bootstrap over test questions, its p McNemar's exact test. **t / s**:
  the student fine-tuned on the teacher's set / on its own; in the fixed-effect row, the questions
  only one of them got wrong.
- A seed fixes the split, the few-shot exemplars, the data order and the LoRA initialisation, so
  seeds differ by more than their own intervals show. The **random-effects** estimate treats the seed
  as a random effect (DerSimonian-Laird), with a Hartung-Knapp interval (t with seeds - 1 degrees of
  freedom, never narrower than at scale 1); the **hierarchical bootstrap** resamples seeds, then questions within each seed. These
  are the answer. The **fixed effect** (inverse-variance estimate; the stratified exact test on the
  discordant pairs pooled over seeds, Cochran-Mantel-Haenszel for matched pairs) treats these seeds
  as all there is, so it claims more certainty than the experiment has.
- **tau** is the between-seed SD; **I²** the share of the spread that is between seeds rather than
  question sampling; **seeds needed** is the fewest seeds whose t interval would be +/-2 points at the
  observed spread.
- Each cell's own report: {cells}.
"""


def forest(res: dict, path: Path) -> bool:
    """Forest plot: each seed's difference with its interval, and the pooled one per grid point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = _forest_rows(res)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    for y, (label, est, lo, hi, pooled) in enumerate(reversed(rows)):
        if pooled:
            ax.fill([lo, est, hi, est], [y, y + 0.3, y, y - 0.3], color="#1565c0")
        else:
            ax.errorbar(est, y, xerr=[[est - lo], [hi - est]], fmt="s", color="#424242", capsize=3, ms=4)
    ax.axvline(0, color="#9e9e9e", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=8)
    ax.set_xlabel("wrong-answer rate, teacher's set minus own set (points)")
    ax.set_title(f"student {res['student']}, teacher {res['teacher']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def _forest_rows(res: dict) -> list[tuple[str, float, float, float, bool]]:
    rows = []
    for e in res["points"]:
        prefix = f"{point_label(e['point'])}: " if res["sweep"] else ""
        for c in (c for c in res["cells"] if c["point"] == e["point"]):
            h = c["hypothesis"]
            lo, hi = h["bootstrap_95ci"]
            rows.append((f"{prefix}seed {c['seed']}", 100 * h["wrong_rate_difference"], 100 * lo, 100 * hi, False))
        if e["pooled"]:
            re = e["pooled"]["random_effects"]
            rows.append((f"{prefix}pooled (random effects)", 100 * re["estimate"], 100 * re["ci"][0],
                         100 * re["ci"][1], True))
    return rows


def write_pooled(out: Path, the_plan, cell_results: list[dict], machines: dict | None = None) -> dict:
    """results.json, report.md and forest.png of a many-cell run; returns the results."""
    res = pooled_results(out, the_plan, cell_results, machines)
    forest(res, out / "forest.png")
    report_designs.figures([(point_label(e["point"]) if res["sweep"] else "", e) for e in res["points"]], res, out)
    write_text(out / "report.md", pooled_markdown(res))
    write_html(out / "report.html", res)
    write_json(out / "results.json", res)
    return res


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def write_html(path: Path, res: dict) -> None:
    """report.html: the pooled sentence, the seed table and the forest plot in one self-contained
    page that reloads itself every REFRESH_SECONDS (a screen watching `kmm pool --watch`)."""
    forest_png = path.parent / "forest.png"
    img = (f'<img alt="forest plot" src="data:image/png;base64,{base64.b64encode(forest_png.read_bytes()).decode()}">'
           if forest_png.is_file() else "")
    machines = res.get("machines") or {}
    columns = SEED_COLUMNS + (["machine"] if machines else [])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    sections = ""
    for entry in res["points"]:
        at = [c for c in res["cells"] if c["point"] == entry["point"]]
        rows = ""
        for i, r in enumerate(seed_rows(res, entry["point"])):
            if machines:
                r = r + [machines[str(at[i]["seed"])]["label"] if i < len(at) else ""]
            rows += "<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>\n"
        title = f"<h2>{html.escape(point_label(entry['point']))}</h2>" if res["sweep"] else ""
        extra = heterogeneity_text(entry["pooled"]) if entry["pooled"] else ""
        sections += (f"{title}<p><strong>{html.escape(pooled_text(res, entry))}</strong></p>\n"
                     f"<p>{html.escape(extra)}</p>\n<table><tr>{head}</tr>\n{rows}</table>\n")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>kmm: {_seeds(len(res['seeds']))} pooled</title>
<style>body{{font-family:sans-serif;max-width:64em;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;font-size:90%;margin:1em 0}}
td,th{{border-bottom:1px solid #ccc;padding:.2em .6em;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>Knowledge mismatch: {_seeds(len(res['seeds']))} pooled</h1>
<p>{html.escape(res['student'])} (student), {html.escape(res['teacher'])} (teacher), data set
{html.escape(res['dataset'])}. Hypothesis: {html.escape(res['statement'])}.</p>
<p>{html.escape(machines_text(res))}</p>
{sections}{img}
<p><small>Updated {time.strftime('%Y-%m-%d %H:%M:%S')}; this page reloads every {REFRESH_SECONDS} s.</small></p>
</body></html>
"""
    write_text(path, page)
