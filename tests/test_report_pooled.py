"""The report of a many-seed run, from made-up verdicts (no model runs): results.json holds every
cell and the pooled comparison per grid point, report.md leads with the pooled sentence, and the
forest plot and `kmm report RUN` show it."""

import importlib.util
import json
import random
from types import SimpleNamespace

import pytest

from kmismatch_lite import plan, recipes, report, stats
from kmismatch_lite.qa import scoring
from conftest import run_kmm

pytest.importorskip("statsmodels", reason="needs the stats extra (scipy, statsmodels)")

N = 200
# per seed and condition, the chance of a wrong answer; teacher above self in three of four seeds
WRONG = {0: {"self": 0.30, "teacher": 0.25}, 1: {"self": 0.20, "teacher": 0.30},
         2: {"self": 0.15, "teacher": 0.25}, 3: {"self": 0.20, "teacher": 0.35}}


def _samples(rng: random.Random, p_wrong: float) -> list[dict]:
    return [{"id": f"q{i}", "verdict": scoring.WRONG if rng.random() < p_wrong
             else rng.choice([scoring.CORRECT, scoring.ABSTAINED])} for i in range(N)]


def _evaluated(seed: int) -> dict:
    rng = random.Random(seed)
    out = {}
    for cond in ("base_student", "self", "teacher", "base_teacher"):
        samples = _samples(rng, WRONG[seed].get(cond, 0.4))
        verdicts = [s["verdict"] for s in samples]
        out[cond] = (samples, scoring.tally(verdicts, [False] * N).as_dict())
    return out


@pytest.fixture
def drawn():
    """The figures the test saves, by path (none without matplotlib)."""
    if importlib.util.find_spec("matplotlib") is None:
        yield {}
        return
    from test_figures import figures_drawn

    with figures_drawn() as saved:
        yield saved


@pytest.fixture
def pooled_run(tmp_path, drawn):
    recipe = recipes.load("smoke", ["seeds=0,1,2,3", "sweep.report.bootstrap=500,600"])
    the_plan = plan.build(recipe)
    models = {r: SimpleNamespace(name=recipe["models"][r]) for r in ("student", "teacher")}
    sets = {"n": 10, "teacher_answered": 5, "self_answered": 3, "both_answered": 2, "teacher_only": 3,
            "self_only": 1, "mismatch_rate": 0.6}
    cell_results = []
    for cell in the_plan.cells:
        evaluated = _evaluated(cell.seed)
        res = report.results(cell.recipe, evaluated, sets, models)
        report.write(tmp_path / cell.folder, res, {c: s for c, (s, _) in evaluated.items()})
        cell_results.append(res)
    return tmp_path, report.write_pooled(tmp_path, the_plan, cell_results), the_plan


def test_results_hold_every_cell_and_the_pooled_comparison(pooled_run):
    out, res, the_plan = pooled_run
    assert json.loads((out / "results.json").read_text()) == res
    assert len(res["cells"]) == 8 and res["seeds"] == [0, 1, 2, 3]
    assert [e["point"] for e in res["points"]] == [{"report.bootstrap": 500}, {"report.bootstrap": 600}]
    entry = res["points"][0]
    cells = [c for c in res["cells"] if c["point"] == entry["point"]]
    assert entry["seeds"] == [0, 1, 2, 3]
    # each cell's results are the single-seed results, and its own report sits in its folder
    for c in cells:
        assert (out / c["folder"] / "results.json").is_file() and (out / c["folder"] / "report.md").is_file()
        assert c["hypothesis"]["wrong_teacher"] == c["conditions"]["teacher"]["wrong"]
    p = entry["pooled"]
    assert p["differences"] == pytest.approx([c["hypothesis"]["wrong_rate_difference"] for c in cells])
    pairs = [([r["verdict"] == "wrong" for r in _read(out / c["folder"] / "samples/teacher.jsonl")],
              [r["verdict"] == "wrong" for r in _read(out / c["folder"] / "samples/self.jsonl")]) for c in cells]
    again = stats.pool_seeds(pairs, n_boot=500)
    assert p["random_effects"]["estimate"] == pytest.approx(again["random_effects"]["estimate"])
    assert p["stratified"]["a_only"] == sum(c["hypothesis"]["teacher_wrong_only"] for c in cells)
    # The conclusion from an independent random-effects fit (statsmodels) of the same verdicts.
    from test_headline_run import per_seed_effects, random_effects_by_wls

    verdicts = [tuple(["wrong" if w else "correct" for w in side] for side in pair) for pair in pairs]
    lo, hi = random_effects_by_wls(*per_seed_effects(verdicts))["ci"]
    expected = "more wrong answers" if lo > 0 else "fewer wrong answers" if hi < 0 else "undecided"
    assert entry["conclusion"] == expected


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_leads_with_the_pooled_sentence_then_a_table_per_seed(pooled_run, drawn):
    from test_figures import assert_forest
    from test_headline_run import per_seed_effects, random_effects_by_wls

    out, res, _ = pooled_run
    text = (out / "report.md").read_text()
    result = text.split("## Result\n", 1)[1]
    first = result.strip().splitlines()[0]
    assert "Over 4 seeds" in first and "seeds as a random effect" in first
    assert ("interval includes zero" in first) == (res["points"][0]["conclusion"] == "undecided")
    for seed in range(4):
        assert f"| seed {seed} |" in text
    assert "| random effects |" in text and "Cochran's Q" in text and "I²" in text
    assert "forest.png" in text
    # one figure for the whole run: per grid point, each seed's difference and interval, then the
    # pooled diamond (the seeds' verdicts are the same at both points)
    groups = []
    for entry in res["points"]:
        cells = [c for c in res["cells"] if c["point"] == entry["point"]]
        verdicts = [tuple([r["verdict"] for r in _read(out / c["folder"] / "samples" / f"{cond}.jsonl")]
                          for cond in ("teacher", "self")) for c in cells]
        d, v = per_seed_effects(verdicts)
        hand = random_effects_by_wls(d, v)
        groups.append((f"report.bootstrap={entry['point']['report.bootstrap']}: ",
                       [(f"seed {c['seed']}", d[i], c["hypothesis"]["bootstrap_95ci"]) for i, c in enumerate(cells)],
                       (hand["estimate"], *hand["ci"])))
    assert_forest(drawn[out / "forest.png"], groups)


def test_pooled_sentence_says_what_the_interval_allows():
    base = {"seeds": 5, "seeds_for_2_points": 50,
            "random_effects": {"estimate": 0.04, "ci": [-0.05, 0.13], "tau": 0.065}}
    text = report.pooled_text({}, {"pooled": base, "conclusion": "undecided"})
    assert "+4.0 points" in text and "-5.0 to +13.0" in text and "not evidence of no effect" in text
    assert "between-seed SD is 6.5 points" in text and "about 50 seeds" in text
    above = {**base, "random_effects": {**base["random_effects"], "ci": [0.01, 0.07]}}
    text = report.pooled_text({}, {"pooled": above, "conclusion": "more wrong answers"})
    assert "more wrong answers" in text and "does not say that every seed" in text


def test_kmm_report_prints_the_pooled_answer(pooled_run):
    out, _, _ = pooled_run
    proc = run_kmm("report", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Over 4 seeds" in proc.stdout and "seed 3" in proc.stdout and "random effects" in proc.stdout
    proc = run_kmm("report", str(out / "seed-1" / "report.bootstrap=500"))
    assert proc.returncode == 0 and "base_teacher" in proc.stdout
    proc = run_kmm("report", str(out), str(out))
    assert proc.returncode == 1 and "cell folders" in proc.stderr and proc.stderr.count("\n") == 1
