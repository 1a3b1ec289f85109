"""`kmm check` on the two real bundled models through llama.cpp (no mocks), plus one fast test
of the check plumbing with a canned generator.

The integration tests take a few minutes on two cores; skip them with `-m "not integration"`.
"""

import json
import os
from pathlib import Path

import pytest

from conftest import bundled_model, llama_cpp_usable, run_kmm
from kmismatch_lite import cards, check
from kmismatch_lite.qa import data, prompts, scoring
from kmismatch_lite.io import sha256_file
from kmismatch_lite.qa.sampling import GREEDY, Sampling

STUDENT, TEACHER = "smollm2-135m-instruct", "gemma-3-270m"


class CannedGenerator:
    """A generator that answers from a dict (question -> answer), for the plumbing test."""

    name = "canned"
    replies: dict = {}
    sampling = None  # what the last generate() was asked for

    def __init__(self, model, *, adapter=None, seed=0):
        self.prompts = []

    def generate(self, prompts_, *, max_tokens, stop, progress=None, sampling=GREEDY):
        CannedGenerator.sampling = sampling
        outs = []
        for p in prompts_:
            q = p.rsplit("Question: ", 1)[1].split("\n", 1)[0]
            outs.append(self.replies.get(q, "I don't know"))
            if progress:
                progress(1)
        return outs

    def info(self):
        return {"backend": self.name}

    def close(self):
        pass


def test_check_plumbing_with_canned_answers(tmp_path, monkeypatch):
    from kmismatch_lite import backends

    qfile = tmp_path / "q.jsonl"
    rows = [{"id": f"q{i}", "question": f"Capital {i}?", "answers": [f"City{i}"]} for i in range(60)]
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setitem(backends.GENERATORS, "canned", f"{__name__}:CannedGenerator")
    CannedGenerator.replies = {f"Capital {i}?": (f"It is City{i}." if i % 3 == 0 else "Atlantis")
                               for i in range(0, 60, 2)}
    res = check.check(str(model), dataset=f"jsonl:{qfile}", backend="canned", out=tmp_path / "out")
    test_ids = [s["id"] for s in res.samples]
    even = [int(i[1:]) for i in test_ids if int(i[1:]) % 2 == 0]
    assert res.tally.abstained == len(test_ids) - len(even)
    assert res.tally.correct == sum(i % 3 == 0 for i in even)
    assert res.tally.wrong == sum(i % 3 != 0 for i in even)
    assert res.tally.exact_match == 0          # "It is CityN." contains, but is not exactly, the gold
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["n"] == len(test_ids) and m["correct"] == res.tally.correct
    assert m["model_sha256"] == sha256_file(model) and m["prompt_style"] == "3-shot"
    assert len((tmp_path / "out" / "samples.jsonl").read_text().splitlines()) == m["n"]
    zs = check.check(str(model), dataset=f"jsonl:{qfile}", backend="canned", zero_shot=True)
    assert zs.metrics["prompt"] == "Question: {question}\nAnswer:" and zs.metrics["prompt_style"] == "zero-shot"
    assert m["sampling"] == {"temperature": 0.0, "method": "greedy"} and CannedGenerator.sampling == GREEDY
    hot = check.check(str(model), dataset=f"jsonl:{qfile}", backend="canned", temperature=0.7, seed=3)
    assert CannedGenerator.sampling == Sampling(0.7, 3)
    assert (hot.metrics["sampling"]["temperature"], hot.metrics["sampling"]["seed"]) == (0.7, 3)


def _need(*models):
    why = llama_cpp_usable()
    if why:
        pytest.skip(why)
    for m in models:
        why = bundled_model(m)
        if why:
            pytest.skip(f"{m}: {why}")


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """`kmm check MODEL -n 40 --out DIR` for both bundled models, as a user types it."""
    _need(STUDENT, TEACHER)
    out = {}
    for name in (STUDENT, TEACHER):
        d = tmp_path_factory.mktemp(name) / "check"
        res = run_kmm("check", name, "-n", "40", "--out", str(d))
        assert res.returncode == 0, res.stderr[-2000:]
        assert "Traceback" not in res.stderr
        out[name] = (d, res)
    return out


@pytest.fixture(scope="module")
def eighty():
    """The first 80 test questions of the default built-in set, and the default 3-shot prompt."""
    qs = data.load("geonames", seed=0)
    return qs.test[:80], prompts.few_shot(qs.exemplars, seed=0)


@pytest.fixture(scope="module")
def lib_runs(eighty):
    _need(STUDENT, TEACHER)
    questions, template = eighty
    return {name: check.evaluate(cards.resolve(name), questions, template, seed=0)
            for name in (STUDENT, TEACHER)}


@pytest.mark.integration
@pytest.mark.parametrize("name", [STUDENT, TEACHER])
def test_cli_check_writes_consistent_outputs(cli_runs, name):
    d, res = cli_runs[name]
    samples = [json.loads(l) for l in (d / "samples.jsonl").read_text().splitlines()]
    m = json.loads((d / "metrics.json").read_text())
    assert len(samples) == m["n"] == 40
    for s in samples:
        assert set(s) >= {"id", "question", "answers", "output", "verdict"}
        assert s["verdict"] == scoring.verdict(s["output"], s["answers"])
    counts = {v: sum(s["verdict"] == v for s in samples) for v in scoring.VERDICTS}
    assert (m["correct"], m["wrong"], m["abstained"]) == (counts["correct"], counts["wrong"], counts["abstained"])
    assert m["correct"] + m["wrong"] + m["abstained"] == m["n"]
    assert m["exact_match"] == sum(scoring.exact_match(s["output"], s["answers"]) for s in samples)
    for v in scoring.VERDICTS:
        assert m[f"{v}_rate"] == pytest.approx(counts[v] / 40)
    assert m["hallucination_rate"] == pytest.approx(counts["wrong"] / 40)
    assert m["model"] == name and m["model_sha256"] == sha256_file(cards.resolve(name).gguf_path)
    assert "Question: {question}\nAnswer:" in m["prompt"] and m["prompt_style"] == "3-shot"
    assert m["prompt"].count("Question:") == 4
    assert m["seed"] == 0 and m["seconds"] > 0 and m["questions_per_second"] > 0
    assert m["dataset"] == "geonames" and m["split"] == "test"
    # the table on stdout, the summary line on stderr
    assert "correct" in res.stdout and f"checked 40 questions with {name}" in res.stderr
    # answers are real text, not empty strings or run-on continuations
    assert sum(bool(s["output"]) for s in samples) >= 35
    assert all("\n" not in s["output"] and "Question:" not in s["output"] for s in samples)


@pytest.mark.integration
def test_greedy_answers_deterministic_across_processes(cli_runs, eighty):
    """The CLI run (another process) and a library run of the same 40 questions answer alike.
    (Batched answers are compared on the same questions: decoded together with other prompts, a
    near-tie can go the other way, see tests/test_llamacpp_batched.py.)"""
    questions, template = eighty
    for name in (STUDENT, TEACHER):
        d, _ = cli_runs[name]
        cli = [json.loads(l) for l in (d / "samples.jsonl").read_text().splitlines()]
        lib = check.evaluate(cards.resolve(name), questions[:40], template, seed=0).samples
        assert [s["id"] for s in cli] == [s["id"] for s in lib]
        assert [s["output"] for s in cli] == [s["output"] for s in lib], name


@pytest.mark.integration
def test_greedy_answers_deterministic_in_process(eighty):
    _need(STUDENT)
    questions, template = eighty
    model = cards.resolve(STUDENT)
    a = check.evaluate(model, questions[:30], template).samples
    b = check.evaluate(model, questions[:30], template).samples
    assert [s["output"] for s in a] == [s["output"] for s in b]


@pytest.mark.integration
def test_teacher_knows_more_than_student(lib_runs):
    s, t = lib_runs[STUDENT].tally, lib_runs[TEACHER].tally
    print(f"\n80 test questions, 3-shot: {STUDENT} {s.correct} correct / {s.wrong} wrong, "
          f"{TEACHER} {t.correct} correct / {t.wrong} wrong")
    assert t.correct > s.correct
    assert s.correct >= 10           # the student is weak, but not useless


@pytest.mark.integration
@pytest.mark.parametrize("name", [STUDENT, TEACHER])
def test_prefix_cache_matches_fresh_create_completion(eighty, name):
    """The one-at-a-time generator (few-shot prefix evaluated once) answers as a fresh
    create_completion does (batched decoding: test_llamacpp_batched.py)."""
    _need(name)
    from kmismatch_lite.backends.llamacpp import LlamaCppGenerator, _quiet_llama

    questions, template = eighty
    rendered = [template.render(q.question) for q in questions[:30]]
    model = cards.resolve(name)
    gen = LlamaCppGenerator(model, seed=0, parallel=1)
    ours = gen.generate(rendered, max_tokens=prompts.MAX_TOKENS, stop=prompts.STOP)
    gen.close()
    llm = _quiet_llama(model_path=str(model.gguf_path), n_ctx=1024, seed=0, n_batch=512,
                       n_threads=os.cpu_count() or 2, n_gpu_layers=0)
    fresh = []
    for p in rendered:
        llm.reset()      # no prefix reuse at all: the whole prompt is evaluated anew
        r = llm.create_completion(p, max_tokens=prompts.MAX_TOKENS, temperature=0, stop=prompts.STOP)
        fresh.append(r["choices"][0]["text"].strip())
    llm.close()
    diffs = [(q, a, b) for q, a, b in zip(rendered, ours, fresh) if a != b]
    assert not diffs, diffs[:3]


@pytest.mark.integration
def test_truncated_model_file_is_one_clear_line(tmp_path):
    _need(STUDENT)
    src = cards.resolve(STUDENT).gguf_path
    p = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        p.write_bytes(f.read(1 << 20))
    out = tmp_path / "out"
    res = run_kmm("check", str(p), "-n", "3", "--out", str(out))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "truncated.gguf" in lines[0], res.stderr
    assert not out.exists()


@pytest.mark.integration
def test_adapter_that_is_not_a_lora_is_one_clear_line(tmp_path):
    # a real GGUF that is a model, not a LoRA adapter, given as --adapter
    _need(STUDENT)
    out = tmp_path / "out"
    res = run_kmm("check", STUDENT, "-n", "3", "--adapter", str(cards.resolve(STUDENT).gguf_path),
                  "--out", str(out))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "adapter" in lines[0], res.stderr
    assert not out.exists()


@pytest.mark.integration
def test_truncated_adapter_is_one_clear_line(tmp_path):
    # a GGUF header (right magic) cut short: llama.cpp refuses it, and we must not crash
    _need(STUDENT)
    src = cards.resolve(STUDENT).gguf_path
    p = tmp_path / "lora.gguf"
    with open(src, "rb") as f:
        p.write_bytes(f.read(4096))
    res = run_kmm("check", STUDENT, "-n", "3", "--adapter", str(p), "--out", str(tmp_path / "out"))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "lora.gguf" in lines[0]
    assert "could not load the adapter" in lines[0] or "corrupt" in lines[0]
    assert not (tmp_path / "out").exists()
