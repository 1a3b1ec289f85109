"""The recipe's [design] without a model: its settings checked strictly, the stages it adds to
the plan (dose 0 sharing the self stages), and its results, tables and figures from hand-made
evaluations."""

from collections import Counter

import numpy as np
from scipy import stats as scipy_stats

import pytest

from kmismatch_lite import designs, plan, recipes, report_designs, settings
from kmismatch_lite.designs import categories, epoch_curve
from kmismatch_lite.qa import scoring
from kmismatch_lite.designs import knowledge_categories, mismatch_dose, paper
from kmismatch_lite.errors import KmmError
from kmismatch_lite.io import write_jsonl

C, W, A = scoring.CORRECT, scoring.WRONG, scoring.ABSTAINED


def load(*settings):
    return recipes.load("smoke", list(settings))


# --- recipe settings ---

def test_design_is_off_by_default_and_doses_parse_from_the_command_line():
    r = load()
    assert r["design"] == {"doses": [], "categories": "", "slick_prompts": 4, "slick_samples": 4, "epochs": False}
    assert list(designs.stage_records(settings.of(r))) == list(plan.stage_table(r)) == [
        "data", "generate/teacher", "generate/student", "sets", "finetune/self", "finetune/teacher",
        "evaluate/base_student", "evaluate/self", "evaluate/teacher", "evaluate/base_teacher"]
    assert load("design.doses=0,0.5,1")["design"]["doses"] == [0.0, 0.5, 1.0]
    assert load("design.doses=0,1", "design.doses=")["design"]["doses"] == []


@pytest.mark.parametrize("settings, message", [
    (["design.doses=0,1.5"], "outside"),
    (["design.doses=0.5,0.5"], "twice"),
    (["design.doses=0.5"], "at least two doses"),
    (["design.categories=all"], "unknown mode 'all'"),
    (["design.categories=slick", "design.slick_samples=0", "design.slick_prompts=0"], "slick_prompts must be >= 1"),
    (["design.categories=slick", "design.slick_samples=0", "data.shots=0"], "different sets"),
    (["design.doses=0,x"], "bad value"),
    (["sweep.design.categories=cheap,slick"], "design settings cannot be swept"),
    (["design.dose=0,1"], "unknown setting 'design.dose'"),
    (["design.epochs=maybe"], "expected bool"),
    (["design.epochs=true"], "design.epochs = true evaluates every epoch's adapter, but finetune.lora.epochs = 1"),
    (["design.epochs=true", "finetune.lora.epochs=2", "sweep.finetune.lora.epochs=1,2"], "sweep finetune.lora.epochs=1"),
])
def test_bad_design_settings_name_the_problem(settings, message):
    with pytest.raises(KmmError, match=message):
        load(*settings)


def test_doses_in_a_recipe_file_must_be_numbers(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text((recipes.RECIPES_DIR / "smoke.toml").read_text() + '\n[design]\ndoses = [0, "1"]\n')
    with pytest.raises(KmmError, match="list of numbers"):
        recipes.load(str(path))
    path.write_text((recipes.RECIPES_DIR / "smoke.toml").read_text() + '\n[design]\ndoses = 1\n')
    with pytest.raises(KmmError, match="'design.doses' must be list"):
        recipes.load(str(path))


def test_epochs_in_a_recipe_file_must_be_a_boolean(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text((recipes.RECIPES_DIR / "smoke.toml").read_text() + '\n[design]\nepochs = 1\n')
    with pytest.raises(KmmError, match="'design.epochs' must be bool, got 1"):
        recipes.load(str(path))


def test_the_bundled_dose_recipe_loads():
    r = recipes.load("mismatch-dose")
    assert r["seeds"] == [0, 1, 2] and r["design"]["doses"] == [0, 0.25, 0.5, 0.75, 1]
    assert r["design"]["epochs"] is True
    assert r["design"]["categories"] == "slick" and r["design"]["slick_samples"] == 4


# --- the plan ---

def added(recipe):
    """The stages a recipe's design adds to the paper's."""
    s = settings.of(recipe)
    paper_stages = [r.name for r in paper.stages(s, [])]
    return [n for n in designs.stage_records(s) if n not in paper_stages]


def test_doses_add_one_finetune_and_evaluation_per_dose_and_dose_zero_is_the_self_stage():
    p = plan.build(load("seeds=0,1", "design.doses=0,0.5,1"))
    counts = Counter(s.name for s in p.stages())
    for name in ("dose_sets", "finetune/dose-0.5", "evaluate/dose-0.5", "finetune/dose-1", "evaluate/dose-1"):
        assert counts[name] == 2, name
    assert "finetune/dose-0" not in counts and "evaluate/dose-0" not in counts
    stages = p.cells[1].stages
    assert stages["finetune/dose-0"] is stages["finetune/self"]
    assert stages["evaluate/dose-0"].folder == "seed-1/evaluate/self"
    assert stages["finetune/dose-1"].needs == {"dose_sets": "seed-1/dose_sets"}
    assert stages["dose_sets"].needs == {"data": "seed-1/data", "generate/teacher": "seed-1/generate/teacher",
                                         "generate/student": "seed-1/generate/student"}


def test_slick_adds_one_stage_per_extra_prompt_and_cheap_adds_none():
    r = load("design.categories=slick", "design.slick_samples=0", "design.slick_prompts=3")
    assert added(r) == ["slick/prompt-2", "slick/prompt-3"]
    assert added(load("design.categories=cheap")) == []


def test_slick_samples_add_one_sampled_stage_each_per_seed():
    p = plan.build(load("seeds=0,1", "design.categories=slick", "design.slick_prompts=2"))
    counts = Counter(s.name for s in p.stages())
    assert [n for n in counts if n.startswith("slick/")] == ["slick/prompt-2", *(f"slick/sample-{j}" for j in range(1, 5))]
    assert all(counts[n] == 2 for n in counts if n.startswith("slick/"))
    assert p.cells[1].stages["slick/sample-3"].folder == "seed-1/slick/sample-3"
    assert p.cells[1].stages["slick/sample-3"].needs == {"data": "seed-1/data"}


def test_each_sampled_run_has_its_own_seed_at_slicks_temperature_recorded_for_the_manifest():
    settings = {(s, j): categories.sample_settings(s, j) for s in (0, 1) for j in (1, 2, 3)}
    assert all(x.temperature == categories.TEMPERATURE for x in settings.values())
    assert len({x.seed for x in settings.values()}) == len(settings)
    assert categories.sample_settings(1, 2) == settings[1, 2]
    record = categories.sampling_record(3, [0, 1])
    assert record["stages"] == ["slick/sample-1", "slick/sample-2", "slick/sample-3"]
    assert (record["temperature"], record["truncation"]) == (categories.TEMPERATURE, "none")
    assert record["seeds"]["1"] == [settings[1, j].seed for j in (1, 2, 3)]


def test_epochs_add_an_evaluation_per_finetuned_condition_and_epoch_before_the_last():
    assert not any("-epoch-" in n for n in plan.stage_table(load("finetune.lora.epochs=3")))
    p = plan.build(load("seeds=0,1", "design.epochs=true", "finetune.lora.epochs=3", "design.doses=0,1"))
    added = [n for n in p.cells[0].stages if "-epoch-" in n]
    assert added == [f"evaluate/{c}-epoch-{n}" for c in ("self", "teacher", "dose-1") for n in (1, 2)]
    stage = p.cells[1].stages["evaluate/dose-1-epoch-2"]
    assert stage.folder == "seed-1/evaluate/dose-1-epoch-2"
    assert stage.needs == {"data": "seed-1/data", "finetune/dose-1": "seed-1/finetune/dose-1"}
    # The stage table stays data: each added stage reads the student's evaluate settings.
    table = plan.stage_table(p.cells[0].recipe)
    assert table["evaluate/self-epoch-1"] == (("models.student", "evaluate"), ("data", "finetune/self"))


def test_with_a_dev_split_every_epoch_is_evaluated():
    r = load("design.epochs=true", "finetune.lora.epochs=2", "finetune.lora.dev_fraction=0.1")
    assert [n for n in plan.stage_table(r) if "-epoch-" in n] == [
        "evaluate/self-epoch-1", "evaluate/self-epoch-2", "evaluate/teacher-epoch-1", "evaluate/teacher-epoch-2"]


def test_a_finetune_stage_key_changes_when_epochs_are_saved(tmp_path):
    from types import SimpleNamespace

    from kmismatch_lite.designs.unit import StageContext

    model = SimpleNamespace(name="m", gguf_path=None, url="http://x")
    keys = {}
    for on in (False, True):
        cell = plan.build(load("finetune.lora.epochs=2", f"design.epochs={on}")).cells[0]
        stage = cell.stages["finetune/self"]
        ctx = StageContext(cell.settings, {"student": model, "teacher": model}, {"student": "m", "teacher": "m"},
                           tmp_path, stage.folder, {"sets": (tmp_path / "sets", "k")})
        keys[on] = stage.record.inputs(ctx)
    assert keys[False]["lora"]["save_epochs"] is False and keys[True]["lora"]["save_epochs"] is True
    assert {k: v for k, v in keys[False].items() if k != "lora"} == {k: v for k, v in keys[True].items() if k != "lora"}


def test_a_finetune_sweep_gives_dose_finetunes_per_point_and_dose_sets_per_seed():
    p = plan.build(load("seeds=0", "design.doses=0,1", "sweep.finetune.lora.rank=4,8"))
    counts = Counter(s.name for s in p.stages())
    assert counts["dose_sets"] == 1 and counts["finetune/dose-1"] == 2 and counts["evaluate/dose-1"] == 2
    assert p.cells[1].stages["finetune/dose-1"].folder == "seed-0/finetune.lora.rank=8/finetune/dose-1"


# --- results, tables and figures from hand-made evaluations ---

def rows(verdicts):
    return [{"id": f"q{i}", "answers": ["Paris"], "output": "Paris" if v == C else "x" if v == W else "I don't know",
             "verdict": v} for i, v in enumerate(verdicts)]


def metrics(samples):
    t = scoring.tally([s["verdict"] for s in samples], [s["verdict"] == C for s in samples])
    return t.as_dict()


def evaluated(shift=0):
    base = [C, C, W, W, W, A]
    table = {"base_student": base, "self": [C, C, A, A, W, A], "teacher": [C, A, W, W, A, A],
             "dose-0": [C, C, A, A, W, A], "dose-1": [C, W, W, W, W, A], "base_teacher": [C, C, C, W, W, A]}
    table["dose-1"] = table["dose-1"][shift:] + table["dose-1"][:shift]
    return {c: (rows(v), metrics(rows(v))) for c, v in table.items()}


EPOCHS = ("design.epochs=true", "finetune.lora.epochs=2")


def epoch_one(ev):
    """Each fine-tuned condition's epoch-1 answers: one wrong answer fewer than its own."""
    out = {}
    for cond in ("self", "teacher", "dose-1"):
        verdicts = [r["verdict"] for r in ev[cond][0]]
        if W in verdicts:
            verdicts[verdicts.index(W)] = A
        out[cond] = {1: (rows(verdicts), metrics(rows(verdicts)))}
    return out, {cond: 2 for cond in out}


def cell(ev, categories="cheap", epochs=False):
    recipe = load("design.doses=0,1", f"design.categories={categories}", *(EPOCHS if epochs else ()))
    cats = {r["id"]: "Known" if r["verdict"] == C else "Unknown" for r in ev["base_student"][0]}
    stats = {n: {"mismatch_answered": k, "mismatch_pool": 3} for n, k in (("dose-0", 0), ("dose-1", 3))}
    s = settings.of(recipe)
    out = {"dose": mismatch_dose.section(s, ev, stats), "categories": knowledge_categories.section(s, ev, cats)}
    if epochs:
        out["epochs"] = epoch_curve.cell_section(recipe, ev, epoch_one(ev))
    return out


def test_cell_results_hold_rates_slope_and_categories():
    res = cell(evaluated())
    d = res["dose"]
    assert d["doses"] == [0.0, 1.0] and d["mismatch_answered"] == [0, 3]
    wrong = d["response"][W]
    assert wrong["rates"] == pytest.approx([1 / 6, 4 / 6]) and wrong["slope"] == pytest.approx(0.5)
    assert wrong["slope_ci"][0] <= 0.5 <= wrong["slope_ci"][1]
    c = res["categories"]
    assert c["mode"] == "cheap" and c["counts"] == {"Known": 2, "Unknown": 4}
    assert c["by_condition"]["dose-1"]["Known"]["wrong"] == 1
    assert c["by_condition"]["dose-1"]["Unknown"]["share_of_wrong"] == pytest.approx(3 / 4)


def test_cell_results_hold_each_conditions_verdicts_by_epoch(tmp_path):
    ev = evaluated()
    e = cell(ev, epochs=True)["epochs"]
    assert e["epochs"] == 2 and e["seeds"] == 1 and not e["dev_split"]
    assert list(e["conditions"]) == ["self", "teacher", "dose-1"]
    dose1 = e["conditions"]["dose-1"]
    assert dose1["kept_epoch"] == [2] and [x["epoch"] for x in dose1["by_epoch"]] == [1, 2]
    first, last = dose1["by_epoch"]
    assert first["counts"] == [{"seed": 0, "samples": "dose-1-epoch-1", "n": 6, "correct": 1, "wrong": 3,
                                "abstained": 2}]
    assert last["counts"][0]["samples"] == "dose-1" and last["counts"][0]["wrong"] == 4   # its own evaluation
    assert last["rates"][W] == pytest.approx(4 / 6) and first["rates"][W] == pytest.approx(3 / 6)
    lo, hi = last["rates_ci"][W]
    assert lo <= 4 / 6 <= hi and hi - lo > 0
    res = {"student": "s", "teacher": "t", **cell(ev, epochs=True)}
    title, columns, table, text = report_designs.tables(res)[-1]
    assert title.startswith("Training length") and columns[1] == "epoch"
    assert table[4][:5] == ["dose-1", "1", "1", "3", "2"] and table[5][5].startswith("66.7% [")
    assert "dose-1 50.0% after epoch 1, 66.7% after epoch 2" in text and "Epoch 2 is the condition's own" in text
    assert "## Training length" in report_designs.markdown(res) and "(epochs.png)" in report_designs.markdown(res)
    from test_figures import errorbars, figures_drawn

    with figures_drawn() as drawn:
        report_designs.figures([("", res)], res, tmp_path)
    assert set(drawn) == {tmp_path / f"{k}.png" for k in ("dose", "categories", "epochs")}
    rates_axes, difference_axes = drawn[tmp_path / "epochs.png"].axes
    assert list(errorbars(rates_axes)) == ["self", "teacher", "dose-1"]
    assert list(errorbars(difference_axes)) == ["teacher minus self"]


def hand_difference(teacher: list[str], self_: list[str]) -> tuple[float, float]:
    """Mean paired difference in wrong answers and its standard error, worked out by hand."""
    d = np.array([(t == W) - (s == W) for t, s in zip(teacher, self_)], dtype=float)
    return d.mean(), np.sqrt(((d - d.mean()) ** 2).mean() / len(d))


def test_one_seeds_teacher_minus_self_by_epoch_has_its_paired_normal_interval():
    ev = evaluated()
    e = cell(ev, epochs=True)["epochs"]
    first, _ = epoch_one(ev)
    verdicts = {1: {c: [r["verdict"] for r in first[c][1][0]] for c in ("teacher", "self")},
                2: {c: [r["verdict"] for r in ev[c][0]] for c in ("teacher", "self")}}
    assert [d["epoch"] for d in e["difference"]] == [1, 2]
    z = scipy_stats.norm.ppf(0.975)
    for d in e["difference"]:
        mean, se = hand_difference(verdicts[d["epoch"]]["teacher"], verdicts[d["epoch"]]["self"])
        assert d["seeds"] == [0] and d["method"] == "paired normal"
        assert d["estimate"] == pytest.approx(mean) and d["standard_errors"] == [pytest.approx(se)]
        assert d["ci"] == pytest.approx([mean - z * se, mean + z * se])
    assert e["difference"][0]["estimate"] == pytest.approx(1 / 6) and e["difference"][1]["estimate"] == pytest.approx(1 / 6)
    _, _, _, text = report_designs.tables({"student": "s", "teacher": "t", **cell(ev, epochs=True)})[-1]
    assert "Teacher minus self in wrong-answer rate (one seed, 95% paired normal intervals): epoch 1 +16.7 points" in text


def test_pooled_categories_sum_counts_and_recompute_shares(tmp_path):
    cells = []
    for seed, shift in enumerate((0, 1)):
        ev = evaluated(shift)
        folder = tmp_path / f"seed-{seed}"
        for cond, (samples, _) in ev.items():
            write_jsonl(folder / "samples" / f"{cond}.jsonl", samples)
        cells.append({"folder": f"seed-{seed}", "conditions": {c: m for c, (_, m) in ev.items()}, **cell(ev)})
    pooled = designs.pooled(tmp_path, cells, n_boot=200)
    assert pooled["dose"]["response"][W]["seeds"] == 2
    assert pooled["dose"]["mismatch_answered"] == [0, 3]
    k = pooled["categories"]["by_condition"]["dose-1"]
    per_seed = [c["categories"]["by_condition"]["dose-1"]["Known"]["wrong"] for c in cells]
    assert k["Known"]["n"] == 4 and k["Known"]["wrong"] == sum(per_seed)
    assert sum(v["share_of_wrong"] for v in k.values()) == pytest.approx(1.0)
    assert pooled["categories"]["seeds"] == 2


def test_tables_markdown_and_figures(tmp_path):
    res = {"student": "s", "teacher": "t", **cell(evaluated(), "slick")}
    titles = [t[0] for t in report_designs.tables(res)]
    assert titles[0].startswith("Mismatch dose") and titles[1].endswith("SliCK, 4 few-shot prompts greedily, 4 samples at temperature 0.5")
    dose_rows = mismatch_dose.rows(res["dose"])
    assert dose_rows[1][:2] == ["1", "3 of 3"] and dose_rows[1][3].startswith("66.7% [")
    assert "+50.0 points per unit dose" in mismatch_dose.text(res["dose"])
    md = report_designs.markdown(res)
    assert "## Mismatch dose" in md and "| dose-1 | 1 / 2 (25%) | 3 / 4 (75%) |" in md and "(dose.png)" in md
    from test_figures import bars, errorbars, figures_drawn, only_axes

    with figures_drawn() as drawn:
        report_designs.figures([("", res)], res, tmp_path)
    assert set(drawn) == {tmp_path / "dose.png", tmp_path / "categories.png"}
    assert list(errorbars(only_axes(drawn[tmp_path / "dose.png"]))) == [C, W, A]
    assert list(bars(only_axes(drawn[tmp_path / "categories.png"]))) == ["Known", "Unknown"]
    assert report_designs.markdown({}) == "" and report_designs.tables({}) == []


def test_a_many_seed_report_pools_the_designs_and_kmm_report_prints_them(tmp_path):
    from types import SimpleNamespace

    from conftest import run_kmm
    from kmismatch_lite import report

    p = plan.build(load("seeds=0,1", "design.doses=0,1", "design.categories=cheap", "report.bootstrap=200", *EPOCHS))
    models = {role: SimpleNamespace(name=role) for role in ("student", "teacher")}
    results = []
    for c, shift in zip(p.cells, (0, 2)):
        ev = evaluated(shift)
        by_epoch = epoch_one(ev)
        epoch_samples = {f"{cond}-epoch-1": e[1][0] for cond, e in by_epoch[0].items()}
        for cond, samples in {**{k: s for k, (s, _) in ev.items()}, **epoch_samples}.items():
            write_jsonl(tmp_path / c.folder / "samples" / f"{cond}.jsonl", samples)
        paper_ev = {k: ev[k] for k in ("base_student", "self", "teacher", "base_teacher")}
        res = report.results(c.recipe, paper_ev, {"n": 6, "mismatch_rate": 0.5}, models)
        results.append({**res, **cell(ev, epochs=True)})
    res = report.write_pooled(tmp_path, p, results)
    entry = res["points"][0]
    assert entry["dose"]["response"][W]["seeds"] == 2 and entry["categories"]["seeds"] == 2
    epoch = entry["epochs"]["conditions"]["dose-1"]["by_epoch"][0]
    assert entry["epochs"]["seeds"] == 2 and [c["seed"] for c in epoch["counts"]] == [0, 1]
    assert epoch["rates"][W] == pytest.approx(sum(c["wrong"] for c in epoch["counts"]) / 12)
    # Both seeds' teacher and self answers agree, so tau² is 0 and the random-effects interval is
    # the t interval (1 df) at the fixed-effect standard error: sqrt(v / 2) for two equal variances.
    ev = evaluated()
    mean, se = hand_difference([r["verdict"] for r in ev["teacher"][0]], [r["verdict"] for r in ev["self"][0]])
    last = entry["epochs"]["difference"][-1]
    assert last["epoch"] == 2 and last["seeds"] == [0, 1] and last["method"] == "random effects"
    assert last["estimate"] == pytest.approx(mean) and last["tau"] == pytest.approx(0)
    half = scipy_stats.t.ppf(0.975, 1) * se / np.sqrt(2)
    assert last["ci"] == pytest.approx([mean - half, mean + half])
    md = (tmp_path / "report.md").read_text()
    assert "#### Mismatch dose" in md and "#### Knowledge categories" in md and "Over 2 seeds" in md
    assert "#### Training length" in md and "over 2 seeds, 95% intervals from a hierarchical bootstrap" in md
    assert md.count("(dose.png)") == 1 and md.count("(epochs.png)") == 1
    assert all((tmp_path / f"{k}.png").is_file() for k in ("dose", "categories", "epochs"))
    proc = run_kmm("report", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "Mismatch dose" in proc.stdout and "summed over seeds" in proc.stdout
    assert "Training length" in proc.stdout and "wrong-answer rate (95%)" in proc.stdout


def test_with_a_dev_split_each_epoch_carries_its_dev_loss_and_the_table_shows_it():
    ev = evaluated()
    recipe = load(*EPOCHS, "finetune.lora.dev_fraction=0.25")
    first, _ = epoch_one(ev)
    by_epoch = {c: {1: first[c][1], 2: ev[c]} for c in ("self", "teacher")}
    losses = {"self": {1: 1.25, 2: 1.5}, "teacher": {1: 2.0, 2: 1.75}}
    e = epoch_curve.cell_section(recipe, ev, (by_epoch, {"self": 1, "teacher": 2}), losses)
    assert e["dev_split"] and [x["dev_loss"] for x in e["conditions"]["self"]["by_epoch"]] == [[1.25], [1.5]]
    rows = epoch_curve.rows(e)
    assert epoch_curve.COLUMNS[-1] == "dev loss" and [r[-1] for r in rows] == ["1.2500", "1.5000", "2.0000", "1.7500"]
    no_dev = epoch_curve.cell_section(load(*EPOCHS), ev, epoch_one(ev))
    assert all(r[-1] == "-" for r in epoch_curve.rows(no_dev))
