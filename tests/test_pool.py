"""`kmm pool` on real runs of the smoke recipe: two one-seed "laptops" (one of them without the
POSIX-only fcntl and os.pread/os.pwrite, as on Windows) pool to the same results as one two-seed
run; every refusal is one line, exit 1 and nothing written; a watched folder re-pools as hand-ins
arrive, a half-copied one only once it is whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_kmm
from kmismatch_lite import handin, pool

pytestmark = [pytest.mark.integration, pytest.mark.slow]

pytest.importorskip("llama_cpp", reason="needs the llamacpp extra")
pytest.importorskip("peft", reason="needs the torch extra")
pytest.importorskip("statsmodels", reason="needs the stats extra")

SIZES = ("-s", "data.train=12", "-s", "data.test=8")
# `kmm run` as on a system without fcntl and os.pread/os.pwrite (native Windows has neither).
NO_POSIX = ("import os, sys\n"
            "sys.modules['fcntl'] = None\n"
            "for name in ('pread', 'pwrite'):\n"
            "    if hasattr(os, name): delattr(os, name)\n"
            "from kmismatch_lite.cli import main\n"
            "sys.argv = ['kmm'] + sys.argv[1:]\n"
            "main()\n")


def _kmm_run(out: Path, *settings: str, no_posix: bool = False) -> subprocess.CompletedProcess:
    args = ["run", "smoke", "--out", str(out), *SIZES, *settings]
    if no_posix:
        env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", NO_POSIX, *args], cwd=out.parent, env=env,
                              capture_output=True, text=True, timeout=1800)
    else:
        proc = run_kmm(*args, cwd=out.parent, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One two-seed run, and each seed on its own "laptop": seed 0 as `seed = 0` (flat layout)
    without fcntl and os.pread, seed 1 as `seeds = [1]`."""
    root = tmp_path_factory.mktemp("pool")
    together = root / "together"
    _kmm_run(together, "-s", "seeds=0,1")
    laptop_a, laptop_b = root / "laptop-a", root / "laptop-b"
    proc_a = _kmm_run(laptop_a, "-s", "seed=0", no_posix=True)
    _kmm_run(laptop_b, "-s", "seeds=1")
    return {"together": together, "a": laptop_a, "b": laptop_b, "proc_a": proc_a, "root": root}


def _fails(args, cwd) -> subprocess.CompletedProcess:
    proc = run_kmm(*args, cwd=cwd)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return proc


def _resign(src: Path, dst: Path, edit) -> Path:
    """A well-formed hand-in describing another experiment: `src`'s body edited, checksum renewed."""
    body = handin.read(src)
    edit(body)
    handin.write(dst, body)
    return dst


def test_the_smoke_recipe_runs_without_fcntl_or_pread_and_names_its_hand_in(runs):
    proc = runs["proc_a"]
    path = runs["a"] / "kmm-handin-smoke-seed-0.json"
    assert proc.stderr.strip().splitlines()[-1] == f"hand-in for kmm pool: {path}"
    body = handin.read(path)
    assert body["seed"] == 0 and body["recipe"]["finetune"]["lora"]["epochs"] == 1
    results = json.loads((runs["a"] / "results.json").read_text(encoding="utf-8"))
    assert body["results"] == results
    for cond in ("base_student", "self", "teacher", "base_teacher"):
        rows = [json.loads(x) for x in (runs["a"] / "samples" / f"{cond}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert [(r["id"], r["verdict"]) for r in rows] == [(r["id"], r["verdict"]) for r in body["samples"][cond]]
    assert body["models"]["student"]["sha256"] == json.loads(
        (runs["a"] / "manifest.json").read_text(encoding="utf-8"))["models"]["student"]["sha256"]
    assert "kmm-handin-smoke-seed-0.json" in (runs["a"] / "report.md").read_text(encoding="utf-8").splitlines()[-1]


def test_two_laptops_pool_to_what_the_two_seed_run_gives(runs, tmp_path):
    out = tmp_path / "pooled"
    proc = run_kmm("pool", str(runs["a"]), str(runs["b"] / "seed-1" / "kmm-handin-smoke-seed-1.json"),
                   "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pooled = json.loads((out / "results.json").read_text(encoding="utf-8"))
    together = json.loads((runs["together"] / "results.json").read_text(encoding="utf-8"))
    machines = pooled.pop("machines")
    assert pooled == together
    assert set(machines) == {"0", "1"} and machines["0"]["cpus"] == os.cpu_count()
    assert "All 2 seeds ran on one machine" in proc.stdout and "Over 2 seeds" in proc.stdout
    report = (out / "report.md").read_text(encoding="utf-8")
    assert machines["1"]["label"] in report and "| machine |" in report
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'http-equiv="refresh"' in page and "data:image/png;base64," in page and "Over 2 seeds" in page
    for seed in (0, 1):
        assert (out / f"seed-{seed}" / "report.md").is_file()
        assert handin.read(out / f"seed-{seed}" / f"kmm-handin-smoke-seed-{seed}.json")["seed"] == seed
    shown = run_kmm("report", str(out), cwd=tmp_path)
    assert shown.returncode == 0 and "Over 2 seeds" in shown.stdout
    again = run_kmm("pool", str(runs["a"]), str(runs["b"]), "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("what, edit, says", [
    ("setting", lambda b: b["recipe"]["finetune"]["lora"].__setitem__("rank", 16), "setting finetune.lora.rank"),
    ("model", lambda b: b["models"]["student"].__setitem__("sha256", "0" * 64), "the student model files differ"),
    ("data", lambda b: b["data"].__setitem__("sha256", "0" * 64), "the data differ"),
])
def test_another_experiment_is_refused(runs, tmp_path, what, edit, says):
    other = _resign(runs["b"] / "seed-1" / "kmm-handin-smoke-seed-1.json", tmp_path / f"{what}.json", edit)
    out = tmp_path / "pooled"
    proc = _fails(("pool", str(runs["a"]), str(other), "--out", str(out)), tmp_path)
    assert says in proc.stderr and str(other) in proc.stderr and "ran different experiments" in proc.stderr
    assert not out.exists()


def test_the_same_seed_twice_is_refused(runs, tmp_path):
    out = tmp_path / "pooled"
    proc = _fails(("pool", str(runs["a"]), str(runs["together"]), "--out", str(out)), tmp_path)
    assert "seed 0 is in both" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("damage, says", [
    ("truncate", "truncated or corrupt"),
    ("edit", "fails its checksum"),
    ("flip", "fails its checksum"),
])
def test_a_damaged_hand_in_is_refused(runs, tmp_path, damage, says):
    text = (runs["b"] / "seed-1" / "kmm-handin-smoke-seed-1.json").read_text(encoding="utf-8")
    if damage == "truncate":
        text = text[: len(text) // 2]
    elif damage == "edit":
        data = json.loads(text)
        row = data["body"]["samples"]["teacher"][0]
        row["verdict"] = "correct" if row["verdict"] != "correct" else "wrong"
        text = json.dumps(data)
    else:
        i = text.index('"wrong_teacher":') + len('"wrong_teacher":')
        text = text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:]
    bad = tmp_path / "kmm-handin-smoke-seed-1.json"
    bad.write_text(text, encoding="utf-8")
    out = tmp_path / "pooled"
    proc = _fails(("pool", str(runs["a"]), str(bad), "--out", str(out)), tmp_path)
    assert says in proc.stderr and str(bad) in proc.stderr
    assert not out.exists()


def test_a_folder_that_is_not_a_pool_is_never_replaced(runs, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep", encoding="utf-8")
    proc = _fails(("pool", str(runs["a"]), "--out", str(out)), tmp_path)
    assert "not a kmm pool folder" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_watched_folder_repools_as_hand_ins_arrive(runs, tmp_path):
    drop, out = tmp_path / "class", tmp_path / "screen"
    drop.mkdir()
    lines: list[str] = []
    watcher = pool.Watcher(drop, out, log=lines.append)
    assert watcher.poll() is False and not out.exists()

    first = (runs["a"] / "kmm-handin-smoke-seed-0.json").read_bytes()
    (drop / "student-1.json").write_bytes(first)
    assert watcher.poll() is True
    one = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert one["seeds"] == [0] and one["points"][0]["pooled"] is None
    assert one["cells"][0]["hypothesis"] == handin.read(drop / "student-1.json")["results"]["hypothesis"]

    second = (runs["b"] / "seed-1" / "kmm-handin-smoke-seed-1.json").read_bytes()
    half = drop / "student-2.json"
    half.write_bytes(second[: len(second) // 2])
    assert watcher.poll() is False
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["seeds"] == [0]
    assert any("student-2.json" in line and "not pooled yet" in line for line in lines)
    with open(half, "ab") as f:
        f.write(second[len(second) // 2:])
    os.utime(half, ns=(time.time_ns(), time.time_ns() + 1000))
    assert watcher.poll() is True
    two = json.loads((out / "results.json").read_text(encoding="utf-8"))
    two.pop("machines")
    assert two == json.loads((runs["together"] / "results.json").read_text(encoding="utf-8"))
    assert "Over 2 seeds" in (out / "report.html").read_text(encoding="utf-8")

    (drop / "copy-of-1.json").write_bytes(first)
    assert watcher.poll() is False
    assert any("seed 0 is in both" in line for line in lines)


def test_kmm_pool_watch_on_the_command_line(runs, tmp_path):
    drop, out = tmp_path / "class", tmp_path / "screen"
    drop.mkdir()
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    # Ctrl-C as at a terminal: a job started in the background (as a CI runner may start this
    # suite) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "kmismatch_lite", "pool", "--watch", str(drop), "--out", str(out),
                             "--every", "0.2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for i, src in enumerate([runs["a"] / "kmm-handin-smoke-seed-0.json",
                                 runs["b"] / "seed-1" / "kmm-handin-smoke-seed-1.json"], start=1):
            (drop / src.name).write_bytes(src.read_bytes())
            deadline = time.time() + 120
            while time.time() < deadline:
                page = out / "report.html"
                if page.is_file() and f"{i} seed{'s' if i > 1 else ''} pooled" in page.read_text(encoding="utf-8"):
                    break
                time.sleep(0.2)
            else:
                pytest.fail(f"the watched pool never showed {i} seeds")
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "2 seeds: Over 2 seeds" in stdout
