"""The smoke recipe with two mismatch doses (0 and 1) and knowledge categories, one seed, end to
end on the real bundled models: the dose-1 set fine-tuned and evaluated, dose 0 taken from the
self stages, SliCK's extra prompt evaluated and its sampled answers drawn, the tables and figures
written and printed; a rerun in cheap mode reuses every stage; a rerun with `design.epochs` over
2 epochs fine-tunes again, saving each epoch, and evaluates epoch 1 of every fine-tuned condition."""

import json
import re

import pytest

from conftest import run_kmm
from kmismatch_lite.designs import categories

pytestmark = [pytest.mark.integration, pytest.mark.slow]

pytest.importorskip("llama_cpp", reason="needs the llamacpp extra")
pytest.importorskip("peft", reason="needs the torch extra")
pytest.importorskip("scipy", reason="needs the stats extra")

DESIGN = ("-s", "design.doses=0,1", "-s", "design.categories=slick", "-s", "design.slick_samples=2",
          "-s", "design.slick_prompts=2")


def kmm_run(out, *settings):
    proc = run_kmm("run", "smoke", "--out", str(out), *settings, cwd=out.parent, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def designed(tmp_path_factory):
    out = tmp_path_factory.mktemp("designs") / "run"
    return out, kmm_run(out, *DESIGN)


def test_dose_stages_and_dose_zero_shares_the_self_stages(designed):
    out, proc = designed
    ran = re.findall(r"stage (\S+): running", proc.stderr)
    for stage in ("dose_sets", "finetune/dose-1", "evaluate/dose-1", "slick/prompt-2", "slick/sample-1",
                  "slick/sample-2"):
        assert stage in ran
    assert not any("dose-0" in s for s in ran)
    assert len(ran) == len(set(ran))
    sets = out / "dose_sets"
    assert sets.joinpath("dose-0.jsonl").read_text() == (out / "sets" / "self.jsonl").read_text()
    assert (out / "finetune" / "dose-1" / "adapter.gguf").is_file()


def test_results_hold_the_dose_table_and_categories(designed, tmp_path):
    out, _ = designed
    res = json.loads((out / "results.json").read_text())
    assert set(res["conditions"]) == {"base_student", "self", "teacher", "base_teacher"}
    d = res["dose"]
    assert d["doses"] == [0.0, 1.0]
    assert d["conditions"]["dose-0"] == res["conditions"]["self"]
    dose1 = [json.loads(x)["verdict"] for x in (out / "samples" / "dose-1.jsonl").read_text().splitlines()]
    assert d["response"]["wrong"]["rates"][1] == pytest.approx(dose1.count("wrong") / len(dose1))
    lo, hi = d["response"]["wrong"]["slope_ci"]
    assert lo <= d["response"]["wrong"]["slope"] <= hi
    c = res["categories"]
    assert c["mode"] == "slick" and sum(c["counts"].values()) == res["n_test"]
    assert set(c["counts"]) <= {"HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"}
    assert (c["prompts"], c["samples"]) == (2, 2)
    for cond in ("base_student", "self", "teacher", "base_teacher", "dose-0", "dose-1"):
        assert sum(t["wrong"] for t in c["by_condition"][cond].values()) == d["conditions"].get(
            cond, res["conditions"].get(cond))["wrong"]
    cats = json.loads((out / "categories.json").read_text())
    assert len(cats) == res["n_test"]
    from test_figures import assert_categories_figure, assert_dose_figure

    drawn = redrawn(out, res, tmp_path, ("dose.png", "categories.png"))
    verdicts = {cond: [r["verdict"] for r in samples(out, cond)] for cond in ("self", "dose-1", "teacher")}
    assert_dose_figure(drawn["dose.png"], d, {0.0: verdicts["self"], 1.0: verdicts["dose-1"]}, verdicts["teacher"])
    # Per category, each condition's wrong answers, counted here from categories.json and the samples.
    conds = list(c["by_condition"])
    expected = {cat: {cond: sum(r["verdict"] == "wrong" and cats[r["id"]] == cat
                                for r in samples(out, "self" if cond == "dose-0" else cond)) for cond in conds}
                for cat in ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown") if cat in c["counts"]}
    assert_categories_figure(drawn["categories.png"], expected)
    report = (out / "report.md").read_text()
    assert "## Mismatch dose" in report and "## Knowledge categories" in report


def verdicts(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_sampled_stages_record_their_seeds_and_the_categories_follow_the_rules(designed):
    out, _ = designed
    manifest = json.loads((out / "manifest.json").read_text())
    seeds = [categories.sample_settings(0, j).seed for j in (1, 2)]
    assert manifest["sampling"]["seeds"] == {"0": seeds} and manifest["sampling"]["truncation"] == "none"
    sampled = []
    for j, seed in zip((1, 2), seeds):
        m = json.loads((out / "slick" / f"sample-{j}" / "metrics.json").read_text())
        assert (m["sampling"]["temperature"], m["sampling"]["seed"]) == (categories.TEMPERATURE, seed)
        assert m["prompt"] == json.loads((out / "evaluate" / "base_student" / "metrics.json").read_text())["prompt"]
        sampled.append(verdicts(out / "slick" / f"sample-{j}" / "samples.jsonl"))
    greedy = [verdicts(out / "evaluate" / "base_student" / "samples.jsonl"),
              verdicts(out / "slick" / "prompt-2" / "samples.jsonl")]
    expected = categories.categorize(categories.verdicts_by_question(greedy),
                                     categories.verdicts_by_question(sampled))
    assert json.loads((out / "categories.json").read_text()) == expected


def test_kmm_report_prints_the_designs(designed):
    out, _ = designed
    proc = run_kmm("report", str(out), cwd=out.parent)
    assert proc.returncode == 0, proc.stderr
    assert "Mismatch dose" in proc.stdout and "per unit dose" in proc.stdout
    counts = json.loads((out / "results.json").read_text())["categories"]["counts"]
    assert "Knowledge categories" in proc.stdout and all(cat in proc.stdout for cat in counts)


def test_cheap_categories_rerun_reuses_every_stage(designed):
    out, _ = designed
    proc = kmm_run(out, *DESIGN[:4], "-s", "design.categories=cheap")
    assert "running" not in proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["categories"]["mode"] == "cheap" and set(res["categories"]["counts"]) <= {"Known", "Unknown"}
    base = [json.loads(x)["verdict"] for x in (out / "samples" / "base_student.jsonl").read_text().splitlines()]
    assert res["categories"]["counts"].get("Known", 0) == base.count("correct")


def test_a_dose_added_later_runs_only_its_own_stages(designed):
    out, _ = designed
    proc = kmm_run(out, "-s", "design.doses=0,0.5,1")
    ran = re.findall(r"stage (\S+): running", proc.stderr)
    assert sorted(ran) == ["dose_sets", "evaluate/dose-0.5", "finetune/dose-0.5"]
    res = json.loads((out / "results.json").read_text())
    assert res["dose"]["doses"] == [0.0, 0.5, 1.0] and "categories" not in res
    assert not (out / "categories.png").exists() and not (out / "categories.json").exists()
    assert (out / "dose.png").is_file()


def test_epochs_save_every_epoch_and_evaluate_the_ones_before_the_last(designed, tmp_path):
    out, _ = designed
    proc = kmm_run(out, "-s", "design.doses=0,1", "-s", "design.epochs=true", "-s", "finetune.lora.epochs=2")
    ran = re.findall(r"stage (\S+): running", proc.stderr)
    conds = ("self", "teacher", "dose-1")
    for cond in conds:                         # save_epochs is in the fine-tune's key: trained again
        assert f"finetune/{cond}" in ran and f"evaluate/{cond}-epoch-1" in ran
        assert (out / "finetune" / cond / "epochs" / "epoch-1" / "adapter.gguf").is_file()
    assert not any("epoch-2" in s or "dose-0" in s for s in ran)
    info = json.loads((out / "finetune" / "self" / "adapter" / "kmm_finetune.json").read_text())
    assert info["saved_epochs"] == [1, 2]
    res = json.loads((out / "results.json").read_text())
    e = res["epochs"]
    assert e["epochs"] == 2 and not e["dev_split"] and list(e["conditions"]) == list(conds)
    for cond in conds:
        first, last = e["conditions"][cond]["by_epoch"]
        own = res["conditions"].get(cond) or res["dose"]["conditions"][cond]
        assert {k: last["counts"][0][k] for k in ("correct", "wrong", "abstained")} == {
            k: own[k] for k in ("correct", "wrong", "abstained")}
        verdicts = [json.loads(x)["verdict"] for x in (out / "samples" / f"{cond}-epoch-1.jsonl").read_text().splitlines()]
        assert first["counts"][0]["wrong"] == verdicts.count("wrong") and first["counts"][0]["n"] == res["n_test"]
        lo, hi = first["rates_ci"]["wrong"]
        assert lo <= first["rates"]["wrong"] <= hi
    from test_figures import assert_epochs_figure

    drawn = redrawn(out, res, tmp_path, ("epochs.png",))
    rate = {cond: [100 * x["rates"]["wrong"] for x in section["by_epoch"]] for cond, section in e["conditions"].items()}
    for cond in conds:       # each epoch's drawn rate is its samples' own share of wrong answers
        first = [json.loads(x)["verdict"] for x in (out / "samples" / f"{cond}-epoch-1.jsonl").read_text().splitlines()]
        assert rate[cond][0] == pytest.approx(100 * first.count("wrong") / len(first))
    assert_epochs_figure(drawn["epochs.png"], rate)
    assert "## Training length" in (out / "report.md").read_text()
    printed = run_kmm("report", str(out), cwd=out.parent)
    assert printed.returncode == 0 and "Training length" in printed.stdout


def samples(out, cond: str) -> list[dict]:
    return [json.loads(x) for x in (out / "samples" / f"{cond}.jsonl").read_text().splitlines() if x]


def redrawn(out, res: dict, tmp_path, names: tuple[str, ...]) -> dict:
    """The design figures drawn again from results.json: each equals the run's file byte for byte,
    so what they are checked to hold is what the run wrote."""
    from kmismatch_lite import report_designs
    from test_figures import figures_drawn

    again = tmp_path / "again"
    again.mkdir(exist_ok=True)
    with figures_drawn() as drawn:
        report_designs.figures([("", res)], res, again)
    for name in names:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    return {name: drawn[again / name] for name in names}
