"""`kmm check --json --fail-above` and `kmm compare` on the bundled models: the JSON is what the
written samples say, the exit status gates on the rate, and compare's paired statistics are
McNemar's exact test (scipy's binomial test) and the runner's own comparison."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import bundled_model, llama_cpp_usable, run_kmm

pytestmark = pytest.mark.integration

STUDENT, TEACHER = "smollm2-135m-instruct", "gemma-3-270m"


@pytest.fixture(autouse=True)
def _needs_models():
    reason = llama_cpp_usable() or bundled_model(STUDENT) or bundled_model(TEACHER)
    if reason:
        pytest.skip(reason)


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_check_json_is_the_written_samples_and_the_gate_sets_the_exit_status(tmp_path):
    proc = run_kmm("check", STUDENT, "-n", "20", "--json", "--out", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    rows = _rows(tmp_path / "c" / "samples.jsonl")
    verdicts = [r["verdict"] for r in rows]
    assert got["schema"] == "kmm-check/1" and got["n"] == len(rows) == 20
    assert (got["correct"], got["wrong"], got["abstained"]) == tuple(verdicts.count(v) for v in ("correct", "wrong", "abstained"))
    assert got["wrong_rate"] == got["wrong"] / 20 and "passed" not in got
    from kmismatch_lite import cards

    gguf = cards.resolve(STUDENT).gguf_path
    assert got["model_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert 0 < got["wrong"] < 20, "the gate test needs a rate strictly between 0 and 1"

    rate = got["wrong_rate"]
    at = run_kmm("check", STUDENT, "-n", "20", "--json", "--fail-above", str(rate))
    assert at.returncode == 0 and json.loads(at.stdout)["passed"] is True
    below = run_kmm("check", STUDENT, "-n", "20", "--json", "--fail-above", str(rate - 0.01))
    assert below.returncode == 3, below.stderr
    assert json.loads(below.stdout)["passed"] is False
    assert below.stderr.strip().splitlines()[-1].startswith("failed: wrong-answer rate")
    bad = run_kmm("check", STUDENT, "-n", "5", "--fail-above", "1.5")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_compare_is_mcnemar_and_the_runners_comparison_and_gates_on_the_difference(tmp_path):
    from scipy.stats import binomtest

    from kmismatch_lite import stats

    out = tmp_path / "cmp"
    proc = run_kmm("compare", STUDENT, TEACHER, "-n", "40", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    c = json.loads(proc.stdout)
    a, b = _rows(out / "a" / "samples.jsonl"), _rows(out / "b" / "samples.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == c["n"] == 40
    wa, wb = [r["verdict"] == "wrong" for r in a], [r["verdict"] == "wrong" for r in b]
    b_only = sum(y and not x for x, y in zip(wa, wb))
    a_only = sum(x and not y for x, y in zip(wa, wb))
    assert (c["b_only_wrong"], c["a_only_wrong"]) == (b_only, a_only) and b_only + a_only > 0
    assert (c["wrong_a"], c["wrong_b"]) == (sum(wa), sum(wb))
    assert c["wrong_rate_difference"] == pytest.approx((sum(wb) - sum(wa)) / 40)
    assert c["mcnemar_p"] == pytest.approx(binomtest(b_only, b_only + a_only, 0.5).pvalue)
    runner = stats.paired_wrong_test(wb, wa, n_boot=2000, seed=0)
    assert c["bootstrap_95ci"] == [runner.ci_low, runner.ci_high]
    assert c["a"]["model"] == STUDENT and c["b"]["model"] == TEACHER
    assert json.loads((out / "compare.json").read_text(encoding="utf-8")) == c

    points = 100 * c["wrong_rate_difference"]
    worse = run_kmm("compare", STUDENT, TEACHER, "-n", "40", "--fail-if-worse", str(points - 0.5))
    assert worse.returncode == 3, worse.stderr
    fine = run_kmm("compare", STUDENT, TEACHER, "-n", "40", "--fail-if-worse", str(points + 0.5))
    assert fine.returncode == 0, fine.stderr
    assert "McNemar exact" in fine.stdout and "B minus A" in fine.stdout


def test_own_exemplars_shots_and_answer_length_reach_the_prompt_and_the_record(tmp_path):
    exemplars = tmp_path / "ex.jsonl"
    rows = [{"question": "What is 2 + 2?", "answers": ["4"]},
            {"question": "What colour is the sky on a clear day?", "answers": ["Blue"]},
            {"question": "How many legs has a spider?", "answers": ["Eight"]}]
    exemplars.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "c"
    proc = run_kmm("check", STUDENT, "-n", "6", "--exemplars", f"jsonl:{exemplars}", "--shots", "2",
                   "--max-tokens", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    shown = [r for r in rows if f"Question: {r['question']}\nAnswer: {r['answers'][0]}\n\n" in m["template"]]
    assert len(shown) == 2 and m["template"].count("Question:") == 3
    assert m["template"].endswith("Question: {question}\nAnswer:") and m["prompt_style"] == "2-shot"
    assert m["exemplars_sha256"] == hashlib.sha256(exemplars.read_bytes()).hexdigest()
    assert m["max_tokens"] == 1 and m["schema"] == "kmm-check/1"
    import llama_cpp

    from kmismatch_lite import cards

    vocab = llama_cpp.Llama(str(cards.resolve(STUDENT).gguf_path), vocab_only=True, verbose=False)
    for row in _rows(out / "samples.jsonl"):
        assert len(vocab.tokenize(row["output"].encode(), add_bos=False)) <= 1, row["output"]
    shown_again = run_kmm("report", str(out))
    assert shown_again.returncode == 0 and STUDENT in shown_again.stdout and "2-shot" in shown_again.stdout


@pytest.mark.parametrize("args, says", [
    (("--zero-shot", "--exemplars", "jsonl:{ex}"), "drop --zero-shot"),
    (("--exemplars", "geonames"), "--exemplars takes a local question file"),
    (("--dataset", "jsonl:{ex}", "--exemplars", "jsonl:{ex}"), "shares questions"),
])
def test_bad_exemplars_are_one_line(tmp_path, args, says):
    ex = tmp_path / "ex.jsonl"
    ex.write_text(json.dumps({"question": "What is 2 + 2?", "answers": ["4"]}) + "\n", encoding="utf-8")
    proc = run_kmm("check", STUDENT, "-n", "2", *[a.format(ex=ex) for a in args])
    assert proc.returncode == 1 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _jinja_render(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """The chat template rendered as Hugging Face's tokenizers render it: jinja2's sandbox,
    trimmed blocks, a generation prompt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, bos_token=bos, eos_token=eos,
                                            add_generation_prompt=True)


def test_chat_prompts_are_the_models_own_template_with_turn_markers_as_tokens(tmp_path):
    import llama_cpp

    from kmismatch_lite import cards
    from kmismatch_lite.qa import data, prompts
    from kmismatch_lite.backends.llamacpp import LlamaCppGenerator

    out = tmp_path / "c"
    proc = run_kmm("check", STUDENT, "-n", "5", "--chat", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    model = cards.resolve(STUDENT)
    vocab = llama_cpp.Llama(str(model.gguf_path), vocab_only=True, verbose=False)
    template = vocab.metadata["tokenizer.chat_template"]
    turns = []
    for q in prompts.draw(data.load("geonames", seed=0).exemplars, 3, 0):
        turns += [{"role": "user", "content": q.question}, {"role": "assistant", "content": q.answers[0]}]
    turns.append({"role": "user", "content": "{question}"})
    assert m["template"] == _jinja_render(template, turns, "<|im_start|>", "<|im_end|>")
    assert m["prompt_style"] == "3-shot chat" and m["backend"]["special"] is True

    marker = vocab.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert len(marker) == 1
    prompt = m["template"].replace("{question}", "What is the capital of France?")
    gen = LlamaCppGenerator(model, special=True, parallel=1)
    try:
        assert gen._tokens(prompt, 16).count(marker[0]) == 9      # system, 3 x 2 exemplar turns, question, reply
    finally:
        gen.close()
    plain = vocab.tokenize(prompt.encode(), add_bos=True, special=False)
    assert marker[0] not in plain


def test_chat_needs_a_template_and_a_chat_card_is_used_by_check_and_refused_by_run(tmp_path):
    gemma = run_kmm("check", TEACHER, "-n", "2", "--chat")
    assert gemma.returncode == 1 and "has no chat template" in gemma.stderr
    assert len(gemma.stderr.strip().splitlines()) == 1

    from conftest import REPO

    folder = tmp_path / "cards"
    folder.mkdir()
    for name in (STUDENT, TEACHER):
        text = (REPO / "models" / f"{name}.toml").read_text(encoding="utf-8")
        if name == STUDENT:
            text = text.replace('prompt_style = "base"', 'prompt_style = "chat"')
        (folder / f"{name}.toml").write_text(text, encoding="utf-8")
    env = {"KMM_MODELS_DIR": str(folder)}
    out = tmp_path / "c"
    checked = run_kmm("check", STUDENT, "-n", "3", "--out", str(out), env=env)
    assert checked.returncode == 0, checked.stderr
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["prompt_style"] == "3-shot chat"
    ran = run_kmm("run", "smoke", "--out", str(tmp_path / "run"), env=env, cwd=tmp_path)
    assert ran.returncode == 1 and "asks for chat prompts" in ran.stderr and not (tmp_path / "run").exists()


def test_deterministic_answers_one_at_a_time_from_an_empty_cache(tmp_path):
    proc = run_kmm("check", TEACHER, "-n", "5", "--deterministic", "--json")
    assert proc.returncode == 0, proc.stderr
    backend = json.loads(proc.stdout)["backend"]
    assert backend["parallel"] == 1 and backend["fresh"] is True
    served = run_kmm("check", STUDENT, "-n", "2", "--deterministic", "--backend", "mlx")
    assert served.returncode == 1 and "--deterministic is for the llamacpp backend" in served.stderr
