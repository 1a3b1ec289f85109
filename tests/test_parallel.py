"""`kmm run --jobs`: stages at once in worker processes or Ray tasks give the results of one stage
at a time (the same threads), two runs on one folder compute each stage once, a kill resumes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import llama_cpp_usable, run_kmm
from kmismatch_lite import parallel, plan, recipes

REPO = Path(__file__).resolve().parent.parent
SMOKE = ["run", "smoke", "-s", "seeds=0,1"]
TEMP = re.compile(r"^\..+\.[0-9a-f]{8}$")


# --- without a model ---

def test_auto_jobs_is_one_per_core_within_memory():
    assert parallel.auto_jobs(cores=2, memory_gb=20) == 2
    assert parallel.auto_jobs(cores=16, memory_gb=8) == 3
    assert parallel.auto_jobs(cores=16, memory_gb=1) == 1
    assert parallel.threads_for(2, cores=2) == 1 and parallel.threads_for(3, cores=16) == 5
    assert parallel.threads_for(4, cores=2) == 1


def test_each_distinct_stage_is_one_entry_with_the_folders_it_needs():
    p = plan.build(recipes.load("smoke", ["seeds=0,1", "sweep.finetune.lora.rank=4,8", "design.doses=0,1"]))
    todo = parallel.entries(p)
    assert list(todo) == [s.folder for s in p.stages()]
    e = todo["seed-1/finetune.lora.rank=8/evaluate/self"]
    assert e.needs == {"data": "seed-1/data", "finetune/self": "seed-1/finetune.lora.rank=8/finetune/self"}
    assert p.cells[e.cell].seed == 1 and e.name == "evaluate/self" and not e.gpu


def test_threads_are_set_for_the_block_and_restored(monkeypatch):
    from kmismatch_lite.backends import THREADS_ENV, cpu_threads

    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    with parallel.thread_setting(3):
        assert cpu_threads() == 3
    assert THREADS_ENV not in os.environ and cpu_threads() == 7


def test_bad_jobs_is_one_line():
    proc = run_kmm("run", "smoke", "--jobs", "0", "--out", "/nonexistent/x")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: --jobs: expected a number >= 1 or 'auto', got '0'"]


# --- the smoke recipe, two seeds, on the bundled models ---

def _needs_models():
    reason = llama_cpp_usable()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("peft", reason="needs the torch extra")


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = run_kmm(*SMOKE, "--out", str(out), "--threads", "1", *extra, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _outputs(out: Path) -> dict[str, bytes]:
    """Every result a run writes: pooled and per-cell results, every stage's answers and sets (not
    metrics.json, which holds timings and paths)."""
    names = ("results.json", "samples.jsonl", "self.jsonl", "teacher.jsonl", "train.jsonl",
             "test.jsonl")
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.name in names and not any(TEMP.match(part) for part in p.relative_to(out).parts)}


def _temps(out: Path) -> list[str]:
    return [str(Path(d) / n) for d, dirs, files in os.walk(out) for n in dirs + files if TEMP.match(n)]


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory):
    _needs_models()
    out = tmp_path_factory.mktemp("jobs1") / "run"
    _run(out, "--jobs", "1")
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_two_jobs_give_the_results_of_one_byte_for_byte(one_at_a_time, tmp_path):
    out = tmp_path / "run"
    proc = _run(out, "--jobs", "2")
    assert "20 stages, 2 at once, 1 thread each" in proc.stderr
    ours, theirs = _outputs(out), _outputs(one_at_a_time)
    assert {"results.json", "seed-1/results.json", "seed-1/evaluate/teacher/samples.jsonl",
            "seed-1/sets/teacher.jsonl"} <= ours.keys()
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k] != theirs[k]] == []


@pytest.mark.integration
@pytest.mark.slow
def test_two_parallel_runs_on_one_folder_compute_each_stage_once(one_at_a_time, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "kmismatch_lite", *SMOKE, "--out", str(out), "--threads", "1", "--jobs", "2"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=1800)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [log[-2000:] for log in logs]
    both = "\n".join(logs)
    for stage in plan.build(recipes.load("smoke", ["seeds=0,1"])).stages():
        assert len(re.findall(rf"stage {re.escape(stage.folder)}: ran in", both)) == 1, stage.folder
    assert _outputs(out) == _outputs(one_at_a_time)
    assert _temps(out) == []


@pytest.mark.integration
@pytest.mark.slow
def test_a_parallel_run_killed_mid_finetune_resumes_to_the_same_results(one_at_a_time, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kmismatch_lite", *SMOKE, "--out", str(out), "--threads", "1", "--jobs", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 900
        while not any(TEMP.match(p.name) for p in out.glob("seed-*/finetune/.*")):
            assert proc.poll() is None and time.time() < deadline, "the run ended before any fine-tune began"
            time.sleep(0.2)
        time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "results.json").exists()
    assert _temps(out), "the kill left no temporary folder, so it tested nothing"
    proc = _run(out, "--jobs", "2")
    assert re.search(r"unchanged, reused", proc.stderr)
    assert _outputs(out) == _outputs(one_at_a_time)
    assert _temps(out) == []


@pytest.mark.integration
@pytest.mark.slow
def test_ray_tasks_give_the_results_of_one_process(one_at_a_time, tmp_path):
    pytest.importorskip("ray", reason="needs the ray extra (pip install 'kmismatch_lite[ray]')")
    out = tmp_path / "run"
    proc = _run(out, "--executor", "ray", "--jobs", "2")
    assert "(Ray)" in proc.stderr
    assert _outputs(out) == _outputs(one_at_a_time)
