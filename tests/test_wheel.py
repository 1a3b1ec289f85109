"""Installed from a built wheel into a fresh virtual environment outside the checkout, kmm still
finds its bundled model cards and recipes, and checks a bundled model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from conftest import REPO, bundled_model, llama_cpp_usable

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(args, **kw):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def test_a_wheel_installed_outside_the_checkout_finds_its_cards_and_recipes(tmp_path):
    reason = llama_cpp_usable() or bundled_model("smollm2-135m-instruct")
    if reason:
        pytest.skip(reason)
    src = tmp_path / "src"
    for name in ("kmismatch_lite", "models", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
          "-w", str(tmp_path / "dist")])
    wheel = next((tmp_path / "dist").glob("kmismatch_lite-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "kmismatch_lite/bundled_cards/smollm2-135m-instruct.toml" in names
    assert "kmismatch_lite/bundled_recipes/quickstart.toml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)])
    # The dependencies come from this environment's site-packages, where kmismatch_lite itself is
    # only an editable pointer at the checkout that a plain path entry does not follow.
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"], "COLUMNS": "200"}
    away = tmp_path / "elsewhere"
    away.mkdir()
    where = _run([str(bin_dir / "python"), "-c", "import kmismatch_lite, kmismatch_lite.recipes as r, "
                  "kmismatch_lite.cards as c; print(kmismatch_lite.__file__); print(r.find('quickstart')); "
                  "print(c.MODELS_DIR)"], env=env, cwd=away).stdout.splitlines()
    assert all(line.startswith(str(venv)) for line in where), where
    models = _run([str(bin_dir / "kmm"), "models"], env=env, cwd=away)
    assert "smollm2-135m-instruct" in models.stdout and "yes (pip package)" in models.stdout
    check = _run([str(bin_dir / "kmm"), "check", "smollm2-135m-instruct", "-n", "3", "--json"], env=env, cwd=away)
    assert json.loads(check.stdout)["n"] == 3
