"""A run folder survives what users do to it: SIGKILL at any moment then a rerun, two runs on the
same folder at once, and a umask that shares the results with a group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kmismatch_lite.io import atomic_dir, remove_temps, run_lock, write_json

REPO = Path(__file__).resolve().parent.parent
HOLD = ("import sys, time; from kmismatch_lite.io import run_lock\n"
        "with run_lock(sys.argv[1]):\n"
        "    (__import__('pathlib').Path(sys.argv[1]) / '.stage.0123abcd').mkdir()\n"
        "    print('locked', flush=True); time.sleep(60)\n")


@pytest.fixture
def umask():
    """Set the process umask for a test, restoring the old one after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    write_json(tmp_path / "run" / "results.json", {"a": 1})
    with atomic_dir(tmp_path / "run" / "stage") as tmp:
        write_json(tmp / "stage.json", {"key": "k"})
        # As safetensors writes its files.
        os.close(os.open(tmp / "adapter.safetensors", os.O_WRONLY | os.O_CREAT, 0o600))
    with run_lock(tmp_path / "run"):
        pass
    for f in ("results.json", "stage/stage.json", "stage/adapter.safetensors", ".lock", ".lock.pid"):
        assert (tmp_path / "run" / f).stat().st_mode & 0o777 == 0o666 & ~mask, f
    assert (tmp_path / "run" / "stage").stat().st_mode & 0o777 == 0o777 & ~mask


def test_atomic_dir_replaces_an_old_folder_whole(tmp_path):
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "old.txt").write_text("old")
    with atomic_dir(tmp_path / "stage") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["new.txt"]


def test_remove_temps_removes_only_temporary_names(tmp_path):
    keep = [tmp_path / "results.json", tmp_path / ".lock", tmp_path / ".hidden", tmp_path / "a" / "b.jsonl"]
    temps = [tmp_path / ".results.json.0123abcd", tmp_path / "a" / ".stage.deadbeef",
             tmp_path / "a" / ".b.jsonl.00ff00ff"]
    for p in keep + temps:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    (tmp_path / "a" / ".stage.deadbeef").unlink()
    (tmp_path / "a" / ".stage.deadbeef" / "inner").mkdir(parents=True)
    assert sorted(remove_temps(tmp_path)) == sorted(temps)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in temps)


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_run_lock_waits_and_spares_a_live_runs_temps_until_it_is_killed(tmp_path):
    holder = _holder(tmp_path)
    lines, acquired = [], threading.Event()

    def second():
        with run_lock(tmp_path, log=lines.append):
            acquired.set()

    t = threading.Thread(target=second)
    t.start()
    try:
        time.sleep(1.0)
        assert not acquired.is_set()
        assert (tmp_path / ".stage.0123abcd").is_dir()
        assert lines == [f"{tmp_path} is in use by another run (pid {holder.pid}); waiting for it to finish"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        t.join(timeout=30)
    assert acquired.is_set()
    assert not (tmp_path / ".stage.0123abcd").exists()
    assert (tmp_path / ".lock.pid").read_text().strip() == str(os.getpid())


# --- the real smoke recipe, killed and doubled -------------------------------------------------

STAGES = ["data", "generate/teacher", "generate/student", "sets", "finetune/self", "finetune/teacher",
          "evaluate/base_student", "evaluate/self", "evaluate/teacher", "evaluate/base_teacher"]


# Smaller than the recipe's own sizes (24 train, 16 test) to keep the test short; every stage runs.
SMALL = ("-s", "data.train=12", "-s", "data.test=8")


class Kmm:
    """`kmm run smoke --out OUT` (at the SMALL sizes) started in its own process group, its stderr
    in a file."""

    def __init__(self, out: Path, log: Path, umask: int | None = None):
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kmismatch_lite", "run", "smoke", "--out", str(out), *SMALL],
                cwd=out.parent, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                env={**os.environ, "COLUMNS": "200"}, umask=-1 if umask is None else umask)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, done, timeout: float = 1800) -> None:
        """Poll until `done()` is true; fail if the run ends or the time runs out first."""
        end = time.monotonic() + timeout
        while not done():
            assert self.proc.poll() is None, f"run ended early:\n{self.text()[-3000:]}"
            assert time.monotonic() < end, "timed out"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 1800) -> str:
        assert self.proc.wait(timeout=timeout) == 0, self.text()[-3000:]
        return self.text()


def _temps(out: Path) -> set[Path]:
    # Locks stay (the run's .lock and .lock.pid, each stage's .NAME.lock); nothing else is hidden.
    return {Path(d) / n for d, dirs, files in os.walk(out) for n in dirs + files
            if n.startswith(".") and not n.endswith(".lock") and n != ".lock.pid"}


def _finished(out: Path) -> dict[str, bytes]:
    return {s: (out / s / "stage.json").read_bytes() for s in STAGES if (out / s / "stage.json").is_file()}


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Two runs on one new folder (umask 0o002), the second started while the first is running."""
    pytest.importorskip("llama_cpp", reason="needs the llamacpp extra")
    pytest.importorskip("peft", reason="needs the torch extra")
    base = tmp_path_factory.mktemp("twins")
    out = base / "run"
    first = Kmm(out, base / "first.log", umask=0o002)
    try:
        first.wait_for(lambda: "stage data: running" in first.text())
        second = Kmm(out, base / "second.log", umask=0o002)
        try:
            logs = first.finish(), second.finish()
        finally:
            second.kill()
    finally:
        first.kill()
    return out, logs


@pytest.mark.integration
@pytest.mark.slow
def test_twin_runs_compute_each_stage_once(twins):
    out, (first, second) = twins
    # Each stage has a lock of its own: the run that takes it computes the stage, the other waits
    # and reuses it; which run computes which stage is a race, that each is computed once is not.
    assert "another run is computing it; waiting" in second
    for s in STAGES:
        assert first.count(f"stage {s}: running") + second.count(f"stage {s}: running") == 1, s
        assert f"stage {s}: unchanged, reused" in first + second, s
    assert json.loads((out / "results.json").read_text())["recipe"] == "smoke"
    assert not _temps(out)


@pytest.mark.integration
@pytest.mark.slow
def test_run_folder_follows_the_umask(twins):
    out, _ = twins
    modes = {p: p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    wrong = {str(p.relative_to(out)): oct(m) for p, m in modes.items() if m != (0o775 if p.is_dir() else 0o664)}
    assert not wrong


@pytest.mark.integration
@pytest.mark.slow
def test_kill_at_any_moment_then_rerun(twins, tmp_path):
    """SIGKILL inside generation, fine-tuning, evaluation and report writing, each time rerunning
    the killed run: finished stages are reused, leftovers cleared, results.json byte-identical."""
    ref, _ = twins
    seconds = {s: json.loads((ref / s / "stage.json").read_text())["seconds"] for s in STAGES}
    out = tmp_path / "run"

    def stage_half_done(stage: str):
        # Half the stage's time in the uninterrupted run, after its start: inside it.
        def at():
            at.t0 = at.t0 or (f"stage {stage}: running" in run.text() and time.monotonic())
            return bool(at.t0) and time.monotonic() - at.t0 > seconds[stage] / 2
        at.t0 = None
        return at

    moments = [("generate/student", stage_half_done("generate/student")),
               ("finetune/self", stage_half_done("finetune/self")),
               ("evaluate/self", stage_half_done("evaluate/self")),
               ("report", lambda: (out / "samples").exists())]
    finished, temps, found = {}, set(), []
    for n, (where, moment) in enumerate(moments + [(None, None)]):
        run = Kmm(out, tmp_path / f"run{n}.log")
        try:
            if moment is None:
                log = run.finish()
            else:
                run.wait_for(moment)
                run.kill()
                log = run.text()
        finally:
            run.kill()
        for s, marker in finished.items():
            assert f"stage {s}: unchanged, reused" in log, (where, s)
            assert (out / s / "stage.json").read_bytes() == marker, (where, s)
        assert not temps & _temps(out), where
        finished, temps = _finished(out), _temps(out)
        if where == "report":
            assert set(finished) == set(STAGES) and not (out / "results.json").exists()
        elif where:
            assert where not in finished and STAGES[STAGES.index(where) - 1] in finished, where
            assert temps, where
        found.append(f"{where}: {len(finished)} stages done, {len(temps)} temporaries left")
    print("; ".join(found[:-1]))
    assert "running" not in log
    assert not _temps(out)
    assert (out / "results.json").read_bytes() == (ref / "results.json").read_bytes()
