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


# The classroom recipe's training controls, tiny: 6 training and 2 dev examples in batches of 3 for at
# most 3 epochs (6 steps), a linear rate decay, patience 1, each epoch's LoRA kept. The rate is
# deliberately too large, so the dev loss rises after the first epoch and training stops after the
# second (measured: 14.85, then 17.09).
DEV_LR = 0.05


@pytest.fixture(scope="module")
def mlx_dev_finetune(student, tmp_path_factory):
    from kmismatch_lite.finetune import LoraSettings, finetune

    examples = [{"question": q, "target": a} for q, a in MADE_UP]
    settings = LoraSettings(rank=8, alpha=16, learning_rate=DEV_LR, epochs=3, batch_size=3, max_length=48,
                            dev_fraction=0.25, patience=1, lr_schedule="linear", save_epochs=True)
    result = finetune(STUDENT, examples, tmp_path_factory.mktemp("mlx_dev"), backend="mlx", settings=settings)
    info = json.loads((result.adapter_dir / "kmm_finetune.json").read_text())
    return result, info, examples, settings


def test_mlx_dev_split_holds_out_the_rows_torch_holds_out(student, mlx_dev_finetune):
    """The reported dev loss is the kept LoRA's loss on exactly the rows of lora_data.dev_split
    (what torch_lora.fit holds out for the same examples, fraction and seed): of all 28 pairs of
    the 8 examples, only that pair gives it."""
    from itertools import combinations

    from kmismatch_lite import lora_data
    from kmismatch_lite.backends.mlx import dev_loss
    from kmismatch_lite.formats import mlx_models

    result, info, examples, s = mlx_dev_finetune
    _, dev_ids = lora_data.dev_split(len(examples), s.dev_fraction, s.seed)
    assert info["dev_examples"] == len(dev_ids) == 2
    net, tokenizer = mlx_models.load(mlx_models.model_dir(student, "gguf"), result.adapter_dir)
    encoded, _ = lora_data.encode(tokenizer._tokenizer, examples, s.max_length)
    row_loss = [dev_loss(net, [e], 1) for e in encoded]
    targets = [len(e.ids) - e.n_prompt for e in encoded]

    def pair_loss(i, j):
        return (row_loss[i] * targets[i] + row_loss[j] * targets[j]) / (targets[i] + targets[j])

    matches = [pair for pair in combinations(range(len(examples)), 2)
               if abs(pair_loss(*pair) - info["dev_loss"]) < 2e-3]
    assert matches == [tuple(dev_ids)], (dev_ids, info["dev_loss"], row_loss)


def test_mlx_patience_stops_early_and_keeps_the_best_epochs_lora(mlx_dev_finetune):
    from safetensors.numpy import load_file

    from kmismatch_lite.finetune import epoch_dir

    result, info, _, s = mlx_dev_finetune
    out, log = result.adapter_dir.parent, info["dev_log"]
    assert [(r["epoch"], r["step"]) for r in log] == [(1, 2), (2, 4)]
    assert log[1]["dev_loss"] > log[0]["dev_loss"]                      # no lower dev loss: patience 1 stops
    assert result.steps == info["steps"] == 4 < s.epochs * 2
    assert (info["best_epoch"], info["best_step"], info["dev_loss"]) == (1, 2, log[0]["dev_loss"])
    assert result.epochs == info["saved_epochs"] == [1, 2]
    weights = {n: load_file(epoch_dir(out, n) / "adapter" / "adapters.safetensors") for n in (1, 2)}
    final = load_file(result.adapter_dir / "adapters.safetensors")
    assert all(np.array_equal(weights[1][k], final[k]) for k in final)          # kept: epoch 1's LoRA
    assert any(not np.array_equal(weights[2][k], final[k]) for k in final)      # epoch 2's is its own
    assert result.adapter_gguf.read_bytes() == (epoch_dir(out, 1) / "adapter.gguf").read_bytes()
    assert (epoch_dir(out, 2) / "adapter.gguf").read_bytes() != result.adapter_gguf.read_bytes()
    for n in (1, 2):
        assert json.loads((epoch_dir(out, n) / "adapter" / "kmm_finetune.json").read_text())["epoch"] == n


def test_mlx_rate_at_each_step_follows_the_schedule(mlx_dev_finetune, mlx_finetune):
    from kmismatch_lite.io import read_jsonl

    result, _, _, s = mlx_dev_finetune
    planned = s.epochs * 2                                              # 6 training examples, batches of 3
    rates = [r["learning_rate"] for r in read_jsonl(result.train_log)]
    assert rates == pytest.approx([DEV_LR * (1 - i / planned) for i in range(4)], rel=1e-6)
    constant, _ = mlx_finetune
    assert [r["learning_rate"] for r in read_jsonl(constant.train_log)] == pytest.approx([5e-3] * 4, rel=1e-6)


def test_the_linear_rate_moves_the_weights():
    """With a constant gradient, each Adam step moves a weight by the rate: the schedule reaches
    the optimizer's updates, from the full rate down to rate / steps."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from kmismatch_lite.backends.mlx import rate_schedule

    layer = nn.Linear(1, 1, bias=False)
    layer.weight = mx.zeros((1, 1))
    opt = optim.AdamW(learning_rate=rate_schedule(0.2, "linear", 4), weight_decay=0.0, bias_correction=True)
    moves = []
    for _ in range(4):
        before = layer.weight.item()
        opt.update(layer, {"weight": mx.ones((1, 1))})
        mx.eval(layer.parameters(), opt.state)
        moves.append(before - layer.weight.item())
    assert moves == pytest.approx([0.2, 0.15, 0.1, 0.05], rel=1e-4)
    assert rate_schedule(0.2, "constant", 4) == 0.2


GEMMA = "gemma-3-270m"
N_LOGIT_PROMPTS = 16
# Measured on this Linux CPU over 40 zero-shot questions against the float32 model (the GGUF
# dequantized): with Gemma's Q6_K weights requantized to 8-bit, every logit correlation rounds to
# 1.0000 and 40 of 40 next tokens agree; requantized to 4-bit in groups of 64 instead, the lowest
# correlation was 0.9909 and 29 of 40 agreed, which these bars reject.
MIN_LOGIT_CORRELATION = 0.999
MIN_TOP1_AGREEMENT = 0.9


@pytest.fixture(scope="module")
def gemma():
    reason = bundled_model(GEMMA)
    if reason:
        pytest.skip(reason)
    from kmismatch_lite import cards
    from kmismatch_lite.formats import mlx_models

    model = cards.resolve(GEMMA)
    return model, mlx_models.model_dir(model, "gguf")       # converted once into the cache (~1 min here)


def test_kquant_gguf_stays_quantized_in_mlx(gemma):
    """Gemma's Q4_K_M file: Q4_K, Q5_0 and Q8_0 weights keep llama.cpp's exact values (gguf's own
    dequantizer as the reference), the Q6_K ones are requantized to 8-bit; no Linear stays float."""
    import mlx.core as mx
    import mlx.nn as nn
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from kmismatch_lite.formats import mlx_models

    model, folder = gemma
    source = json.loads((folder / "kmm_source.json").read_text())
    assert source["exact"] == {"Q4_K": 27, "Q5_0": 81, "Q8_0": 10} and source["requantized"] == {"Q6_K": 9}
    assert source["gguf_blocks"] is False and "not bit-identical" in source["requantized_to"]
    net, _ = mlx_models.load(folder)
    modules = dict(net.named_modules())
    linears = [m for m in modules.values() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    assert len(linears) == 18 * 7 and all(isinstance(m, nn.QuantizedLinear) for m in linears)
    tensors = {t.name.removesuffix(".weight"): t for t in GGUFReader(str(model.gguf_path)).tensors if len(t.shape) == 2}
    held = {"Q4_K": (4, 32), "Q5_0": (5, 32), "Q8_0": (8, 32), "Q6_K": (8, 32)}
    for name, t in tensors.items():
        m = modules[mlx_models.hf_path(name)]
        assert (m.bits, m.group_size) == held[t.tensor_type.name], name
    for name in ("blk.0.attn_output", "blk.0.attn_q", "blk.0.attn_v", "blk.0.ffn_down", "token_embd"):
        t, m = tensors[name], modules[mlx_models.hf_path(name)]
        ref = dequantize(t.data, t.tensor_type)
        got = np.array(mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits))
        if t.tensor_type.name == "Q6_K":
            assert 0 < np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)) < 0.01, name
        else:
            assert np.array_equal(got, ref), name


def test_kquant_model_answers_as_the_float_model(gemma):
    import mlx.core as mx
    from mlx_lm.models import cache as kv

    from kmismatch_lite.formats import mlx_models
    from kmismatch_lite.formats.hf_from_gguf import hf_folder
    from kmismatch_lite.qa import data, prompts

    model, folder = gemma
    quant, tokenizer = mlx_models.load(folder)
    full, _ = mlx_models.load_float(hf_folder(model))
    asked = [prompts.zero_shot(q.question) for q in data.load("geonames").test[:N_LOGIT_PROMPTS]]
    corr, same = [], 0
    for prompt in asked:
        ids = mx.array(tokenizer.encode(prompt))[None]
        a, b = (np.array(mlx_models.last_logits(net, ids, kv.make_prompt_cache(net)).astype(mx.float32))
                for net in (quant, full))
        corr.append(np.corrcoef(a, b)[0, 1])
        same += int(a.argmax() == b.argmax())
    assert min(corr) >= MIN_LOGIT_CORRELATION, corr
    assert same / len(asked) >= MIN_TOP1_AGREEMENT, same


def test_lora_trains_on_the_quantized_kquant_model(gemma, tmp_path):
    import mlx.nn as nn

    from kmismatch_lite.backends.mlx import MlxTrainer
    from kmismatch_lite.finetune import LoraSettings
    from kmismatch_lite.formats import mlx_models

    model, folder = gemma
    examples = [{"question": q, "target": a} for q, a in MADE_UP[:2]]
    # q_proj is Q5_0, o_proj Q4_K, down_proj Q4_K or (requantized) Q6_K: LoRA on each kind.
    settings = LoraSettings(rank=4, alpha=8, learning_rate=5e-3, epochs=3, batch_size=2, max_length=32,
                            target_modules=["q_proj", "o_proj", "down_proj"])
    out = MlxTrainer(model, settings).train(examples, tmp_path)
    losses = [r["loss"] for r in out["log"]]
    assert out["quantized_base"] and len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    assert all(np.abs(b).max() > 0 for _, b in out["lora"].values())
    net, _ = mlx_models.load(folder, tmp_path / "adapter")
    wrapped = [m.linear for _, m in net.named_modules() if hasattr(m, "lora_a")]
    assert len(wrapped) == 18 * 3 and all(isinstance(m, nn.QuantizedLinear) for m in wrapped)


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


# Measured on the 2-core VM (kmm run smoke with the mlx fine-tune and --verify): llama.cpp with
# the exported adapter and mlx-lm with its own adapter agreed on 34 and 33 of 40 prompts (0.85 and
# 0.825; self and teacher), near-ties after 3 steps, as the unsloth backend's 0.80-0.85; its bar is
# the same 0.80. The adapter changed every one of the 40 answers against the base model.
MLX_RUN_VERIFY_AGREEMENT = 0.80


@pytest.mark.slow
def test_kmm_run_fine_tunes_with_mlx_and_verifies_its_adapters(tmp_path):
    from conftest import run_kmm

    _skip_unless_ready()
    out = tmp_path / "run"
    res = run_kmm("run", "smoke", "-s", "finetune.backend=mlx", "-s", "finetune.verify=true", "--out", str(out),
                  timeout=2400)
    assert res.returncode == 0, res.stderr[-2000:]
    for cond in ("self", "teacher"):
        folder = out / "finetune" / cond
        info = json.loads((folder / "adapter" / "kmm_finetune.json").read_text())
        verify = json.loads((folder / "verify.json").read_text())
        assert info["backend"] == "mlx" and verify["trainer"] == "mlx" and verify["prompts"] == 40, cond
        assert verify["adapter_vs_trainer"] >= MLX_RUN_VERIFY_AGREEMENT, (cond, verify["adapter_vs_trainer"])
        assert verify["adapter_vs_base"] < 0.5, cond          # the adapter llama.cpp loaded changed the answers
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["finetune"]["backend"] == "mlx"
    results = json.loads((out / "results.json").read_text())
    assert {"self", "teacher"} <= set(results["conditions"])
