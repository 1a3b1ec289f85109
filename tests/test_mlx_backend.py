"""The MLX backend on the real bundled student: greedy answers against llama.cpp's, and a short
real LoRA run whose adapter llama.cpp loads. MLX runs on the CPU on Linux (`mlx[cpu]`)."""

from __future__ import annotations

import json

import pytest

from conftest import bundled_model, llama_cpp_usable

pytestmark = [pytest.mark.mlx, pytest.mark.integration]

pytest.importorskip("mlx_lm", reason="needs mlx-lm: pip install 'kmismatch_lite[mlx]'")

STUDENT = "smollm2-135m-instruct"
N_PROMPTS = 30
# Measured on this Linux CPU: 29 of 30 answers identical (the MLX model holds the GGUF's own
# Q4_1/Q8_0 blocks; the two libraries still differ in float arithmetic, e.g. llama.cpp's Q8
# activations, which can flip a near-tie).
MIN_AGREEMENT = 0.8


def _skip_unless_ready():
    reason = bundled_model(STUDENT) or llama_cpp_usable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def student():
    _skip_unless_ready()
    from kmismatch_lite import cards

    return cards.resolve(STUDENT)


def _few_shot_prompts(n: int) -> list[str]:
    from kmismatch_lite import data, prompts

    qs = data.load("geonames")
    template = prompts.few_shot(qs.exemplars)
    return [template.render(q.question) for q in qs.test[:n]]


def test_mlx_greedy_agrees_with_llamacpp(student):
    from kmismatch_lite.backends.llamacpp import LlamaCppGenerator
    from kmismatch_lite.backends.mlx import MlxGenerator
    from kmismatch_lite.prompts import MAX_TOKENS, STOP

    batch = _few_shot_prompts(N_PROMPTS)
    answers = {}
    for cls in (LlamaCppGenerator, MlxGenerator):
        gen = cls(student)
        answers[cls.name] = gen.generate(batch, max_tokens=MAX_TOKENS, stop=STOP)
        gen.close()
    same = sum(a == b for a, b in zip(answers["llamacpp"], answers["mlx"]))
    assert all(a and "\n" not in a for a in answers["mlx"])
    assert same / N_PROMPTS >= MIN_AGREEMENT, list(zip(answers["llamacpp"], answers["mlx"]))


def test_prefix_cache_gives_the_same_answers_as_fresh_prompts(student):
    from kmismatch_lite.backends.mlx import MlxGenerator

    batch = _few_shot_prompts(4)
    gen = MlxGenerator(student)
    cached = gen.generate(batch, max_tokens=8, stop=["\n"])
    fresh = []
    for prompt in batch:
        gen._cache, gen._cached = [], []
        fresh += gen.generate([prompt], max_tokens=8, stop=["\n"])
    assert cached == fresh


def test_converted_model_holds_the_gguf_blocks(student):
    from kmismatch_lite import mlx_models

    folder = mlx_models.model_dir(student, "gguf")
    assert json.loads((folder / "kmm_source.json").read_text())["gguf_blocks"] is True
    assert json.loads((folder / "config.json").read_text())["quantization"]["group_size"] == 32


def test_hub_source_missing_is_a_clear_error(student, tmp_path, monkeypatch):
    from kmismatch_lite import mlx_models
    from kmismatch_lite.errors import KmmError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(KmmError, match="hf download mlx-community/SmolLM2-135M-Instruct"):
        mlx_models.model_dir(student, "hub")
