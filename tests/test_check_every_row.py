"""`kmm check` on a local question file answers every row (split `all`), against the scripted
OpenAI-compatible server, and an API key reaches no output, log or cache file."""

from __future__ import annotations

import json

from conftest import run_kmm
from fake_openai import serve
from kmismatch_lite import check
from kmismatch_lite.qa import data

N_ROWS = 300


def _question_file(tmp_path, n: int = N_ROWS):
    p = tmp_path / "mine.jsonl"
    p.write_text("".join(json.dumps({"id": f"r{i}", "question": f"What is item {i}?", "answers": [f"v{i}"]}) + "\n"
                         for i in range(n)))
    return p


def _check(server, qfile, out, *args, env=None):
    return run_kmm("check", f"openai:{server.url}#fake", "-d", f"jsonl:{qfile}", "--out", str(out),
                   "-o", "concurrency=8", *args, env=env)


def test_a_local_file_is_checked_whole_in_file_order(tmp_path):
    qfile = _question_file(tmp_path)
    with serve() as server:
        res = _check(server, qfile, tmp_path / "out")
        assert res.returncode == 0, res.stderr
        asked = server.questions()
    samples = [json.loads(l) for l in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == [f"r{i}" for i in range(N_ROWS)]
    assert sorted(asked) == sorted(f"What is item {i}?" for i in range(N_ROWS))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["n"], metrics["split"]) == (N_ROWS, "all")
    assert "checked 300 questions" in res.stderr and "(all split)" in res.stdout


def test_split_still_selects_one(tmp_path):
    qfile = _question_file(tmp_path)
    qs = data.load(f"jsonl:{qfile}")
    with serve() as server:
        res = _check(server, qfile, tmp_path / "out", "--split", "test")
        assert res.returncode == 0, res.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["n"], metrics["split"]) == (len(qs.test), "test") and 0 < len(qs.test) < N_ROWS


def test_exemplars_are_never_checked_questions(tmp_path):
    qfile = _question_file(tmp_path, 40)
    qs = data.load(f"jsonl:{qfile}")
    mine = {q.question for q in qs.everything}
    for split in ("all", "exemplars"):
        prefix = check.exemplars_for(qs, split, seed=0)
        assert prefix and not mine & {q.question for q in prefix}
    assert check.exemplars_for(qs, "test", 0) == qs.exemplars
    assert check.default_split(f"jsonl:{qfile}") == "all" and check.default_split("geonames") == "test"


def test_all_split_of_a_built_in_set_holds_every_question():
    qs = data.load("geonames:cities=100")
    every = qs.split("all")
    assert len(every) == len(qs.train) + len(qs.test) + len(qs.exemplars)
    assert {q.id for q in every} == {q.id for s in data.SPLITS for q in qs.split(s)}


def test_an_api_key_reaches_no_file_or_log(tmp_path):
    secret = "sk-never-written-7f3a9c"
    qfile = _question_file(tmp_path, 20)
    cache = tmp_path / "answers.jsonl"
    with serve() as server:
        res = _check(server, qfile, tmp_path / "out", "-o", f"cache={cache}", env={"OPENAI_API_KEY": secret})
        assert res.returncode == 0, res.stderr
        assert all(r["headers"].get("Authorization") == f"Bearer {secret}" for r in server.requests)
    with serve(["401"]) as server:  # a refused key: the error line names the server, not the key
        bad = _check(server, qfile, tmp_path / "bad", env={"OPENAI_API_KEY": secret})
    assert bad.returncode != 0 and "401" in bad.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != qfile]
    assert cache in written and len(written) >= 3
    for text in [p.read_text() for p in written] + [res.stdout, res.stderr, bad.stdout, bad.stderr]:
        assert secret not in text
