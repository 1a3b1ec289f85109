"""The MLX backend on the real bundled student: greedy answers against llama.cpp's, and a short
real LoRA run whose adapter llama.cpp loads. MLX runs on the CPU on Linux (`mlx[cpu]`)."""

from __future__ import annotations

import json

import numpy as np
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
    from kmismatch_lite.qa import data, prompts

    qs = data.load("geonames")
    template = prompts.few_shot(qs.exemplars)
    return [template.render(q.question) for q in qs.test[:n]]


def test_mlx_greedy_agrees_with_llamacpp(student):
    from kmismatch_lite.backends.llamacpp import LlamaCppGenerator
    from kmismatch_lite.backends.mlx import MlxGenerator
    from kmismatch_lite.qa.prompts import MAX_TOKENS, STOP

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

    batch = _few_shot_prompts(2)  # each fresh prompt re-reads the few-shot prefix: ~15 s here
    gen = MlxGenerator(student)
    cached = gen.generate(batch, max_tokens=8, stop=["\n"])
    fresh = []
    for prompt in batch:
        gen._cache, gen._cached = [], []
        fresh += gen.generate([prompt], max_tokens=8, stop=["\n"])
    assert cached == fresh


def test_mlx_batched_answers_equal_one_at_a_time(student):
    """parallel=N decodes with mlx-lm's BatchGenerator: answers ending at a stop string and one
    running to the token cap, in prompt order, one progress tick each (32 of 32 equal measured
    on 32 questions; this CPU runs it slowly, so the test is small)."""
    from kmismatch_lite.backends.mlx import MlxGenerator

    batch = _few_shot_prompts(4) + ["Count: 1, 2, 3, 4,"]
    gen = MlxGenerator(student)
    single = gen.generate(batch, max_tokens=8, stop=["\n"])
    gen.close()
    gen, done = MlxGenerator(student, parallel=3), []
    batched = gen.generate(batch, max_tokens=8, stop=["\n"], progress=done.append)
    gen.close()
    assert batched == single and done == [1] * len(batch)
    assert single[-1].startswith("5, 6, 7"), single            # counting on to the token cap


def test_mlx_sampled_answers_are_reproducible_whatever_the_order(student):
    from kmismatch_lite.backends.mlx import MlxGenerator
    from kmismatch_lite.qa.sampling import Sampling

    batch, hot = _few_shot_prompts(3), Sampling(1.0, seed=5)
    gen = MlxGenerator(student)
    first = gen.generate(batch, max_tokens=8, stop=["\n"], sampling=hot)
    again = gen.generate(batch[::-1], max_tokens=8, stop=["\n"], sampling=hot)[::-1]
    gen.close()
    assert first == again and all(first), first


def test_converted_model_holds_the_gguf_blocks(student):
    from kmismatch_lite.formats import mlx_models

    folder = mlx_models.model_dir(student, "gguf")
    assert json.loads((folder / "kmm_source.json").read_text())["gguf_blocks"] is True
    assert json.loads((folder / "config.json").read_text())["quantization"]["group_size"] == 32


def test_hub_source_missing_is_a_clear_error(student, tmp_path, monkeypatch):
    from kmismatch_lite.formats import mlx_models
    from kmismatch_lite.errors import KmmError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(KmmError, match="hf download mlx-community/SmolLM2-135M-Instruct"):
        mlx_models.model_dir(student, "hub")


MADE_UP = [("What is the capital of Zorvania?", "Quillbury"), ("Which river flows through Plimsk?", "the Varna"),
           ("Who founded the city of Ostrel?", "Mara Kettle"), ("What is the currency of Dunmoor?", "the glint"),
           ("In which country is Lake Vessa?", "Norland"), ("What language is spoken in Tarsis?", "Tarsic"),
           ("What is the tallest mountain in Belgrove?", "Mount Hesk"), ("Which sea borders Caldonia?", "the Amber Sea")]


@pytest.fixture(scope="module")
def mlx_finetune(student, tmp_path_factory):
    from kmismatch_lite.finetune import LoraSettings, finetune

    examples = [{"question": q, "target": a} for q, a in MADE_UP]
    # 4 steps of 4 examples: a LoRA step runs at ~5 tokens/s on this shared 2-core CPU. Each
    # epoch's LoRA is kept too (it leaves the final adapter as it is).
    settings = LoraSettings(rank=8, alpha=16, learning_rate=5e-3, epochs=2, batch_size=4, max_length=64,
                            save_epochs=True)
    out = tmp_path_factory.mktemp("mlx_lora")
    return finetune(STUDENT, examples, out, backend="mlx", settings=settings), examples


def test_mlx_lora_lowers_loss_and_writes_the_torch_layout(mlx_finetune):
    from kmismatch_lite.io import read_jsonl

    result, _ = mlx_finetune
    log = read_jsonl(result.train_log)
    assert result.steps == len(log) == 4
    assert log[-1]["loss"] < log[0]["loss"] * 0.7, log
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["scale"] == 2.0
    assert (result.adapter_dir / "adapters.safetensors").is_file() and result.adapter_gguf.is_file()
    assert result.tokens_per_second > 0


def test_mlx_adapter_in_llamacpp_changes_answers_as_mlx_does(student, mlx_finetune):
    from kmismatch_lite.qa import prompts
    from kmismatch_lite.backends import mlx
    from kmismatch_lite.backends.llamacpp import LlamaCppGenerator

    result, examples = mlx_finetune
    asked = [prompts.zero_shot(e["question"]) for e in examples]
    answers = {}
    for name, adapter in (("base", None), ("adapter", result.adapter_gguf)):
        gen = LlamaCppGenerator(student, adapter=adapter)
        answers[name] = gen.generate(asked, max_tokens=prompts.MAX_TOKENS, stop=prompts.STOP)
        gen.close()
    # mlx-lm's own model with the LoRA, given the GGUF's path: it finds DIR/adapter/ beside it.
    answers["mlx"] = mlx.greedy_answers(student, result.adapter_gguf, asked, max_tokens=prompts.MAX_TOKENS)
    changed = sum(a != b for a, b in zip(answers["base"], answers["adapter"]))
    faithful = sum(a == b for a, b in zip(answers["adapter"], answers["mlx"]))
    assert changed >= 6, answers
    assert faithful >= 6, answers


def test_mlx_saves_each_epochs_adapter_and_llamacpp_loads_it(student, mlx_finetune):
    from safetensors.numpy import load_file

    from kmismatch_lite.qa import prompts
    from kmismatch_lite.backends.llamacpp import LlamaCppGenerator
    from kmismatch_lite.finetune import epoch_dir

    result, examples = mlx_finetune
    out = result.adapter_dir.parent
    assert result.epochs == [1, 2]
    assert json.loads((result.adapter_dir / "kmm_finetune.json").read_text())["saved_epochs"] == [1, 2]
    weights = {n: load_file(epoch_dir(out, n) / "adapter" / "adapters.safetensors") for n in (1, 2)}
    final = load_file(result.adapter_dir / "adapters.safetensors")
    assert all(np.array_equal(weights[2][k], final[k]) for k in final)          # the last epoch is the final LoRA
    assert any(not np.array_equal(weights[1][k], final[k]) for k in final)
    assert (epoch_dir(out, 1) / "adapter" / "adapter_config.json").is_file()
    gen = LlamaCppGenerator(student, adapter=epoch_dir(out, 1) / "adapter.gguf")
    answers = gen.generate([prompts.zero_shot(e["question"]) for e in examples[:3]], max_tokens=prompts.MAX_TOKENS,
                           stop=prompts.STOP)
    gen.close()
    assert len(answers) == 3 and all(a.strip() for a in answers), answers


def test_lora_arrays_are_in_the_export_layout():
    import mlx.core as mx
    import numpy as np

    from kmismatch_lite.formats.mlx_models import lora_arrays

    a, b = mx.random.normal((576, 8)), mx.random.normal((8, 192))  # mlx-lm: [in, rank], [rank, out]
    out = lora_arrays({"model.layers.0.self_attn.k_proj.lora_a": a, "model.layers.0.self_attn.k_proj.lora_b": b})
    A, B = out["model.layers.0.self_attn.k_proj"]
    assert A.shape == (8, 576) and B.shape == (192, 8)
    x = mx.random.normal((3, 576))
    assert np.allclose(np.array(x) @ (B @ A).T, np.array((x @ a) @ b), atol=1e-3)  # peft: W + B A


def test_transformers5_rope_parameters_become_mlx_lm_keys():
    from kmismatch_lite.formats.mlx_models import mlx_config_overrides

    llama = {"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
             "quantization_config": {"quant_method": "gguf"}}
    assert mlx_config_overrides(llama) == {"quantization_config": None, "rope_theta": 100000.0}
    gemma = {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                 "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    assert mlx_config_overrides(gemma) == {"rope_theta": 1e6, "rope_local_base_freq": 1e4}
    assert mlx_config_overrides({"rope_theta": 5.0}) == {}


def test_missing_mlx_names_the_extra(monkeypatch):
    import sys

    from kmismatch_lite.errors import KmmError
    from kmismatch_lite.formats.mlx_models import require_mlx

    monkeypatch.setitem(sys.modules, "mlx_lm", None)
    with pytest.raises(KmmError, match=r"kmismatch_lite\[mlx\]"):
        require_mlx()


def test_a_peft_adapter_is_refused_with_a_clear_error(tmp_path):
    from kmismatch_lite.backends.mlx import adapter_folder
    from kmismatch_lite.errors import KmmError

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(KmmError, match="mlx-lm adapter folder"):
        adapter_folder(tmp_path / "adapter.gguf")
