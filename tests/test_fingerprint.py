"""Stage keys hold the code that computes the stage: an edited scorer recomputes what it scores
(and what is built from that), unchanged code reuses everything. Tested on a copy of the package
edited as a developer would edit it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

KINDS = [("data", None), ("answers", "llamacpp"), ("answers", "mlx"), ("sets", None), ("dose_sets", None),
         ("finetune", "torch")]
PRINT = ("import json; from kmismatch_lite.fingerprint import stage_code; "
         f"print(json.dumps([stage_code(k, b) for k, b in {KINDS!r}]))")
PHRASE = '    "no answer",\n'


def _tree(root: Path) -> Path:
    """A copy of the package with its recipes and model cards, as a checkout would hold them."""
    for name in ("kmismatch_lite", "recipes", "models"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _edit_scorer(root: Path) -> None:
    path = root / "kmismatch_lite" / "qa" / "scoring.py"
    text = path.read_text(encoding="utf-8")
    assert PHRASE in text
    path.write_text(text.replace(PHRASE, PHRASE + '    "i would not know",\n'), encoding="utf-8")


def _env(root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}


def _codes(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PRINT], env=_env(root), cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return dict(zip([f"{k}/{b}" for k, b in KINDS], json.loads(out.stdout)))


def test_an_edited_scorer_changes_the_code_of_what_it_scores_only(tmp_path):
    same, edited = _tree(tmp_path / "same"), _tree(tmp_path / "edited")
    _edit_scorer(edited)
    before, copy, after = _codes(REPO), _codes(same), _codes(edited)
    assert copy == before
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"answers/llamacpp", "answers/mlx", "sets/None", "dose_sets/None"}
    assert len({before["answers/llamacpp"], before["answers/mlx"]}) == 2


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_folder_recomputes_after_the_scorer_changes_and_reuses_all_when_nothing_did(tmp_path):
    pytest.importorskip("llama_cpp", reason="needs the llamacpp extra")
    pytest.importorskip("peft", reason="needs the torch extra")
    root = _tree(tmp_path / "tree")
    out = tmp_path / "run"

    def kmm_run() -> str:
        proc = subprocess.run([sys.executable, "-m", "kmismatch_lite", "run", "smoke", "--out", str(out),
                               "-s", "data.train=12", "-s", "data.test=8"], env=_env(root), cwd=tmp_path,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    kmm_run()
    first = json.loads((out / "results.json").read_text(encoding="utf-8"))
    again = kmm_run()
    assert "running" not in again and again.count("unchanged, reused") == 10
    _edit_scorer(root)
    edited = kmm_run()
    ran = re.findall(r"stage (\S+): running", edited)
    assert "stage data: unchanged, reused" in edited
    assert set(ran) == {"generate/teacher", "generate/student", "sets", "finetune/self", "finetune/teacher",
                        "evaluate/base_student", "evaluate/self", "evaluate/teacher", "evaluate/base_teacher"}
    code = json.loads((out / "evaluate" / "self" / "stage.json").read_text(encoding="utf-8"))["code"]
    assert code == _codes(root)["answers/llamacpp"]
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["n_test"] == first["n_test"]
