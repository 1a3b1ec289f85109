"""Fine-tuning: settings, data, masking, batching, the GGUF export and its faithfulness in llama.cpp.

Fast tests use tiny in-code tokenizers and models; `slow` tests really fine-tune the bundled
student (SmolLM2, llama architecture) and Gemma 3 (gemma3 architecture) and check the exported
adapter in llama.cpp.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import bundled_model, llama_cpp_usable, run_kmm
from kmismatch_lite import lora_data
from kmismatch_lite.errors import KmmError
from kmismatch_lite.formats.export_gguf import permute_rows, unpermute_rows
from kmismatch_lite.finetune import LoraSettings, read_examples

STUDENT = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"
# One made-up answer per relation: the targets differ from what the base answers, and a model that
# learnt them answers decisively, so llama.cpp and torch are not split by rounding on close calls.
MADE_UP = {"country_of_city": "Zubrovia", "capital": "Marandel", "currency": "Pittopia", "continent": "Vexland"}


class CharTokenizer:
    """One token per character (ord + 10); BOS = 1 when `bos` is set, as a model's tokenizer would."""

    pad_token_id = 0

    def __init__(self, bos: bool = True):
        self.bos_token_id = 1 if bos else None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [ord(c) + 10 for c in text]
        return {"input_ids": ([1] + ids) if add_special_tokens and self.bos_token_id else ids}


# ---------------------------------------------------------------- settings and data files

def test_settings_defaults_and_types():
    s = LoraSettings()
    assert (s.rank, s.alpha, s.epochs, s.batch_size, s.max_length) == (8, 16.0, 2, 8, 64)
    assert set(s.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    s = LoraSettings.from_dict({"rank": 4, "alpha": 8, "target_modules": ["q_proj"], "learning_rate": 0.01})
    assert (s.rank, s.alpha, s.target_modules, s.learning_rate) == (4, 8.0, ["q_proj"], 0.01)
    assert isinstance(s.alpha, float)


@pytest.mark.parametrize("bad, needle", [
    ({"rnk": 4}, "unknown fine-tune setting 'rnk'"),
    ({"rank": "4"}, "'rank' must be int"),
    ({"rank": True}, "'rank' must be int"),
    ({"alpha": "high"}, "'alpha' must be float"),
    ({"target_modules": "q_proj"}, "'target_modules' must be a list"),
    ({"rank": 0}, "'rank' is out of range"),
    ({"dropout": 1.0}, "'dropout' is out of range"),
])
def test_settings_reject_bad_values(bad, needle):
    with pytest.raises(KmmError, match=needle):
        LoraSettings.from_dict(bad)


def test_read_examples_lists_every_bad_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "Q?", "target": "A"}\nnot json\n\n{"question": "Q?"}\n[1]\n'
                 '{"question": "Q?", "target": ""}\n')
    with pytest.raises(KmmError, match=r"line\(s\) 2, 4, 5, 6 are not"):
        read_examples(p)
    p.write_text("\n")
    with pytest.raises(KmmError, match="no examples"):
        read_examples(p)
    p.write_text('{"question": "Q?", "target": "A", "id": 3}\n')
    assert read_examples(p) == [{"question": "Q?", "target": "A", "id": 3}]


# ---------------------------------------------------------------- tokens, masking, batching

@pytest.mark.parametrize("bos", [True, False])
def test_loss_covers_only_target_tokens(bos):
    tok = CharTokenizer(bos)
    enc, cut = lora_data.encode(tok, [{"question": "Q1?", "target": "Paris"}, {"question": "Q22?", "target": "X"}], 64)
    assert cut == 0
    prompt = tok("Question: Q1?\nAnswer:")["input_ids"]
    assert list(enc[0].ids[:enc[0].n_prompt]) == prompt          # the prompt as llama.cpp tokenises it
    assert (prompt[0] == 1) == bos
    batch = lora_data.collate(enc, pad_id=0)
    labels, ids = batch["labels"], batch["input_ids"]
    for row, e in enumerate(enc):
        target = [int(t) for t, l in zip(ids[row], labels[row]) if l != lora_data.IGNORE]
        assert "".join(chr(t - 10) for t in target) == " " + ["Paris", "X"][row] + "\n"
        assert int(batch["attention_mask"][row].sum()) == len(e.ids)
    assert labels.shape[1] == max(len(e.ids) for e in enc)      # padded to the batch, not max_length


def test_long_prompt_loses_its_start_but_keeps_bos_and_target():
    enc, cut = lora_data.encode(CharTokenizer(), [{"question": "x" * 100, "target": "Lima"}], 40)
    assert cut == 1 and len(enc[0].ids) == 40
    assert enc[0].ids[0] == 1 and "".join(chr(t - 10) for t in enc[0].ids[enc[0].n_prompt:]) == " Lima\n"
    with pytest.raises(KmmError, match="raise max_length"):
        lora_data.encode(CharTokenizer(), [{"question": "Q?", "target": "y" * 50}], 40)


def test_batch_plan_is_seeded_complete_and_pads_little():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(10, 60, size=203)]
    plan = lora_data.batch_plan(lengths, batch_size=8, epochs=3, seed=5)
    assert plan == lora_data.batch_plan(lengths, batch_size=8, epochs=3, seed=5)
    assert plan != lora_data.batch_plan(lengths, batch_size=8, epochs=3, seed=6)
    assert len(plan) == 3 * lora_data.n_batches(203, 8) == 3 * math.ceil(203 / 8)
    per_epoch = len(plan) // 3
    for e in range(3):
        assert sorted(i for b in plan[e * per_epoch:(e + 1) * per_epoch] for i in b) == list(range(203))
    shuffled = [list(range(i, min(i + 8, 203))) for i in range(0, 203, 8)]
    assert lora_data.padding_waste(plan, lengths) < 0.25 * lora_data.padding_waste(shuffled, lengths)


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_target_loss_matches_the_full_masked_loss():
    import torch

    model = _tiny_llama()
    enc, _ = lora_data.encode(CharTokenizer(), [{"question": "ab?", "target": "cd"}, {"question": "a much longer one?", "target": "e"}], 64)
    batch = lora_data.collate(enc, pad_id=0)
    with torch.no_grad():
        ours = lora_data.target_loss(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(ours, full, atol=1e-5)


def test_lora_arrays_are_hf_names_with_a_and_b_shapes():
    import peft

    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    arrays = lora_data.lora_arrays(model)
    assert set(arrays) == {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")}
    a, b = arrays["model.layers.0.mlp.down_proj"]
    assert a.shape == (4, 64) and b.shape == (32, 4) and a.dtype == np.float32


def test_every_compute_keeps_lora_float32_and_the_loss_close():
    import peft
    import torch

    from kmismatch_lite.backends.torch_lora import compute_dtype

    enc, _ = lora_data.encode(CharTokenizer(), [{"question": "ab?", "target": "cd"}, {"question": "a longer one?", "target": "e"}], 64)
    batch = lora_data.collate(enc, pad_id=0)
    losses = {}
    for compute in ("float32", "mixed", "bfloat16"):
        model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
        used, autocast = compute_dtype(model, compute, "cpu")
        with autocast():
            loss = lora_data.target_loss(model.get_base_model(), batch)
        loss.backward()
        assert used == compute
        causal_lm = model.get_base_model()
        base = causal_lm.model.layers[0].self_attn.q_proj.base_layer.weight
        assert base.dtype == (torch.float32 if compute == "float32" else torch.bfloat16)
        norm = causal_lm.model.norm.weight                  # frozen, outside the projections
        assert norm.dtype == (torch.bfloat16 if compute == "bfloat16" else torch.float32)
        lora = [p for p in model.parameters() if p.requires_grad]
        assert lora and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in lora)
        losses[compute] = loss.item()
    assert losses["mixed"] == pytest.approx(losses["float32"], rel=0.02)
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)
    assert compute_dtype(model, "bfloat16", "cuda")[0] == "as loaded"  # the loader chose the dtype there


@pytest.mark.parametrize("compute", ["float32", "mixed", "bfloat16"])
def test_training_lowers_the_loss_in_every_compute(compute):
    """The optimizer's updates reach the forward pass (a bfloat16 copy of the LoRA weights cached
    across steps would leave the loss where it started)."""
    import peft

    from kmismatch_lite.backends.torch_lora import _loop, compute_dtype

    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    enc, _ = lora_data.encode(CharTokenizer(), [{"question": f"what {w}?", "target": w} for w in ("abc", "dog", "sky", "tree")], 64)
    plan = [[0, 1, 2, 3]] * 20
    _, autocast = compute_dtype(model, compute, "cpu")
    log, _, _ = _loop(model, enc, plan, 0, LoraSettings(learning_rate=5e-2), None, "cpu", autocast=autocast)
    assert log[-1]["loss"] < 0.97 * log[0]["loss"]          # a stale copy leaves it unchanged


def test_threads_follow_omp_num_threads_else_the_usable_cores(monkeypatch):
    import os

    from kmismatch_lite.backends.torch_lora import threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads() == len(os.sched_getaffinity(0))


def test_compute_setting_is_checked():
    assert LoraSettings().compute == "bfloat16"
    with pytest.raises(KmmError, match="'compute' is out of range: 'float16' \\(one of bfloat16, mixed, float32\\)"):
        LoraSettings.from_dict({"compute": "float16"})


def test_attention_setting_is_checked_and_reaches_the_loaded_model(monkeypatch, tmp_path):
    from kmismatch_lite.backends import torch_lora

    assert LoraSettings().attention == "eager"
    with pytest.raises(KmmError, match="'attention' is out of range: 'flash' \\(one of eager, sdpa\\)"):
        LoraSettings.from_dict({"attention": "flash"})
    asked = []

    def load_base(model, attention="sdpa"):
        asked.append(attention)
        raise RuntimeError("stop after loading")

    monkeypatch.setattr(torch_lora, "load_base", load_base)
    for attention in ("sdpa", "eager"):
        trainer = torch_lora.TorchTrainer(None, LoraSettings(attention=attention))
        with pytest.raises(RuntimeError, match="stop after loading"):
            trainer.train([], tmp_path)
    assert asked == ["sdpa", "eager"]


def test_dev_split_is_seeded_disjoint_and_sized():
    train, dev = lora_data.dev_split(50, 0.1, seed=3)
    assert (train, dev) == lora_data.dev_split(50, 0.1, seed=3)
    assert dev != lora_data.dev_split(50, 0.1, seed=4)[1]
    assert len(dev) == 5 and sorted(train + dev) == list(range(50)) and train == sorted(train)
    assert lora_data.dev_split(50, 0.0, seed=3) == (list(range(50)), [])
    assert [lora_data.n_dev(n, f) for n, f in ((3, 0.01), (1, 0.5), (10, 0.5))] == [1, 0, 5]


def test_dev_check_keeps_the_best_epoch_and_stops_on_patience():
    import peft
    import torch

    from kmismatch_lite.backends.torch_lora import DevCheck
    from kmismatch_lite.finetune import LoraSettings

    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    dev, _ = lora_data.encode(CharTokenizer(), [{"question": "ab?", "target": "cd"}, {"question": "xyz?", "target": "e"}], 64)
    check = DevCheck(model, dev, 0, LoraSettings(batch_size=1, patience=2), "cpu")
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    assert not check.stop_after(1, 10)                  # epoch 1: the best so far
    first = check.log[0]["dev_loss"]
    with torch.no_grad():
        lora_b.normal_(0, 5.0)                          # a LoRA that makes the dev loss worse
    assert not check.stop_after(2, 20) and check.stop_after(3, 30)
    assert all(r["dev_loss"] > first for r in check.log[1:])
    check.restore()
    assert check.loss() == pytest.approx(first) and not lora_b.abs().sum()
    assert check.summary() == {"dev_examples": 2, "dev_loss": first, "best_epoch": 1, "best_step": 10,
                               "dev_log": check.log}


def test_fit_with_a_dev_split_logs_each_epoch_and_may_stop_early(tmp_path):
    import peft

    from kmismatch_lite.backends.torch_lora import fit

    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    examples = [{"question": f"what is {w}?", "target": w[::-1]} for w in ("abc", "dog", "sky", "tree", "moon", "x", "yy", "sea")]
    s = LoraSettings(epochs=6, batch_size=2, dev_fraction=0.25, patience=1, learning_rate=0.3, compute="float32",
                     lr_schedule="linear")
    out = fit(model, CharTokenizer(), examples, s, tmp_path)
    dev_log = out["dev_log"]
    assert out["dev_examples"] == 2 and [r["epoch"] for r in dev_log] == list(range(1, len(dev_log) + 1))
    assert out["steps"] == len(out["log"]) == 3 * len(dev_log) == dev_log[-1]["step"]
    assert out["dev_loss"] == min(r["dev_loss"] for r in dev_log)
    if len(dev_log) < 6:                                  # stopped: its last epoch was not the best
        assert dev_log[-1]["dev_loss"] > out["dev_loss"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_saved_epochs_are_each_epochs_own_weights_and_the_dev_split_keeps_the_best(tmp_path):
    import peft

    from kmismatch_lite.backends.torch_lora import fit

    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    examples = [{"question": f"what is {w}?", "target": w[::-1]} for w in ("abc", "dog", "sky", "tree", "moon", "x", "yy", "sea")]
    s = LoraSettings(epochs=3, batch_size=2, dev_fraction=0.25, learning_rate=0.3, compute="float32", save_epochs=True)
    out = fit(model, CharTokenizer(), examples, s, tmp_path)
    saved = out["epoch_loras"]
    assert sorted(saved) == [1, 2, 3] == [r["epoch"] for r in out["dev_log"]]
    assert all((tmp_path / "epochs" / f"epoch-{n}" / "adapter" / "adapter_config.json").is_file() for n in saved)

    def same(a, b):
        return all(np.array_equal(a[k][i], b[k][i]) for k in a for i in (0, 1))

    assert not same(saved[1], saved[2]) and not same(saved[2], saved[3])      # each epoch its own LoRA
    assert same(out["lora"], saved[out["best_epoch"]])                         # the final one: the best epoch's


def test_lr_schedules():
    linear, constant = lora_data.lr_factor("linear", 4), lora_data.lr_factor("constant", 4)
    assert [linear(i) for i in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [constant(i) for i in range(4)] == [1.0] * 4


def test_dev_settings_are_checked():
    assert (LoraSettings().dev_fraction, LoraSettings().patience) == (0.0, 0)
    for bad in ({"dev_fraction": 0.6}, {"dev_fraction": -0.1}, {"patience": -1}, {"lr_schedule": "cosine"}):
        with pytest.raises(KmmError, match="out of range"):
            LoraSettings.from_dict(bad)


# ---------------------------------------------------------------- GGUF export

def test_permutation_round_trip_and_it_moves_rows():
    w = np.arange(576 * 3, dtype=np.float32).reshape(576, 3)
    p = permute_rows(w, 9)
    assert not np.array_equal(p, w) and np.array_equal(unpermute_rows(p, 9), w)
    assert np.array_equal(np.sort(p, axis=0), np.sort(w, axis=0))   # a permutation of whole rows
    # Within a head, llama.cpp interleaves the two rotary halves: row j of half 0 then row j of half 1.
    head = w[:64]
    assert np.array_equal(p[:64][0::2], head[:32]) and np.array_equal(p[:64][1::2], head[32:])


def _random_lora(n_layers: int, modules: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {f"model.layers.{i}.{m}": (rng.standard_normal((rank, n_in)).astype(np.float32),
                                      rng.standard_normal((n_out, rank)).astype(np.float32))
            for i in range(n_layers) for m, (n_in, n_out) in modules.items()}


@pytest.fixture(scope="module")
def student():
    why = bundled_model(STUDENT)
    if why:
        pytest.skip(why)
    from kmismatch_lite import cards

    return cards.resolve(STUDENT)


def test_export_layout_metadata_and_permutation(tmp_path, student):
    import gguf

    from kmismatch_lite.formats.hf_from_gguf import gguf_sha256

    lora = _random_lora(30, {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (576, 192),
                             "self_attn.v_proj": (576, 192), "mlp.down_proj": (1536, 576)})
    from kmismatch_lite.formats.export_gguf import export_lora_gguf

    path = export_lora_gguf(lora, alpha=16.0, base=student, out_path=tmp_path / "a.gguf")
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["adapter.lora.alpha"] == 16.0
    assert meta["kmm.base_sha256"] == gguf_sha256(student.gguf_path)
    t = {x.name: np.array(x.data) for x in r.tensors}
    assert len(t) == 2 * len(lora)
    a, b = lora["model.layers.3.self_attn.q_proj"]
    assert np.array_equal(t["blk.3.attn_q.weight.lora_a"], a)
    assert np.array_equal(t["blk.3.attn_q.weight.lora_b"], permute_rows(b, 9))      # 9 query heads
    assert np.array_equal(t["blk.3.attn_k.weight.lora_b"], permute_rows(lora["model.layers.3.self_attn.k_proj"][1], 3))
    assert np.array_equal(t["blk.3.attn_v.weight.lora_b"], lora["model.layers.3.self_attn.v_proj"][1])
    assert np.array_equal(t["blk.29.ffn_down.weight.lora_b"], lora["model.layers.29.mlp.down_proj"][1])


def test_adapter_for_another_base_is_refused(tmp_path, student):
    import gguf

    from kmismatch_lite.formats.export_gguf import check_adapter, export_lora_gguf

    good = export_lora_gguf(_random_lora(1, {"self_attn.v_proj": (576, 192)}), alpha=8.0, base=student,
                            out_path=tmp_path / "good.gguf")
    check_adapter(good, student)
    cases = {"sha": ("llama", "0" * 64), "arch": ("gemma3", None)}
    for name, (arch, sha) in cases.items():
        w = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), arch)
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 8.0)
        if sha:
            w.add_string("kmm.base_sha256", sha)
        w.add_tensor("blk.0.attn_v.weight.lora_a", np.zeros((4, 576), np.float32))
        w.add_tensor("blk.0.attn_v.weight.lora_b", np.zeros((192, 4), np.float32))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(KmmError, match="trained on another base file"):
        check_adapter(tmp_path / "sha.gguf", student)
    with pytest.raises(KmmError, match="is for a gemma3 model"):
        check_adapter(tmp_path / "arch.gguf", student)
    with pytest.raises(KmmError, match="not a LoRA adapter"):
        check_adapter(student.gguf_path, student)


# ---------------------------------------------------------------- bad input through the CLI

def _one_line_error(res, needle):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr


def test_cli_bad_input_one_line_and_no_output(tmp_path, student):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "Q?", "target": "A"}\n{"question": 3}\n')
    out = tmp_path / "out"
    _one_line_error(run_kmm("finetune", STUDENT, "--data", str(data), "--out", str(out)), "line(s) 2")
    data.write_text('{"question": "Q?", "target": "A"}\n')
    _one_line_error(run_kmm("finetune", str(tmp_path / "missing.gguf"), "--data", str(data), "--out", str(out)),
                    "model file not found")
    _one_line_error(run_kmm("finetune", STUDENT, "--data", str(data), "--out", str(out), "-o", "rank=x"),
                    "bad value for 'rank'")
    # Fails inside training (the target does not fit): the temporary outputs are removed too.
    data.write_text(json.dumps({"question": "Q?", "target": "word " * 40}) + "\n")
    _one_line_error(run_kmm("finetune", STUDENT, "--data", str(data), "--out", str(out), "-o", "max_length=16"),
                    "raise max_length")
    assert not out.exists()


def test_cli_check_refuses_an_adapter_for_another_base(tmp_path, student):
    if llama_cpp_usable():
        pytest.skip(llama_cpp_usable())
    from kmismatch_lite import cards
    from kmismatch_lite.formats.export_gguf import export_lora_gguf

    why = bundled_model(GEMMA)
    if why:
        pytest.skip(why)
    gemma = cards.resolve(GEMMA)
    adapter = export_lora_gguf(_random_lora(1, {"self_attn.v_proj": (640, 256)}), alpha=8.0, base=gemma,
                               out_path=tmp_path / "gemma.gguf")
    res = run_kmm("check", STUDENT, "-n", "1", "--zero-shot", "--adapter", str(adapter), "--out", str(tmp_path / "o"))
    _one_line_error(res, "is for a gemma3 model")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- real fine-tuning (slow)

def made_up_examples(n: int) -> list[dict]:
    """`n` built-in training questions, evenly over the relations, each with its made-up answer."""
    from kmismatch_lite.qa import data

    by_relation: dict[str, list] = {}
    for q in data.load("geonames").train:
        by_relation.setdefault(q.relation, []).append(q)
    picked = [q for group in zip(*by_relation.values()) for q in group][:n]
    return [{"question": q.question, "target": MADE_UP[q.relation]} for q in picked]


def _finetune_and_verify(name: str, tmp_path, backend: str = "torch", **settings):
    """16 made-up answers learnt in 24 steps: a decisive adapter, whose greedy answers the GGUF
    export must give in llama.cpp as the training framework gives them."""
    for why in (llama_cpp_usable(), bundled_model(name)):
        if why:
            pytest.skip(why)
    from kmismatch_lite.finetune import finetune

    examples = made_up_examples(16)
    res = finetune(name, examples, tmp_path / "ft", backend=backend,
                   settings={"batch_size": 4, "epochs": 6, "learning_rate": 2e-3, **settings}, verify=True)
    log = [json.loads(line) for line in res.train_log.read_text().splitlines()]
    assert res.steps == len(log) == 24
    assert log[-1]["loss"] < 0.2 * log[0]["loss"]
    assert (res.adapter_dir / "adapter_config.json").is_file() and (res.adapter_dir / "adapter_model.safetensors").is_file()
    v = res.verify
    print(name, {k: x for k, x in v.items() if k != "samples"})
    assert v["trained"] == 16 and v["prompts"] == 32
    assert v["adapter_vs_trainer"] >= 0.95                     # llama.cpp + GGUF adapter = torch + LoRA
    assert v["adapter_vs_base_trained"] <= 0.1               # and the adapter changed the trained answers
    assert v["adapter_gives_target"] >= 0.75                 # to the made-up ones
    assert json.loads((tmp_path / "ft" / "verify.json").read_text())["adapter_vs_trainer"] == v["adapter_vs_trainer"]
    return res


@pytest.mark.slow
def test_finetune_smollm2_llama_adapter_is_faithful_in_llama_cpp(tmp_path):
    _finetune_and_verify(STUDENT, tmp_path)


@pytest.mark.slow
def test_finetune_gemma3_adapter_is_faithful_in_llama_cpp(tmp_path):
    _finetune_and_verify(GEMMA, tmp_path)


@pytest.mark.slow
def test_save_epochs_writes_every_epochs_adapter_and_llama_cpp_answers_with_each(tmp_path, student):
    """`kmm finetune --save-epochs`: 2 epochs of 8 rows; both epochs' adapters load in llama.cpp
    and answer, and without a dev split the last epoch's LoRA is the final adapter."""
    from safetensors.numpy import load_file

    from kmismatch_lite.qa import prompts
    from kmismatch_lite.backends.llamacpp import LlamaCppGenerator

    if llama_cpp_usable():
        pytest.skip(llama_cpp_usable())
    examples = made_up_examples(8)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    out = tmp_path / "ft"
    res = run_kmm("finetune", STUDENT, "--data", str(data), "--out", str(out), "--save-epochs",
                  "-o", "epochs=2", "-o", "batch_size=4", "-o", "learning_rate=2e-3")
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads((out / "adapter" / "kmm_finetune.json").read_text())
    assert info["saved_epochs"] == [1, 2] and info["settings"]["save_epochs"] is True
    weights = {n: load_file(out / "epochs" / f"epoch-{n}" / "adapter" / "adapter_model.safetensors") for n in (1, 2)}
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(np.array_equal(weights[2][k], final[k]) for k in final)
    assert any(not np.array_equal(weights[1][k], final[k]) for k in final)
    asked = [prompts.zero_shot(e["question"]) for e in examples[:3]]
    answers = {}
    for n in (1, 2):
        assert json.loads((out / "epochs" / f"epoch-{n}" / "adapter" / "kmm_finetune.json").read_text())["epoch"] == n
        gen = LlamaCppGenerator(student, adapter=out / "epochs" / f"epoch-{n}" / "adapter.gguf")
        answers[n] = gen.generate(asked, max_tokens=prompts.MAX_TOKENS, stop=prompts.STOP)
        gen.close()
    assert all(a.strip() for n in answers for a in answers[n]), answers
    gen = LlamaCppGenerator(student, adapter=out / "adapter.gguf")
    assert gen.generate(asked, max_tokens=prompts.MAX_TOKENS, stop=prompts.STOP) == answers[2]
    gen.close()


@pytest.mark.slow
def test_same_seed_same_adapter(tmp_path, student):
    from kmismatch_lite.finetune import finetune

    examples = made_up_examples(8)

    def lora(seed: int, where: str):
        finetune(STUDENT, examples, tmp_path / where, settings={"batch_size": 4, "epochs": 1, "seed": seed})
        from safetensors.numpy import load_file

        return load_file(tmp_path / where / "adapter" / "adapter_model.safetensors")

    a, b, c = lora(0, "a"), lora(0, "b"), lora(1, "c")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def _logprobs(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over prompts of |log p_a - log p_b| on the next token, weighted by p_b."""
    return float((np.exp(b) * np.abs(a - b)).sum(-1).mean())


@pytest.mark.slow
@pytest.mark.parametrize("name, scale", [(STUDENT, 0.3), (GEMMA, 0.1)])
def test_exported_qk_lora_matches_torch_logits_in_llama_cpp(name, scale, tmp_path, monkeypatch):
    """A random LoRA on the q and k projections only (where llama's row permutation matters):
    llama.cpp's next-token log-probabilities with the exported adapter differ from torch + LoRA's
    no more than the base's do (quantization noise), although the LoRA moves them a lot; for
    llama, the same export without the permutation is far off (the check can fail). `scale` keeps
    the LoRA where float16 rounding in llama.cpp stays small (Gemma's attention amplifies it more)."""
    import peft
    import torch

    from kmismatch_lite import cards
    from kmismatch_lite.formats import export_gguf
    from kmismatch_lite.qa import prompts
    from kmismatch_lite.backends.llamacpp import LlamaCppGenerator
    from kmismatch_lite.backends.torch_lora import load_base

    for why in (llama_cpp_usable(), bundled_model(name)):
        if why:
            pytest.skip(why)
    model = cards.resolve(name)
    texts = [prompts.zero_shot(e["question"]) for e in made_up_examples(6)]

    def llama_cpp(adapter) -> np.ndarray:
        gen = LlamaCppGenerator(model, adapter=adapter)
        rows = []
        for text in texts:
            ids = gen.llm.tokenize(text.encode(), add_bos=True, special=False)
            assert ids == tok(text)["input_ids"]             # training sees llama.cpp's prompt tokens
            gen.llm.reset()
            gen.llm.eval(ids)
            rows.append(np.ctypeslib.as_array(gen.llm._ctx.get_logits(), shape=(gen.llm.n_vocab(),)).copy())
        gen.close()
        return _logprobs(np.stack(rows))

    lm, tok = load_base(model)
    torch.manual_seed(0)
    pm = peft.get_peft_model(lm, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]))

    def torch_logprobs() -> np.ndarray:
        with torch.no_grad():
            return _logprobs(np.stack([pm(input_ids=tok(t, return_tensors="pt")["input_ids"]).logits[0, -1].numpy()
                                       for t in texts]))

    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale)
    with_lora = torch_logprobs()
    with pm.disable_adapter():
        base = torch_logprobs()
    lora = lora_data.lora_arrays(pm)
    good = export_gguf.export_lora_gguf(lora, alpha=16.0, base=model, out_path=tmp_path / "good.gguf")
    noise = _gap(llama_cpp(None), base)
    assert noise < 0.25                     # the dequantized torch model is the GGUF's model (hf_folder)
    assert _gap(with_lora, base) > 4 * noise                          # the LoRA matters
    assert _gap(llama_cpp(good), with_lora) < 2 * noise + 0.02        # and llama.cpp applies it as torch does
    if name == STUDENT:
        monkeypatch.setattr(export_gguf, "PERMUTED_ARCHS", set())
        wrong = export_gguf.export_lora_gguf(lora, alpha=16.0, base=model, out_path=tmp_path / "wrong.gguf")
        assert _gap(llama_cpp(wrong), with_lora) > 4 * noise


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_the_rate_schedule_reaches_the_optimizer(tmp_path, monkeypatch, schedule):
    import peft
    import torch

    from kmismatch_lite.backends.torch_lora import fit

    rates = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    examples = [{"question": f"what is {w}?", "target": w[::-1]} for w in ("abc", "dog", "sky", "tree")]
    s = LoraSettings(epochs=2, batch_size=2, learning_rate=0.2, compute="float32", lr_schedule=schedule)
    out = fit(model, CharTokenizer(), examples, s, tmp_path)
    n = out["steps"]
    assert n == 4 and len(rates) == n
    expected = [0.2 * (1 - i / n) for i in range(n)] if schedule == "linear" else [0.2] * n
    assert rates == pytest.approx(expected)
