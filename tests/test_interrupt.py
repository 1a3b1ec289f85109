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


SECOND_CTRL_C = """
import os, signal, sys
from unittest import mock
import kmismatch_lite.cli as cli

class Stderr:
    # A second Ctrl-C while the first one's message is being written.
    def write(self, text):
        os.kill(os.getpid(), signal.SIGINT)
        return sys.__stderr__.write(text)
    def flush(self):
        sys.__stderr__.flush()

sys.stderr = Stderr()
with mock.patch.object(cli.cli, "main", side_effect=KeyboardInterrupt):
    cli.main()
"""


def test_a_second_ctrl_c_while_exiting_keeps_the_status_130():
    proc = subprocess.run([sys.executable, "-c", SECOND_CTRL_C], cwd=REPO, capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.strip() == "interrupted"
