"""The headline of a run, end to end, from hand-made verdict files: each run's difference in
wrong-answer rate, McNemar p, bootstrap interval, `held` and its sentence, the pooled estimate of a
many-seed run with its conclusion, and `kmm report A B` of two runs. Every expected figure is
derived here from the verdicts (scipy, statsmodels, the normal approximation of a paired
difference), never from the code's own output."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("statsmodels", reason="needs the stats extra (scipy, statsmodels)")

import statsmodels.api as sm  # noqa: E402
from scipy import stats as st  # noqa: E402
from statsmodels.stats.contingency_tables import mcnemar  # noqa: E402

from conftest import run_kmm  # noqa: E402
from kmismatch_lite import plan, recipes, report  # noqa: E402
from kmismatch_lite.qa import scoring  # noqa: E402

C, W, A = scoring.CORRECT, scoring.WRONG, scoring.ABSTAINED
N = 400
MODELS = {"student": SimpleNamespace(name="student-m"), "teacher": SimpleNamespace(name="teacher-m")}
SETS = {"n": 40, "teacher_answered": 20, "self_answered": 12, "both_answered": 10, "teacher_only": 10,
        "self_only": 2, "mismatch_rate": 0.5}


def paired(both: int, t_only: int, s_only: int, n: int = N, seed: int = 0) -> tuple[list[str], list[str]]:
    """The teacher-set and self-set students' verdicts on n questions: both wrong on `both`, only
    the first on `t_only`, only the second on `s_only`, correct or abstained elsewhere; shuffled."""
    kinds = ["both"] * both + ["t"] * t_only + ["s"] * s_only + ["none"] * (n - both - t_only - s_only)
    random.Random(seed).shuffle(kinds)
    teacher = [W if k in ("both", "t") else (C if i % 3 else A) for i, k in enumerate(kinds)]
    self_ = [W if k in ("both", "s") else (A if i % 4 == 1 else C) for i, k in enumerate(kinds)]
    return teacher, self_


def evaluated_of(teacher: list[str], self_: list[str]) -> dict:
    n = len(teacher)
    table = {"base_student": [W if i % 5 == 0 else C if i % 5 < 3 else A for i in range(n)], "self": self_,
             "teacher": teacher, "base_teacher": [W if i % 7 == 0 else C for i in range(n)]}
    out = {}
    for cond, verdicts in table.items():
        rows = [{"id": f"q{i}", "verdict": v, "output": "x"} for i, v in enumerate(verdicts)]
        out[cond] = (rows, scoring.tally(verdicts, [v == C for v in verdicts]).as_dict())
    return out


def make_run(folder: Path, recipe: dict, teacher: list[str], self_: list[str], sets: dict = SETS) -> dict:
    """A finished single-seed run folder, written by the report code from these verdicts."""
    evaluated = evaluated_of(teacher, self_)
    res = report.results(recipe, evaluated, sets, MODELS)
    report.write(folder, res, {c: s for c, (s, _) in evaluated.items()})
    return res


def by_hand(teacher: list[str], self_: list[str]) -> dict:
    t = np.array([v == W for v in teacher])
    s = np.array([v == W for v in self_])
    n = len(t)
    a_only, b_only = int((t & ~s).sum()), int((~t & s).sum())
    diff = (int(t.sum()) - int(s.sum())) / n
    table = [[int((t & s).sum()), a_only], [b_only, int((~t & ~s).sum())]]
    p = mcnemar(table, exact=True).pvalue
    assert p == pytest.approx(st.binomtest(a_only, a_only + b_only, 0.5).pvalue)
    # the normal approximation of the mean of the paired per-question differences (plug-in variance)
    se = np.sqrt(((a_only + b_only) / n - diff**2) / n)
    pt, ps = t.mean(), s.mean()
    se_unpaired = np.sqrt(pt * (1 - pt) / n + ps * (1 - ps) / n)
    return {"wrong_t": int(t.sum()), "wrong_s": int(s.sum()), "a_only": a_only, "b_only": b_only, "diff": diff,
            "p": float(p), "se": float(se), "se_unpaired": float(se_unpaired),
            "held": bool(t.sum() > s.sum() and p < 0.05),
            "direction": "more" if t.sum() > s.sum() else "fewer" if t.sum() < s.sum() else "as many"}


def interval_tolerance(se: float, n: int) -> float:
    """How far a 2000-resample percentile interval may sit from diff +/- 1.96 se: four Monte Carlo
    SDs of a 2.5% quantile from 2000 draws (about 0.06 se each) and one step of the resampled
    mean (1/n)."""
    return 0.25 * se + 1 / n


def flat(text: str) -> str:
    return " ".join(text.split())


CASES = {
    "held, more": (100, 40, 12),
    "more, did not hold": (100, 20, 14),
    "fewer, significant, did not hold": (100, 10, 30),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_runs_headline_by_hand(tmp_path, case):
    teacher, self_ = paired(*CASES[case])
    hand = by_hand(teacher, self_)
    recipe = recipes.load("smoke", ["report.bootstrap=2000", "seed=3"])
    res = make_run(tmp_path, recipe, teacher, self_)
    assert json.loads((tmp_path / "results.json").read_text(encoding="utf-8")) == res
    h = res["hypothesis"]
    assert (h["wrong_teacher"], h["wrong_self"]) == (hand["wrong_t"], hand["wrong_s"])
    assert (h["teacher_wrong_only"], h["self_wrong_only"]) == (hand["a_only"], hand["b_only"])
    assert h["wrong_rate_difference"] == pytest.approx(hand["diff"], abs=1e-12)
    assert h["mcnemar_p"] == pytest.approx(hand["p"], rel=1e-9)
    assert h["held"] is hand["held"]
    assert hand["held"] == (case == "held, more")

    # The interval is the paired one: diff +/- 1.96 paired SE, not the wider unpaired one (and
    # these verdicts are correlated enough that the two are told apart by the tolerance).
    lo, hi = h["bootstrap_95ci"]
    z, tol = st.norm.ppf(0.975), interval_tolerance(hand["se"], N)
    assert z * (hand["se_unpaired"] - hand["se"]) > 2 * tol
    assert lo == pytest.approx(hand["diff"] - z * hand["se"], abs=tol)
    assert hi == pytest.approx(hand["diff"] + z * hand["se"], abs=tol)

    text = flat((tmp_path / "report.md").read_text(encoding="utf-8").split("## Result", 1)[1])
    assert f"the student gave {hand['wrong_t']} wrong answers; on its own answers, {hand['wrong_s']} " \
           f"({hand['direction']};" in text
    assert f"difference in wrong-answer rate {100 * hand['diff']:+.1f}%" in text
    assert f"[{100 * lo:+.1f}%, {100 * hi:+.1f}%]" in text
    assert f"McNemar exact p = {hand['p']:.3g})" in text
    said = "The hypothesis held at this scale" if hand["held"] else "The hypothesis did not hold at this scale"
    assert said in text and ("did not hold" in text) is (not hand["held"])


def random_effects_by_wls(d: np.ndarray, v: np.ndarray, level: float = 0.95) -> dict:
    """DerSimonian-Laird through weighted least squares on an intercept (statsmodels WLS):
    the fixed effect with its scale fixed at 1, tau² from Cochran's Q, then the random-effects
    fit, whose estimated-scale standard error is Hartung-Knapp's (kept no smaller than at scale 1)."""
    k = len(d)
    ones = np.ones((k, 1))
    w = 1 / v
    fe = sm.WLS(d, ones, weights=w).fit(cov_type="fixed scale", cov_kwds={"scale": 1.0})
    q = float(np.sum(w * (d - fe.params[0]) ** 2))
    tau2 = max(0.0, (q - (k - 1)) / (w.sum() - (w**2).sum() / w.sum()))
    re = sm.WLS(d, ones, weights=1 / (v + tau2)).fit()
    se = re.bse[0] * np.sqrt(max(1.0, 1.0 / re.scale))
    half = st.t.ppf(1 - (1 - level) / 2, k - 1) * se
    return {"estimate": float(re.params[0]), "ci": [float(re.params[0] - half), float(re.params[0] + half)],
            "fixed": float(fe.params[0]), "fixed_ci": [float(x) for x in fe.conf_int(alpha=1 - level)[0]],
            "q": q, "q_p": float(st.chi2.sf(q, k - 1)), "tau": float(np.sqrt(tau2))}


def pooled_run(out: Path, per_seed: list[tuple[int, int, int]], n_boot: int = 500) -> tuple[dict, list]:
    """A many-seed run folder (seed-N/ cells and the pooled report) from (both, teacher-only,
    self-only) wrong answers per seed; returns its results and each seed's verdicts."""
    recipe = recipes.load("smoke", [f"seeds={','.join(map(str, range(len(per_seed))))}",
                                    f"report.bootstrap={n_boot}"])
    the_plan = plan.build(recipe)
    verdicts = [paired(*counts, seed=100 + i) for i, counts in enumerate(per_seed)]
    cell_results = [make_run(out / cell.folder, cell.recipe, *verdicts[i]) for i, cell in enumerate(the_plan.cells)]
    return report.write_pooled(out, the_plan, cell_results), verdicts


def per_seed_effects(verdicts: list) -> tuple[np.ndarray, np.ndarray]:
    """Each seed's mean paired difference and the variance of that mean (plug-in, over n)."""
    d = [np.array([t == W for t in ts], float) - np.array([s == W for s in ss], float) for ts, ss in verdicts]
    return np.array([x.mean() for x in d]), np.array([x.var() / len(x) for x in d])


POOLED = {
    "more wrong answers": ([(60, 30, 10), (60, 25, 12), (60, 40, 15), (60, 22, 14), (60, 35, 9)],
                           "bring more wrong answers (as the hypothesis predicts)"),
    "fewer wrong answers": ([(60, 10, 30), (60, 12, 25), (60, 15, 40), (60, 14, 22), (60, 9, 35)],
                            "bring fewer wrong answers (against what the hypothesis predicts)"),
    "undecided": ([(60, 30, 10), (60, 10, 30), (60, 20, 20), (60, 25, 15), (60, 12, 28)], "cannot say whether"),
}


@pytest.mark.parametrize("conclusion", list(POOLED))
def test_a_many_seed_runs_pooled_headline_by_hand(tmp_path, conclusion):
    per_seed, says = POOLED[conclusion]
    res, verdicts = pooled_run(tmp_path, per_seed)
    entry = res["points"][0]
    for cell, (teacher, self_) in zip(res["cells"], verdicts):
        hand = by_hand(teacher, self_)
        assert cell["hypothesis"]["wrong_rate_difference"] == pytest.approx(hand["diff"], abs=1e-12)
        assert cell["hypothesis"]["mcnemar_p"] == pytest.approx(hand["p"], rel=1e-9)
        assert cell["hypothesis"]["held"] is hand["held"]
    d, v = per_seed_effects(verdicts)
    hand = random_effects_by_wls(d, v)
    re = entry["pooled"]["random_effects"]
    assert re["estimate"] == pytest.approx(hand["estimate"], abs=1e-12)
    assert re["ci"] == pytest.approx(hand["ci"], abs=1e-12)
    assert re["fixed_estimate"] == pytest.approx(hand["fixed"], abs=1e-12)
    assert re["fixed_ci"] == pytest.approx(hand["fixed_ci"], abs=1e-12)
    assert re["q_p"] == pytest.approx(hand["q_p"], rel=1e-9)
    lo, hi = hand["ci"]
    assert conclusion == ("more wrong answers" if lo > 0 else "fewer wrong answers" if hi < 0 else "undecided")
    assert entry["conclusion"] == conclusion
    text = flat((tmp_path / "report.md").read_text(encoding="utf-8").split("## Result", 1)[1].split("###")[0])
    assert says in text
    assert (f"by {100 * hand['estimate']:+.1f} points on average (95% interval {100 * lo:+.1f} to "
            f"{100 * hi:+.1f}, seeds as a random effect)") in text
    for other in (s for c, (_, s) in POOLED.items() if c != conclusion):
        assert other not in text


def comparison(stdout: str) -> dict[str, list[str]]:
    """The rows of `kmm report A B`'s comparison table: figure name -> its cells."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^\s*(\S+(?: \S+)*?)\s{2,}(.+?)\s*$", line)
        if m:
            rows[m.group(1)] = re.split(r"\s{2,}", m.group(2))
    return rows


def test_kmm_report_compares_two_different_runs(tmp_path):
    recipe = recipes.load("smoke", ["report.bootstrap=500"])
    runs = {"a": paired(100, 40, 12), "b": paired(80, 10, 30, seed=7)}
    sets_b = {**SETS, "mismatch_rate": 0.25}
    made = {"a": make_run(tmp_path / "a", recipe, *runs["a"]),
            "b": make_run(tmp_path / "b", recipe, *runs["b"], sets=sets_b)}
    assert made["a"]["hypothesis"]["held"] and not made["b"]["hypothesis"]["held"]
    proc = run_kmm("report", str(tmp_path / "a"), str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    rows = comparison(proc.stdout)
    ev = {k: evaluated_of(*v) for k, v in runs.items()}
    changed = 0
    for cond in ("base_student", "self", "teacher", "base_teacher"):
        for verdict in (C, W, A):
            na = [r["verdict"] for r in ev["a"][cond][0]].count(verdict)
            nb = [r["verdict"] for r in ev["b"][cond][0]].count(verdict)
            assert rows[f"{cond} {verdict}"] == [str(na), str(nb), f"{nb - na:+d}"], (cond, verdict)
            changed += nb != na
    assert changed >= 4
    ha, hb = by_hand(*runs["a"]), by_hand(*runs["b"])
    assert rows["mismatch rate"] == ["50.0%", "25.0%"]
    assert rows["wrong-rate diff"] == [f"{100 * ha['diff']:+.1f}%", f"{100 * hb['diff']:+.1f}%"]
    assert rows["McNemar p"] == [f"{ha['p']:.3g}", f"{hb['p']:.3g}"]
    assert rows["hypothesis held"] == ["True", "False"]

    proc = run_kmm("report", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    out = flat(proc.stdout)
    assert f"on its own answers, {hb['wrong_s']} (fewer;" in out
    assert "The hypothesis did not hold at this scale" in out
