"""The Hugging Face paths with no internet: a local hub (`fake_hub`, reached through
`HF_ENDPOINT`) holds a few TriviaQA `rc.nocontext` and PopQA rows in the real repos' layout and a
small GGUF; the real loaders, `kmm pull` and an `hf:` model run through `huggingface_hub` and
`datasets` against it, then again from the cache alone with the hub offline."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import bundled_model, llama_cpp_usable, run_kmm
from fake_hub import Repo, serve

pytest.importorskip("datasets", reason="the hub extra is not installed: pip install 'kmismatch_lite[hub]'")
pa = pytest.importorskip("pyarrow", reason="pyarrow (the parquet extra) writes the hub's Parquet files")
import pyarrow.parquet as pq  # noqa: E402

TRIVIA, POPQA, GGUF_REPO = "mandarjoshi/trivia_qa", "akariasai/PopQA", "kmm-test/tiny-gguf"
TRIVIA_CARD = """---
configs:
- config_name: rc.nocontext
  data_files:
  - split: train
    path: rc.nocontext/train-*
  - split: validation
    path: rc.nocontext/validation-*
- config_name: unfiltered.nocontext
  data_files:
  - split: train
    path: unfiltered.nocontext/train-*
---
# TriviaQA (a few rows for tests)
"""


def _parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def trivia_row(i: int, split: str) -> dict:
    value = f"Answer {split} {i}"
    return {"question": f"Trivia {split} question {i}?", "question_id": f"tqa_{split}_{i}",
            "question_source": "http://www.example.org/",
            "answer": {"aliases": [value, f"Alias {split} {i}"], "normalized_aliases": [value.lower()],
                       "normalized_value": value.lower(), "type": "WikipediaEntity", "value": value}}


def popqa_row(i: int) -> dict:
    return {"id": 1000 + i, "subj": f"Subject {i // 2}", "prop": "occupation", "obj": f"Job {i}",
            "subj_id": i, "prop_id": 22, "obj_id": 100 + i, "s_aliases": "[]", "o_aliases": json.dumps([f"J{i}"]),
            "s_uri": "", "o_uri": "", "s_wiki_title": "", "o_wiki_title": "", "s_pop": 10 * i + 1, "o_pop": 5,
            "question": f"What is Subject {i // 2}'s occupation {i}?",
            "possible_answers": json.dumps([f"Job {i}", f"J{i}"])}


def hub_repos(gguf) -> tuple[dict, dict]:
    trivia = Repo({
        "README.md": TRIVIA_CARD.encode(),
        "rc.nocontext/train-00000-of-00001.parquet": _parquet([trivia_row(i, "train") for i in range(30)]),
        "rc.nocontext/validation-00000-of-00001.parquet": _parquet([trivia_row(i, "validation") for i in range(6)]),
        "unfiltered.nocontext/train-00000-of-00001.parquet": _parquet([trivia_row(i, "other") for i in range(3)]),
    })
    popqa = Repo({"README.md": b"# PopQA (a few rows for tests)\n",
                  "data/test-00000-of-00001.parquet": _parquet([popqa_row(i) for i in range(40)])})
    model = Repo({"README.md": b"# a small GGUF\n", "model-q8.gguf": gguf})
    return {GGUF_REPO: model}, {TRIVIA: trivia, POPQA: popqa}


@pytest.fixture(scope="module")
def student_gguf(tmp_path_factory):
    """The bundled student's GGUF, or (without the models extra) a stand-in that only pulls."""
    from kmismatch_lite import cards

    if bundled_model("smollm2-135m-instruct"):
        path = tmp_path_factory.mktemp("gguf") / "stand-in.gguf"
        path.write_bytes(b"GGUF" + bytes(range(256)) * (3 << 12))  # 3 MiB: enough for a drawn bar
        return path
    return cards.resolve("smollm2-135m-instruct").gguf_path


@pytest.fixture(scope="module")
def hub(student_gguf, tmp_path_factory):
    """The running local hub and an empty Hugging Face home that only it can fill."""
    models, datasets = hub_repos(student_gguf)
    home = tmp_path_factory.mktemp("hf_home")
    with serve(models, datasets) as server:
        server.home = home
        yield server


def online(hub) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(hub.home), "HF_HUB_CACHE": None, "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0", "HF_DATASETS_CACHE": None, "HF_TOKEN": None, "HF_XET_CACHE": None}


def offline(hub) -> dict:
    return {**online(hub), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _rows(res, split: str) -> list[str]:
    return [line for line in res.stdout.splitlines() if line.strip().startswith(f"tqa_{split}")]


def test_triviaqa_through_the_hub_then_from_the_cache(hub):
    res = run_kmm("data", "triviaqa", "--show", "100", env=online(hub))
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "%|" not in res.stderr and "Generating" not in res.stderr
    # validation is the test split; 16 of the 30 train rows become exemplars
    counts = {line.split()[0]: line.split()[1] for line in res.stdout.splitlines() if line.split()[:1] in
              (["train"], ["test"], ["exemplars"])}
    assert counts == {"train": "14", "test": "6", "exemplars": "16"}, res.stdout
    assert len(_rows(res, "validation")) == 6 and not _rows(res, "other")
    assert "Answer validation" in res.stdout
    assert any(p.startswith(f"/datasets/{TRIVIA}/resolve/") for _, p in hub.requests)
    again = run_kmm("data", "triviaqa", "--show", "100", env=offline(hub))
    assert again.returncode == 0, again.stderr
    assert _rows(again, "validation") == _rows(res, "validation")


def test_popqa_through_the_hub(hub):
    res = run_kmm("data", "popqa", "--show", "100", env=online(hub))
    assert res.returncode == 0, res.stderr
    assert "occupation" in res.stdout and "Traceback" not in res.stderr
    counts = {line.split()[0]: int(line.split()[1]) for line in res.stdout.splitlines() if line.split()[:1] in
              (["train"], ["test"])}
    assert counts["train"] + counts["test"] == 40 - 16 and counts["test"] > 0, res.stdout


def test_hub_loaders_as_a_library(hub):
    """The library call itself (`data.load`), with the answers and aliases it reads."""
    script = ("import json; from kmismatch_lite.qa import data\n"
              "t = data.load('triviaqa:test=2'); p = data.load('popqa', seed=1)\n"
              "print(json.dumps({'t': [q.to_dict() for q in t.test], 'p': p.test[0].to_dict(), 'n': len(p.split('all'))}))")
    env = {k: v for k, v in {**os.environ, **online(hub)}.items() if v is not None}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert len(got["t"]) == 2
    for q in got["t"]:
        i = q["id"].rsplit("_", 1)[1]
        assert q["answers"] == [f"Answer validation {i}", f"Answer validation {i}", f"Alias validation {i}"]
    p = got["p"]
    i = int(p["id"]) - 1000
    assert p["answers"] == [f"Job {i}", f"J{i}"] and p["relation"] == "occupation" and p["popularity"] == 10 * i + 1
    assert got["n"] == 40


def test_pull_then_check_an_hf_model_offline(hub, student_gguf, tmp_path):
    spec = f"hf:{GGUF_REPO}:model-q8.gguf"
    missing = run_kmm("check", spec, "-n", "1", env=offline(hub))
    assert missing.returncode == 1 and "kmm pull" in missing.stderr
    res = run_kmm("pull", spec, env=online(hub))
    assert res.returncode == 0, res.stderr
    path = res.stdout.strip().splitlines()[-1]
    assert path.startswith(str(hub.home)) and "models--kmm-test--tiny-gguf/snapshots/" in path
    with open(path, "rb") as a, open(student_gguf, "rb") as b:
        assert a.read(1 << 20) == b.read(1 << 20)
    assert "%|" not in res.stderr and "downloading model-q8.gguf" in res.stderr
    assert run_kmm("pull", spec, env=offline(hub)).stdout.strip().splitlines()[-1] == path
    if llama_cpp_usable() or bundled_model("smollm2-135m-instruct"):
        pytest.skip(llama_cpp_usable() or bundled_model("smollm2-135m-instruct"))
    out = tmp_path / "check"
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question": "What is the capital of France?", "answers": ["Paris"]}) + "\n")
    res = run_kmm("check", spec, "-d", f"jsonl:{qfile}", "--out", str(out), env=offline(hub))
    assert res.returncode == 0, res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == spec and metrics["model_file"] == path and metrics["n"] == 1


def test_an_unknown_hub_repo_is_one_line(hub):
    res = run_kmm("pull", "hf:kmm-test/absent:model.gguf", env=online(hub))
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 1 and len(lines) == 1 and "could not download" in lines[0], res.stderr
    shutil.rmtree(hub.home / "hub" / "models--kmm-test--absent", ignore_errors=True)


def test_pull_a_card_by_name(hub, tmp_path):
    """`kmm pull NAME` of a card whose GGUF is on the hub downloads the card's file into the hub
    cache, and finds it there again offline."""
    cards_dir = tmp_path / "cards"
    cards_dir.mkdir()
    (cards_dir / "tiny-hub.toml").write_text(
        'name = "tiny-hub"\nfamily = "llama"\nparams = "135M"\nlicense = "Apache-2.0"\nprompt_style = "base"\n'
        'description = "A hub card for tests."\n\n'
        f'[gguf]\nhf_repo = "{GGUF_REPO}"\nhf_file = "model-q8.gguf"\n')
    env = {**online(hub), "KMM_MODELS_DIR": str(cards_dir)}
    res = run_kmm("pull", "tiny-hub", env=env)
    assert res.returncode == 0, res.stderr
    path = res.stdout.strip().splitlines()[-1]
    assert path.startswith(str(hub.home)) and path.endswith("model-q8.gguf") and os.path.getsize(path) > 1 << 20
    again = run_kmm("pull", "tiny-hub", env={**offline(hub), "KMM_MODELS_DIR": str(cards_dir)})
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == path
