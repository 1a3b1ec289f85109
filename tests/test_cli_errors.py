"""Every bad input to the CLI: one line on stderr naming the problem, a non-zero exit, no
traceback, and no --out folder left behind. Runs `python -m kmismatch_lite` as a user would."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import run_kmm

FAKE_GGUF = b"GGUF" + b"\0" * 60      # passes the magic check; no bad input reaches llama.cpp


@pytest.fixture
def fake_model(tmp_path):
    p = tmp_path / "fake.gguf"
    p.write_bytes(FAKE_GGUF)
    return str(p)


@pytest.fixture
def questions(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text("".join(json.dumps({"question": f"Q{i}?", "answers": ["A"]}) + "\n" for i in range(40)))
    return p


def _one_line_error(res, *needles):
    assert res.returncode != 0, res
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _check(tmp_path, *args):
    out = tmp_path / "out"
    res = run_kmm("check", *args, "--out", str(out), "-n", "5")
    assert not out.exists(), "--out was created by a failed check"
    return res


def test_unknown_model(tmp_path):
    _one_line_error(_check(tmp_path, "no-such-model"), "unknown model 'no-such-model'")


def test_missing_model_file(tmp_path):
    _one_line_error(_check(tmp_path, str(tmp_path / "missing.gguf")), "model file not found", "missing.gguf")


def test_corrupt_model_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(os.urandom(4096))
    _one_line_error(_check(tmp_path, str(p)), "x.gguf", "is not a GGUF model file")


def test_hf_model_not_cached(tmp_path):
    res = run_kmm("check", "hf:org/repo:file.gguf", "--out", str(tmp_path / "o"),
                  env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    _one_line_error(res, "not available offline", "kmm pull")
    assert not (tmp_path / "o").exists()


def test_unknown_dataset(tmp_path, fake_model):
    _one_line_error(_check(tmp_path, fake_model, "-d", "nope"), "unknown data set 'nope'")


def test_negative_temperature(tmp_path, fake_model):
    _one_line_error(_check(tmp_path, fake_model, "--temperature", "-0.5"), "temperature must be a number >= 0")


def test_malformed_data_rows(tmp_path, fake_model):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "Q?", "answers": ["A"]}\n{oops\n{"question": "Q2?"}\n')
    _one_line_error(_check(tmp_path, fake_model, "-d", f"jsonl:{p}"), "line 2", "line 3", "malformed rows")


def test_empty_dataset(tmp_path, fake_model):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    _one_line_error(_check(tmp_path, fake_model, "-d", f"jsonl:{p}"), "is empty")


def test_missing_data_file(tmp_path, fake_model):
    _one_line_error(_check(tmp_path, fake_model, "-d", f"csv:{tmp_path / 'no.csv'}"), "data file not found")


@pytest.mark.parametrize("opt, needle", [
    ("colour=red", "unknown option 'colour'"),
    ("threads=many", "bad value for 'threads'"),
    ("threads", "bad option 'threads'"),
])
def test_bad_backend_option(tmp_path, fake_model, opt, needle):
    _one_line_error(_check(tmp_path, fake_model, "-o", opt), needle)


def test_unknown_backend(tmp_path, fake_model):
    _one_line_error(_check(tmp_path, fake_model, "--backend", "nope"), "unknown generation backend 'nope'")


def test_missing_adapter(tmp_path, fake_model, questions):
    res = _check(tmp_path, fake_model, "-d", f"jsonl:{questions}", "--adapter", str(tmp_path / "no.gguf"))
    _one_line_error(res, "adapter file not found", "no.gguf")


def test_corrupt_adapter(tmp_path, fake_model, questions):
    p = tmp_path / "lora.gguf"
    p.write_bytes(os.urandom(2048))
    res = _check(tmp_path, fake_model, "-d", f"jsonl:{questions}", "--adapter", str(p))
    _one_line_error(res, "lora.gguf", "is not a GGUF adapter file")


def test_empty_split(tmp_path, fake_model):
    p = tmp_path / "two.jsonl"
    p.write_text('{"question": "Q?", "answers": "A"}\n')
    # one subject goes to the exemplars, leaving the test split empty
    _one_line_error(_check(tmp_path, fake_model, "-d", f"jsonl:{p}", "--split", "test"), "no questions in split 'test'")


def test_data_command_errors(tmp_path):
    _one_line_error(run_kmm("data", "nope"), "unknown data set")
    p = tmp_path / "bad.csv"
    p.write_text("question,answers\n,x\n")
    _one_line_error(run_kmm("data", f"csv:{p}"), "line 2")


def test_pull_unknown_model():
    _one_line_error(run_kmm("pull", "no-such-model"), "unknown model 'no-such-model'")


def test_models_lists_cards():
    res = run_kmm("models")
    assert res.returncode == 0, res.stderr
    for name in ("smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-0.5b-instruct", "llama-2-13b"):
        assert name in res.stdout


def test_models_fits_80_columns():
    res = run_kmm("models", env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(len(l) for l in lines) <= 80
    # one row per card: each model name begins a line (no wrapped cells splitting rows apart)
    for name in ("smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-0.5b-instruct"):
        assert sum(name in l for l in lines) == 1, name


@pytest.mark.parametrize("args, needles", [
    (["check", "m.gguf", "--split", "foo"], ["Invalid value for '--split'", "'foo'", "kmm check --help"]),
    (["check", "m.gguf", "--colour", "red"], ["No such option '--colour'", "kmm check --help"]),
    (["check"], ["Missing argument 'MODEL'"]),
    (["check", "m.gguf", "--limit", "many"], ["'--limit'", "'many' is not a valid integer"]),
    (["frobnicate"], ["No such command 'frobnicate'"]),
])
def test_usage_errors_are_one_line(tmp_path, args, needles):
    res = run_kmm(*args, cwd=tmp_path)
    _one_line_error(res, *needles)
    assert res.returncode == 2 and not list(tmp_path.iterdir())


def test_bare_kmm_prints_the_help():
    res = run_kmm()
    assert "Usage:" in res.stdout and "Traceback" not in res.stderr


def _recipe(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text('name = "r"\n[models]\nstudent = "smollm2-135m-instruct"\nteacher = "gemma-3-270m"\n' + text)
    return p


@pytest.mark.parametrize("text, settings, needles", [
    ('[data]\ntest = "many"\n', [], ["'data.test' must be int, got 'many'"]),
    ('[report]\nbootstrap = 1.5\n', [], ["'report.bootstrap' must be int, got 1.5"]),
    ('[finetune]\nverify = "yes"\n', [], ["'finetune.verify' must be bool"]),
    ('[data]\ndataset = 3\n', [], ["'data.dataset' must be str, got 3"]),
    ('', ["data.test=lots"], ["setting 'data.test'", "'lots' (expected int)"]),
])
def test_recipe_values_of_the_wrong_type(tmp_path, text, settings, needles):
    out = tmp_path / "run"
    args = [a for s in settings for a in ("-s", s)]
    _one_line_error(run_kmm("run", str(_recipe(tmp_path, text)), "--out", str(out), *args), *needles)
    assert not out.exists()


def test_recipe_file_not_utf8(tmp_path):
    p = tmp_path / "latin.toml"
    p.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    _one_line_error(run_kmm("run", str(p), "--out", str(tmp_path / "run")), "latin.toml")
    assert not (tmp_path / "run").exists()


def test_recipe_name_with_path_separators(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(_recipe(tmp_path, "").read_text().replace('name = "r"', 'name = "../escape"'))
    _one_line_error(run_kmm("run", str(p), cwd=tmp_path), "recipe name '../escape'", "--out")
    assert not (tmp_path.parent / "escape").exists()


@pytest.mark.parametrize("kind, raw", [
    ("jsonl", '{"question": "O\u00f9 est Paris?", "answers": ["France"]}\n'.encode("latin-1")),
    ("csv", "question,answers\nQu\u00e9?,A\n".encode("cp1252")),
])
def test_data_file_not_utf8(tmp_path, fake_model, kind, raw):
    p = tmp_path / f"latin.{kind}"
    p.write_bytes(raw)
    _one_line_error(_check(tmp_path, fake_model, "-d", f"{kind}:{p}"), "not a UTF-8 text file", str(p))


def test_finetune_data_not_utf8(tmp_path, fake_model):
    p = tmp_path / "latin.jsonl"
    p.write_bytes('{"question": "Qu\u00e9?", "target": "A"}\n'.encode("latin-1"))
    out = tmp_path / "ft"
    _one_line_error(run_kmm("finetune", fake_model, "--data", str(p), "--out", str(out)), "UTF-8", str(p))
    assert not out.exists()


@pytest.mark.parametrize("row", [
    {"question": "Q?", "answers": []},
    {"question": "Q?", "answers": [""]},
    {"question": "Q?", "answers": "  "},
])
def test_question_with_an_empty_answer_list(tmp_path, fake_model, row):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"question": "Fine?", "answers": ["yes"]}) + "\n" + json.dumps(row) + "\n")
    _one_line_error(_check(tmp_path, fake_model, "-d", f"jsonl:{p}"), "line 2", "'answers' must be a non-empty")


def test_output_folder_under_a_file(tmp_path, fake_model, questions):
    blocker = tmp_path / "plain.txt"
    blocker.write_text("not a folder")
    for args in (["check", fake_model, "-d", f"jsonl:{questions}"],
                 ["finetune", fake_model, "--data", str(questions)]):
        res = run_kmm(*args, "--out", str(blocker / "out"))
        _one_line_error(res, "cannot write the output folder", "plain.txt is not a folder")
    assert blocker.read_text() == "not a folder"


@pytest.fixture
def unwritable(tmp_path):
    """A folder this user cannot write: a mode-0500 folder, or for root a read-only mount."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        yield locked
        locked.chmod(0o700)
    elif (ro := _read_only_mount(tmp_path / "ro")) is not None:
        try:
            yield ro
        finally:
            subprocess.run(["umount", str(ro)], capture_output=True)
    elif os.path.isdir("/sys") and not os.access("/sys", os.W_OK):
        yield Path("/sys")
    else:
        pytest.skip("root may write any folder here, a read-only tmpfs cannot be mounted, and no read-only "
                    "mount was found")


def _read_only_mount(folder: Path) -> Path | None:
    """`folder` as a read-only tmpfs (root with the right to mount), else None."""
    folder.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if res.returncode != 0:
        return None
    try:
        (folder / "probe").touch()
    except OSError:
        return folder
    subprocess.run(["umount", str(folder)], capture_output=True)
    return None


def test_output_folder_not_writable(tmp_path, fake_model, questions, unwritable):
    before = sorted(os.listdir(unwritable))
    res = run_kmm("check", fake_model, "-d", f"jsonl:{questions}", "--out", str(unwritable / "kmm-out"))
    _one_line_error(res, "cannot write the output folder", "is not writable")
    assert sorted(os.listdir(unwritable)) == before


@pytest.mark.parametrize("spec, needle", [
    ("hf:org/repo:../../../etc/passwd", "the repo must be org/name"),
    ("hf:org/repo:/etc/passwd", "the repo must be org/name"),
    ("hf:../../x:file.gguf", "the repo must be org/name"),
    ("hf:org:file.gguf", "the repo must be org/name"),
    ("org/some-model", "model file not found: org/some-model"),
    ("../models/nothing", "model file not found"),
])
def test_model_names_with_path_separators(tmp_path, spec, needle):
    _one_line_error(_check(tmp_path, spec), needle)
    _one_line_error(run_kmm("pull", spec), needle if spec.startswith("hf:") else "unknown model")


def test_a_misspelt_backend_option_stops_the_run_before_any_stage(tmp_path):
    recipe = tmp_path / "typo.toml"
    smoke = (Path(__file__).resolve().parent.parent / "recipes" / "smoke.toml").read_text(encoding="utf-8")
    recipe.write_text(smoke + "\n[evaluate.options]\nparalel = 2\n", encoding="utf-8")
    out = tmp_path / "run"
    res = run_kmm("run", str(recipe), "--out", str(out), cwd=tmp_path)
    _one_line_error(res, "evaluate.options: unknown option 'paralel' for the llamacpp backend")
    assert res.returncode == 1 and not out.exists()
