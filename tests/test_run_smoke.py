"""The smoke recipe end to end on the real bundled models: llama.cpp generation, real LoRA
training on the CPU, llama.cpp evaluation with the exported adapters, and the report."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

pytest.importorskip("llama_cpp", reason="needs the llamacpp extra")
pytest.importorskip("peft", reason="needs the torch extra")


def kmm(*args, cwd):
    return subprocess.run([sys.executable, "-m", "kmismatch_lite", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=1200)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = kmm("run", "smoke", "--out", str(out), cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_run_folder_has_every_output(first_run):
    out, proc = first_run
    for name in ("manifest.json", "results.json", "report.md", "report.png", "data/train.jsonl",
                 "data/test.jsonl", "sets/self.jsonl", "sets/teacher.jsonl", "sets/stats.json",
                 "finetune/self/adapter.gguf", "finetune/teacher/adapter.gguf"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["student"]["sha256"] and manifest["models"]["teacher"]["sha256"]
    assert manifest["backends"] == {"generate": "llamacpp", "finetune": "torch", "evaluate": "llamacpp"}
    res = json.loads((out / "results.json").read_text())
    assert set(res["conditions"]) == {"base_student", "self", "teacher", "base_teacher"}
    n_test = res["n_test"]
    for cond, m in res["conditions"].items():
        assert m["correct"] + m["wrong"] + m["abstained"] == m["n"] == n_test
        rows = [json.loads(line) for line in (out / "samples" / f"{cond}.jsonl").read_text().splitlines()]
        assert len(rows) == n_test
        assert sum(r["verdict"] == "wrong" for r in rows) == m["wrong"]
    h = res["hypothesis"]
    assert h["wrong_teacher"] == res["conditions"]["teacher"]["wrong"]
    assert h["wrong_self"] == res["conditions"]["self"]["wrong"]
    assert 0.0 <= h["mcnemar_p"] <= 1.0
    assert h["bootstrap_95ci"][0] <= h["wrong_rate_difference"] <= h["bootstrap_95ci"][1]
    sets = res["finetune_sets"]
    teacher_set = [json.loads(line) for line in (out / "sets/teacher.jsonl").read_text().splitlines()]
    answered = [r for r in teacher_set if r["target"] != "I don't know"]
    assert len(answered) == sets["teacher_answered"]
    assert "base_teacher" in proc.stdout and "report.md" in proc.stdout
    assert "hypothesis" in (out / "report.md").read_text()


def test_second_run_reuses_every_stage(first_run):
    out, _ = first_run
    before = (out / "results.json").read_text()
    proc = kmm("run", "smoke", "--out", str(out), cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running" not in proc.stderr
    assert "reused" in proc.stderr
    assert (out / "results.json").read_text() == before


def test_same_seed_same_verdicts_in_another_folder(first_run, tmp_path):
    out, _ = first_run
    other = tmp_path / "again"
    proc = kmm("run", "smoke", "--out", str(other), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for cond in ("base_student", "self", "teacher", "base_teacher"):
        a = [json.loads(x)["verdict"] for x in (out / "samples" / f"{cond}.jsonl").read_text().splitlines()]
        b = [json.loads(x)["verdict"] for x in (other / "samples" / f"{cond}.jsonl").read_text().splitlines()]
        assert a == b, cond


def test_report_command_prints_and_compares(first_run):
    out, _ = first_run
    proc = kmm("report", str(out), cwd=out.parent)
    assert proc.returncode == 0 and "base_teacher" in proc.stdout
    proc = kmm("report", str(out), str(out), cwd=out.parent)
    assert proc.returncode == 0 and "McNemar p" in proc.stdout


def test_report_of_a_folder_without_results(tmp_path):
    proc = kmm("report", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no results.json" in proc.stderr
