"""The openai backend against a scripted fake server (fast), and against llama-cpp-python's own
server compared with the local llama.cpp backend (integration)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fake_openai import serve
from llama_server import free_port, start_llama_server, stop_llama_server
from kmismatch_lite import cards
from kmismatch_lite.backends.openai import OpenAIGenerator, cache_key, question_line
from kmismatch_lite.errors import KmmError
from kmismatch_lite.qa.sampling import GREEDY, Sampling

STOP, MAX_TOKENS = ["\n"], 16


def prompt(q: str) -> str:
    return f"Question: What is 1+1?\nAnswer: 2\n\nQuestion: {q}\nAnswer:"


def generator(server, **options) -> OpenAIGenerator:
    options = {"concurrency": 1, "backoff": 0.01, "timeout": 5.0, **options}
    return OpenAIGenerator(cards.resolve(f"openai:{server.url}#fake"), **options)


def ask(server, questions, sampling: Sampling = GREEDY, **options) -> list[str]:
    gen = generator(server, **options)
    try:
        return gen.generate([prompt(q) for q in questions], max_tokens=MAX_TOKENS, stop=STOP, sampling=sampling)
    finally:
        gen.close()


@pytest.mark.parametrize("failure", ["429", "500", "503", "drop"])
def test_a_transient_failure_is_retried(failure):
    with serve([failure]) as server:
        assert ask(server, ["Capital of Peru?"]) == ["answer to Capital of Peru?"]
        assert [r["step"] for r in server.requests] == [failure, "ok"]


def test_a_timeout_is_retried():
    with serve(["sleep:1.5"]) as server:
        assert ask(server, ["Capital of Chad?"], timeout=0.3) == ["answer to Capital of Chad?"]
        assert [r["step"] for r in server.requests] == ["sleep:1.5", "ok"]


def test_spent_retries_name_the_server_and_the_status():
    with serve(["500", "500", "500"]) as server:
        with pytest.raises(KmmError) as err:
            ask(server, ["Capital of Peru?"], retries=2)
        assert len(server.requests) == 3
    msg = str(err.value)
    assert server.url in msg and "HTTP 500" in msg and "3 attempts" in msg and "\n" not in msg


def test_a_client_error_is_not_retried():
    with serve(["400"]) as server:
        with pytest.raises(KmmError, match="HTTP 400"):
            ask(server, ["Capital of Peru?"])
        assert len(server.requests) == 1


@pytest.mark.parametrize("reply", ["garbage", "nochoices"])
def test_a_malformed_response_names_the_server_and_the_question(reply):
    with serve([reply]) as server:
        with pytest.raises(KmmError) as err:
            ask(server, ["Which river flows through Lima?"])
    msg = str(err.value)
    assert "malformed" in msg and server.url in msg and "Which river flows through Lima?" in msg
    assert "\n" not in msg


def test_an_unreachable_server_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    gen = OpenAIGenerator(cards.resolve(f"openai:http://127.0.0.1:{port}/v1#m"), retries=1, backoff=0.01)
    with pytest.raises(KmmError, match=f"127.0.0.1:{port}.*connection error"):
        gen.generate([prompt("x")], max_tokens=MAX_TOKENS, stop=STOP)


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_asking_only_for_the_missing_answers(tmp_path):
    questions = [f"Capital of country {i}?" for i in range(10)]
    cache = tmp_path / "answers.jsonl"
    arrived = []

    def stop_half_way(n):
        arrived.append(n)
        if len(arrived) == 5:
            raise Interrupted

    with serve() as first:
        gen = generator(first, cache=str(cache))
        with pytest.raises(Interrupted):
            gen.generate([prompt(q) for q in questions], max_tokens=MAX_TOKENS, stop=STOP, progress=stop_half_way)
    asked_first = first.questions()
    assert 5 <= len(asked_first) < 10  # the one in flight at the interruption may land too
    with serve() as second:
        progress = []
        gen = generator(second, cache=str(cache), concurrency=3)
        outputs = gen.generate([prompt(q) for q in questions], max_tokens=MAX_TOKENS, stop=STOP,
                               progress=progress.append)
    assert outputs == [f"answer to {q}" for q in questions]
    assert sorted(second.questions()) == sorted(set(questions) - set(asked_first))
    assert sum(progress) == 10
    with serve() as third:
        assert ask(third, questions, cache=str(cache)) == outputs
        assert third.requests == []


def test_the_cache_key_covers_model_prompt_cap_and_stop(tmp_path):
    cache = str(tmp_path / "c.jsonl")
    with serve() as server:
        ask(server, ["q"], cache=cache)
        ask(server, ["q"], cache=cache)
        gen = generator(server, cache=cache)
        gen.generate([prompt("q")], max_tokens=8, stop=STOP)
        gen.generate([prompt("q")], max_tokens=8, stop=["\n", "."])
        assert len(server.requests) == 3
    keys = {cache_key(m, "completions", prompt("q"), 16, STOP) for m in ("a", "b")}
    assert len(keys) == 2


def test_a_cut_short_cache_line_is_skipped(tmp_path):
    cache = tmp_path / "c.jsonl"
    with serve() as server:
        ask(server, ["one", "two"], cache=str(cache))
        cache.write_text(cache.read_text().rstrip("\n")[:-5])  # a crash mid-write
        assert ask(server, ["one", "two"], cache=str(cache)) == ["answer to one", "answer to two"]
        assert len(server.requests) == 3
    lines = cache.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["output"] == "answer to two"  # a fresh line after the cut one


def test_requests_are_greedy_with_the_stop_strings_and_the_cap():
    with serve() as server:
        ask(server, ["q"], seed=7)
        body = server.requests[0]["body"]
    assert server.requests[0]["path"] == "/v1/completions"
    assert body["model"] == "fake" and body["prompt"] == prompt("q")
    assert (body["temperature"], body["seed"], body["max_tokens"], body["stop"]) == (0.0, 7, MAX_TOKENS, STOP)
    assert body["repeat_penalty"] == 1.0


def test_sampled_requests_send_the_temperature_and_each_prompts_own_seed():
    hot = Sampling(0.5, seed=3)
    with serve() as server:
        gen = generator(server, concurrency=2, seed=7)
        gen.generate([prompt("a"), prompt("b")], max_tokens=MAX_TOKENS, stop=STOP, sampling=hot)
        gen.generate([prompt("b")], max_tokens=MAX_TOKENS, stop=STOP, sampling=hot)
        bodies = {(r["question"], i): r["body"] for i, r in enumerate(server.requests)}
    seeds = {q: body["seed"] for (q, _), body in bodies.items()}
    assert seeds == {"a": hot.prompt_seed(prompt("a")), "b": hot.prompt_seed(prompt("b"))}
    assert seeds["a"] != seeds["b"] and len(bodies) == 3
    for body in bodies.values():
        assert (body["temperature"], body["top_p"], body["top_k"], body["min_p"]) == (0.5, 1.0, 0, 0.0)


def test_the_cache_keeps_greedy_and_sampled_answers_apart(tmp_path):
    cache, replies = str(tmp_path / "c.jsonl"), iter(range(100))
    with serve(answer=lambda q: f"reply {next(replies)}") as server:
        greedy = ask(server, ["q"], cache=cache)
        sampled = ask(server, ["q"], cache=cache, sampling=Sampling(0.5, seed=1))
        assert (greedy, sampled) == (["reply 0"], ["reply 1"])
        assert ask(server, ["q"], cache=cache, sampling=Sampling(0.5, seed=1)) == sampled
        assert ask(server, ["q"], cache=cache) == greedy
        assert ask(server, ["q"], cache=cache, sampling=Sampling(0.5, seed=2)) == ["reply 2"]
        assert ask(server, ["q"], cache=cache, sampling=Sampling(1.0, seed=1)) == ["reply 3"]
        assert len(server.requests) == 4
    assert cache_key("m", "completions", "p", 16, STOP) == cache_key("m", "completions", "p", 16, STOP, GREEDY)


def test_the_chat_endpoint_sends_the_prompt_as_one_user_message():
    with serve() as server:
        assert ask(server, ["q"], endpoint="chat", greedy_extras=False) == ["answer to q"]
        req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["messages"] == [{"role": "user", "content": prompt("q")}]
    assert "repeat_penalty" not in req["body"]


def test_requests_run_concurrently_up_to_the_limit():
    # Slow answers leave time for the other requests to arrive even on a loaded machine.
    with serve(["sleep:0.8"] * 4) as server:
        ask(server, ["a", "b", "c", "d"], concurrency=3)
        assert 2 <= server.peak_in_flight <= 3, server.peak_in_flight


def test_the_api_key_is_sent_and_never_recorded(tmp_path, monkeypatch):
    secret = "sk-test-do-not-leak-123"
    monkeypatch.setenv("KMM_TEST_KEY", secret)
    with serve() as server:
        gen = generator(server, api_key_env="KMM_TEST_KEY", cache=str(tmp_path / "c.jsonl"))
        gen.generate([prompt("q")], max_tokens=MAX_TOKENS, stop=STOP)
        info = gen.info()
        assert server.requests[0]["headers"]["Authorization"] == f"Bearer {secret}"
    assert secret not in json.dumps(info) + repr(gen) + (tmp_path / "c.jsonl").read_text()
    with serve(["401"]) as server:
        with pytest.raises(KmmError) as err:
            generator(server, api_key_env="KMM_TEST_KEY").generate([prompt("q")], max_tokens=4, stop=STOP)
    assert secret not in str(err.value)


def test_info_records_the_servers_model_id(tmp_path):
    cache = str(tmp_path / "c.jsonl")
    with serve(model_id="org/served-model") as server:
        gen = generator(server, cache=cache, concurrency=2)
        gen.generate([prompt("q")], max_tokens=MAX_TOKENS, stop=STOP)
        info = gen.info()
        assert (info["server_model_id"], info["base_url"], info["concurrency"]) == ("org/served-model", server.url, 2)
        cached = generator(server, cache=cache)  # every answer cached: asks GET /models instead
        cached.generate([prompt("q")], max_tokens=MAX_TOKENS, stop=STOP)
        assert cached.info()["server_model_id"] == "org/served-model"
        assert server.requests[-1]["path"] == "/v1/models"


def test_an_adapter_or_a_local_model_is_refused(tmp_path):
    served = cards.resolve("openai:http://127.0.0.1:9/v1#m")
    with pytest.raises(KmmError, match="adapter"):
        OpenAIGenerator(served, adapter=tmp_path / "a.gguf")
    with pytest.raises(KmmError, match="served model"):
        OpenAIGenerator(cards.Model("local", tmp_path / "m.gguf"))
    with pytest.raises(KmmError, match="endpoint"):
        OpenAIGenerator(served, endpoint="embeddings")


def test_question_line_is_the_last_question():
    assert question_line(prompt("Where is Lima?")) == "Question: Where is Lima?"
    assert question_line("just text") == "just text"


def test_kmm_check_on_a_served_model(tmp_path):
    from kmismatch_lite.cli import cli

    with serve(answer=lambda q: "I don't know") as server:
        res = CliRunner().invoke(cli, ["check", f"openai:{server.url}#fake", "-n", "4", "-o", "concurrency=2",
                                       "-o", f"cache={tmp_path / 'c.jsonl'}", "--out", str(tmp_path / "out")])
        assert res.exit_code == 0, res.output
        assert len(server.questions()) == 4
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["abstained"] == 4 and metrics["model_sha256"] is None
    assert metrics["backend"]["server_model_id"] == "fake-model-id"


# ---------------------------------------------------------------- integration: llama-cpp-python's server

@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    pytest.importorskip("llama_cpp.server.app", reason="needs the server extra: pip install 'kmismatch_lite[server]'")
    gguf = cards.resolve("smollm2-135m-instruct").gguf_path
    port = free_port()
    proc = start_llama_server(gguf, "smollm2", port, log=tmp_path_factory.mktemp("server") / "server.log")
    yield f"http://127.0.0.1:{port}/v1"
    stop_llama_server(proc)


@pytest.mark.integration
def test_served_verdicts_match_the_local_backend(llama_server, tmp_path):
    from kmismatch_lite import check

    n = 60
    cmd = [sys.executable, "-m", "kmismatch_lite", "check", f"openai:{llama_server}#smollm2", "-n", str(n),
           "-o", "concurrency=2", "-o", f"cache={tmp_path / 'answers.jsonl'}", "--out", str(tmp_path / "served")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"})
    assert run.returncode == 0, run.stderr
    served = [json.loads(line) for line in (tmp_path / "served" / "samples.jsonl").read_text().splitlines()]
    local = check.check("smollm2-135m-instruct", limit=n, backend="llamacpp").samples
    assert [s["id"] for s in served] == [s["id"] for s in local]
    same_verdict = sum(a["verdict"] == b["verdict"] for a, b in zip(served, local)) / n
    same_output = sum(a["output"] == b["output"] for a, b in zip(served, local)) / n
    print(f"\nserved vs local llama.cpp on {n} questions: same verdict {same_verdict:.1%}, same output {same_output:.1%}")
    metrics = json.loads((tmp_path / "served" / "metrics.json").read_text())
    assert metrics["backend"]["server_model_id"] == "smollm2"
    assert same_verdict >= 0.95


def test_the_api_key_never_reaches_a_run_manifest(monkeypatch):
    from kmismatch_lite import cards, plan, recipes, run

    secret = "sk-test-manifest-456"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    recipe = recipes.load("quickstart", ["models.teacher=openai:http://127.0.0.1:9/v1#served-teacher"])
    models = {role: cards.resolve(recipe["models"][role]) for role in ("student", "teacher")}
    manifest = run.manifest(recipe, models, plan.build(recipe))
    text = json.dumps(manifest)
    assert "served-teacher" in text and "http://127.0.0.1:9/v1" in text
    assert secret not in text


def _gaps(server) -> list[float]:
    times = [r["time"] for r in server.requests]
    return [b - a for a, b in zip(times, times[1:])]


def test_a_retry_waits_as_long_as_retry_after_says():
    with serve(["429@1.2"]) as server:
        assert ask(server, ["Capital of Peru?"], backoff=0.01) == ["answer to Capital of Peru?"]
        (gap,) = _gaps(server)
    # Retry-After, plus up to a quarter of jitter (and the request's own time); never the tiny backoff.
    assert 1.2 <= gap < 1.2 * 1.25 + 0.5


def test_without_retry_after_the_wait_doubles_each_attempt():
    with serve(["drop", "drop"]) as server:
        assert ask(server, ["Capital of Peru?"], backoff=0.4) == ["answer to Capital of Peru?"]
        first, second = _gaps(server)
    assert 0.4 <= first < 0.4 * 1.25 + 0.4 and 0.8 <= second < 0.8 * 1.25 + 0.4


def test_a_long_retry_after_is_capped():
    from kmismatch_lite.backends import openai

    with serve([]) as server:
        gen = generator(server)
        try:
            delays = [gen._delay(0, 3600.0) for _ in range(50)]
        finally:
            gen.close()
    assert all(openai.MAX_DELAY <= d <= openai.MAX_DELAY * 1.25 for d in delays)


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_with_a_served_teacher_resumes_from_its_answer_cache(tmp_path):
    """A served teacher that starts refusing part-way through the training questions stops the run
    with one line; the rerun, against a healthy server, asks only for the answers not yet cached."""
    from conftest import llama_cpp_usable, run_kmm

    reason = llama_cpp_usable()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("peft", reason="needs the torch extra")
    out = tmp_path / "run"
    with serve(["ok"] * 10 + ["400"] * 500) as refusing:
        first = run_kmm("run", "smoke", "-s", f"models.teacher=openai:{refusing.url}#teacher", "--out", str(out),
                        timeout=1800)
    assert first.returncode == 1, first.stderr[-2000:]
    assert first.stderr.strip().splitlines()[-1].startswith("error: ") and "400" in first.stderr
    train = {json.loads(line)["question"] for line in (out / "data" / "train.jsonl").read_text().splitlines() if line}
    rows = [json.loads(line) for line in (out / "cache" / "generate-teacher.jsonl").read_text().splitlines() if line]
    cached = {r["question"].removeprefix("Question:").strip() for r in rows}
    assert cached and cached < train and cached <= set(refusing.questions())
    with serve() as healthy:
        second = run_kmm("run", "smoke", "-s", f"models.teacher=openai:{healthy.url}#teacher", "--out", str(out),
                         timeout=1800)
    assert second.returncode == 0, second.stderr[-2000:]
    asked_again = [q for q in healthy.questions() if q in train]
    assert sorted(asked_again) == sorted(train - cached)
    teacher = [json.loads(line) for line in (out / "generate" / "teacher" / "samples.jsonl").read_text().splitlines()]
    assert len(teacher) == len(train)
