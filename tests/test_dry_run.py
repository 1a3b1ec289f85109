"""`kmm run --dry-run`: the plan before a run. Its counts equal what the run then does (answers per
stage, training steps per fine-tune), a finished run's stages are all planned for reuse, a hub
recipe is planned offline from its cards, and nothing is ever written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import bundled_model, llama_cpp_usable, run_kmm
from kmismatch_lite import dry_run, recipes


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_a_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    res = run_kmm("run", "smoke", "--dry-run", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "1 cell, 10 stages: 10 to run, 0 to reuse." in res.stdout
    assert "training steps" in res.stdout and "Estimated time:" in res.stdout and "Peak memory:" in res.stdout


def test_a_hub_recipe_is_planned_offline_from_its_cards(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": None}
    res = run_kmm("run", "gpu16-qwen", "--dry-run", "--out", str(tmp_path / "run"), env=env)
    assert res.returncode == 0, res.stderr
    assert "Not on disk: model 'qwen2.5-1.5b-instruct' is not available offline" in res.stdout
    assert "Not on disk: model 'qwen2.5-7b-instruct' is not available offline" in res.stdout
    assert not (tmp_path / "run").exists()


def test_hub_recipe_counts_come_from_its_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    r = recipes.load("gpu16-qwen")
    plan = dry_run.plan_run(r, tmp_path / "run")
    by = {p.folder: p for p in plan["stages"]}
    lora = r["finetune"]["lora"]
    assert plan["cells"] == len(r["seeds"]) == 3
    assert by["seed-0/generate/teacher"].answers == r["data"]["train"] == 5000
    assert by["seed-2/evaluate/base_student"].answers == r["data"]["test"] == 1500
    # A dev tenth held out, the rest trained on every epoch: an upper bound, patience may stop early.
    trained = 5000 - round(5000 * lora["dev_fraction"])
    assert by["seed-1/finetune/self"].steps == lora["epochs"] * -(-trained // lora["batch_size"]) == 4 * 282
    assert by["seed-1/finetune/self"].seconds is None      # a GPU fine-tune has no CPU reference
    assert all(p.status == "run" for p in plan["stages"]) and len(plan["missing"]) == 2


def test_a_question_set_not_at_hand_needs_its_counts(tmp_path):
    res = run_kmm("run", "gpu16-qwen", "--dry-run", "-s", "data.train=0", "--out", str(tmp_path / "r"),
                  env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": None})
    assert res.returncode == 1
    assert res.stderr.strip() == ("error: --dry-run: 'triviaqa' is not at hand, so data.train and data.test must be "
                                  "set to count its questions")


def test_a_fine_tune_with_an_early_stop_is_an_upper_bound_and_the_folder_says_how_early(tmp_path):
    """Timings from a finished sibling fine-tune (its record written by hand here): seconds per
    training token at the same thread count, in proportion to threads at another, and the share
    of its planned steps it ran (6 of 4 epochs x 3 batches of 8 among 24 - 6 dev examples)."""
    reason = bundled_model("smollm2-135m-instruct") or bundled_model("gemma-3-270m")
    if reason:
        pytest.skip(reason)
    recipe = recipes.load("smoke", ["finetune.lora.epochs=4", "finetune.lora.patience=1",
                                    "finetune.lora.dev_fraction=0.25"])
    out = tmp_path / "run"
    done = out / "finetune" / "teacher"
    (done / "adapter").mkdir(parents=True)
    (done / "stage.json").write_text(json.dumps({"seconds": 120.0, "threads": 1}))
    (done / "adapter" / "kmm_finetune.json").write_text(json.dumps(
        {"tokens": 600, "steps": 6, "examples": 24,
         "settings": {"epochs": 4, "batch_size": 8, "dev_fraction": 0.25, "patience": 1}}))
    files = _tree(out)
    one = {p.folder: p for p in dry_run.plan_run(recipe, out, threads=1)["stages"]}["finetune/self"]
    assert one.status == "run" and one.early_stop and one.steps == 12 and one.timed_from == "run folder"
    assert one.seconds == pytest.approx(120 / 600 * one.train_tokens)
    assert one.likely_seconds == pytest.approx(one.seconds * 6 / 12)
    two = {p.folder: p for p in dry_run.plan_run(recipe, out, threads=2)["stages"]}["finetune/self"]
    assert two.seconds == pytest.approx(120 / 600 * two.train_tokens / 2)
    lines = " ".join(dry_run.summary(dry_run.plan_run(recipe, out, threads=1)))
    assert "at most 24 training steps" in lines and "Estimated time: at most " in lines
    assert "if they stop as early as this run folder's finished ones" in lines
    assert _tree(out) == files
    # without patience every epoch runs: no bound, no early-stop line
    plain = recipes.load("smoke", ["finetune.lora.epochs=4", "finetune.lora.dev_fraction=0.25"])
    lines = " ".join(dry_run.summary(dry_run.plan_run(plain, out, threads=1)))
    assert "at most 24 training steps" not in lines and "early stop" not in lines


@pytest.mark.integration
@pytest.mark.slow
def test_dry_run_counts_equal_what_the_run_does_and_a_finished_run_is_all_reuse(tmp_path):
    reason = llama_cpp_usable() or bundled_model("smollm2-135m-instruct") or bundled_model("gemma-3-270m")
    if reason:
        pytest.skip(reason)
    pytest.importorskip("peft", reason="needs the torch extra")
    out = tmp_path / "run"
    recipe = recipes.load("smoke", ["finetune.lora.dev_fraction=0.25"])
    before = dry_run.plan_run(recipe, out)
    assert not out.exists()
    res = run_kmm("run", "smoke", "-s", "finetune.lora.dev_fraction=0.25", "--out", str(out), timeout=1800)
    assert res.returncode == 0, res.stderr
    for p in before["stages"]:
        assert p.status == "run"
        folder = out / p.folder
        if p.answers:
            lines = (folder / "samples.jsonl").read_text(encoding="utf-8").splitlines()
            assert p.answers == len(lines), p.folder
        if p.group == "finetune":
            info = json.loads((folder / "adapter" / "kmm_finetune.json").read_text(encoding="utf-8"))
            assert p.steps == info["steps"] and p.steps > 0, p.folder
    files = _tree(out)
    after = dry_run.plan_run(recipe, out)
    assert [p.status for p in after["stages"]] == ["reuse"] * len(before["stages"])
    assert _tree(out) == files
    res = run_kmm("run", "smoke", "-s", "finetune.lora.dev_fraction=0.25", "--dry-run", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "10 stages: 0 to run, 10 to reuse." in res.stdout and _tree(out) == files
    # A stage to run again is timed from the run folder's own finished stage of its kind and model.
    shutil.rmtree(out / "evaluate" / "self")
    again = {p.folder: p for p in dry_run.plan_run(recipe, out)["stages"]}
    assert again["evaluate/self"].status == "run" and again["evaluate/self"].timed_from == "run folder"
    teacher = json.loads((out / "evaluate" / "teacher" / "stage.json").read_text(encoding="utf-8"))["seconds"]
    assert again["evaluate/self"].seconds == pytest.approx(teacher)   # the same questions, one other stage's pace
    assert [n for n, p in again.items() if p.status == "run"] == ["evaluate/self"]
