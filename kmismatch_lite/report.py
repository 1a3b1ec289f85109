"""Protocol step 7: results.json, report.md, report.png and samples/<condition>.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from kmismatch_lite import scoring, stats
from kmismatch_lite.errors import KmmError
from kmismatch_lite.io import atomic_path, write_json, write_jsonl, write_text

LABELS = {
    "base_student": "student, not fine-tuned",
    "self": "student fine-tuned on its own answers",
    "teacher": "student fine-tuned on the teacher's answers",
    "base_teacher": "teacher, not fine-tuned",
}
ALPHA = 0.05


def results(recipe: dict, evaluated: dict, set_stats: dict, models: dict) -> dict:
    """Every figure of protocol steps 4 and 6; nothing time-dependent, so reruns compare equal."""
    conditions = {c: {k: v for k, v in m.items() if k in scoring.Tally.__dataclass_fields__ or k.endswith("_rate") or k == "precision"}
                  for c, (_, m) in evaluated.items()}
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

## What the numbers mean

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
  run is one seed. Run several seeds (`-s seed=N`) and compare them with `kmm report A B`.
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
    write_text(out / "report.md", markdown(res))
    write_json(out / "results.json", res)


def load(run_dir: Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise KmmError(f"no results.json in {run_dir} (is it a finished run folder?)")
    try:
        return json.loads(path.read_text())
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
