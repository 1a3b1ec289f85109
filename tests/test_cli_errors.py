"""Every bad input to the CLI: one line on stderr naming the problem, a non-zero exit, no
traceback, and no --out folder left behind. Runs `python -m kmismatch_lite` as a user would."""

import json
import os

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
    _one_line_error(_check(tmp_path, fake_model, "-d", f"jsonl:{p}"), "no questions in split 'test'")


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
