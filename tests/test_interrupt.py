"""Ctrl-C during a run: exit status 130, the locks released, no temporary left, and a rerun that
resumes to the results of an uninterrupted run."""

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

REPO = Path(__file__).resolve().parent.parent
TEMP = re.compile(r"^\..+\.[0-9a-f]{8}$")


def _temps(out: Path) -> list[str]:
    return [str(Path(d) / n) for d, dirs, files in os.walk(out) for n in dirs + files if TEMP.match(n)]


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_mid_finetune_exits_130_cleans_up_and_resumes(tmp_path):
    from filelock import FileLock

    reason = llama_cpp_usable()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("peft", reason="needs the torch extra")
    ref = tmp_path / "ref"
    assert run_kmm("run", "smoke", "--out", str(ref), timeout=1800).returncode == 0
    out = tmp_path / "run"
    with open(tmp_path / "interrupted.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kmismatch_lite", "run", "smoke", "--out", str(out)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 900
        while not any(TEMP.match(p.name) for p in out.glob("finetune/.*")):
            assert proc.poll() is None and time.time() < deadline, "the run ended before its fine-tune began"
            time.sleep(0.2)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=120)
    assert status == 130, (tmp_path / "interrupted.log").read_text(errors="replace")[-3000:]
    assert _temps(out) == []
    assert not (out / "results.json").exists() and (out / "data" / "stage.json").is_file()
    for lock in (out / ".lock", out / "finetune" / ".self.lock"):
        if lock.exists():
            held = FileLock(str(lock))
            held.acquire(timeout=0)
            held.release()
    proc = run_kmm("run", "smoke", "--out", str(out), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage data: unchanged, reused" in proc.stderr and "stage finetune/self: running" in proc.stderr
    assert (out / "results.json").read_bytes() == (ref / "results.json").read_bytes()



INTERRUPTED_IN_EXEC = """
from unittest import mock
import kmismatch_lite.cli as cli

# Ctrl-C landing while source text runs through exec(), as it does when it lands in an import
# that creates dataclasses.
with mock.patch.object(cli.cli, "main", side_effect=lambda **kw: exec("raise KeyboardInterrupt")):
    cli.main()
"""


def test_ctrl_c_inside_exec_of_source_text_still_exits_130_under_python_m(tmp_path):
    (tmp_path / "interrupted_in_exec.py").write_text(INTERRUPTED_IN_EXEC)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.strip() == "interrupted"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGTERM to one process is a POSIX notion")
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sigterm_to_a_jobs_run_stops_its_workers_and_cleans_up(tmp_path, executor):
    reason = llama_cpp_usable()
    if reason:
        pytest.skip(reason)
    psutil = pytest.importorskip("psutil", reason="psutil (with the torch extra) lists the worker processes")
    if executor == "ray":
        pytest.importorskip("ray", reason="needs the ray extra")
    out = tmp_path / "run"
    with open(tmp_path / "stopped.log", "w") as log:
        # a process group of its own: the signal reaches the run alone, as `kill PID` does
        proc = subprocess.Popen([sys.executable, "-m", "kmismatch_lite", "run", "smoke", "-s", "seeds=0,1",
                                 "--jobs", "2", "--executor", executor, "--out", str(out)], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while not (_temps(out) and sum("resource_tracker" not in " ".join(p.cmdline())
                                       for p in psutil.Process(proc.pid).children(recursive=True)) >= 2):
            assert proc.poll() is None and time.time() < deadline, "the run ended before two stages ran at once"
            time.sleep(0.2)
        time.sleep(2)
        spawned = psutil.Process(proc.pid).children(recursive=True)  # workers (and Ray's own processes)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=180)
    text = (tmp_path / "stopped.log").read_text(errors="replace")
    assert status == 128 + signal.SIGTERM and "stopped by SIGTERM" in text, text[-3000:]
    gone, alive = psutil.wait_procs(spawned, timeout=60)
    assert alive == [], f"still running: {[p.cmdline()[:3] for p in alive]}"
    assert _temps(out) == [] and not (out / "results.json").exists()
