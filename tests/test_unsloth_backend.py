"""The unsloth backend: its errors and glue on the CPU (with the loader passed in), and the real
thing end to end where a CUDA GPU and unsloth are present."""

import importlib.util
import json
import subprocess
import sys

import pytest

from kmismatch_lite import cards
from kmismatch_lite.errors import KmmError

HAS_UNSLOTH = importlib.util.find_spec("unsloth") is not None


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def test_module_imports_nothing_heavy():
    code = ("import sys, kmismatch_lite.backends.unsloth\n"
            "bad = [m for m in ('torch', 'transformers', 'peft', 'unsloth', 'llama_cpp') if m in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


@pytest.mark.skipif(HAS_UNSLOTH and cuda_available(), reason="unsloth and a CUDA GPU are present")
def test_missing_extra_or_gpu_is_one_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "What is the capital of Xo?", "target": "Yy"}) + "\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "kmismatch_lite", "finetune", "smollm2-135m-instruct",
                           "--data", str(data), "--out", str(out), "--backend", "unsloth"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    expected = "CUDA" if HAS_UNSLOTH else "kmismatch_lite[unsloth]"
    assert expected in lines[0]
    assert not (out / "adapter.gguf").exists()


def test_unknown_source_is_an_error():
    from kmismatch_lite.backends.unsloth import UnslothTrainer

    with pytest.raises(KmmError, match="unknown unsloth source"):
        UnslothTrainer(cards.resolve("smollm2-135m-instruct"), None, loader=lambda m, s: None, source="s3")


def test_base_source_falls_back_to_the_students_own_gguf(monkeypatch, tmp_path):
    from kmismatch_lite.backends import unsloth

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: the hub repo is not there
    calls = []
    monkeypatch.setattr("kmismatch_lite.formats.hf_from_gguf.hf_folder", lambda m: calls.append(m) or tmp_path / "hf")
    model = cards.resolve("smollm2-135m-instruct")
    assert unsloth.base_source(model) == str(tmp_path / "hf")
    assert calls == [model]
    assert unsloth.base_source(model, "hub") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_shared_loop_with_a_cpu_loader_trains_and_exports(tmp_path):
    """Everything the unsloth backend does except the Unsloth call: the loader is plain peft."""
    pytest.importorskip("peft", reason="needs the torch extra")
    pytest.importorskip("llama_cpp", reason="needs the llamacpp extra")
    import peft

    from kmismatch_lite.backends import torch_lora
    from kmismatch_lite.backends.llamacpp import LlamaCppGenerator
    from kmismatch_lite.backends.unsloth import UnslothTrainer
    from kmismatch_lite.finetune import LoraSettings, _run

    model = cards.resolve("smollm2-135m-instruct")
    settings = LoraSettings(epochs=8, batch_size=4, learning_rate=3e-3, save_epochs=True)

    def cpu_loader(m, s):
        lm, tok = torch_lora.load_base(m)
        config = peft.LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                 target_modules=list(s.target_modules), task_type="CAUSAL_LM")
        return peft.get_peft_model(lm, config), tok

    examples = [{"question": f"What is the secret word number {i}?", "target": w}
                for i, w in enumerate(["Zorblat", "Quimmel", "Frandor", "Blistex"])]
    trainer = UnslothTrainer(model, settings, loader=cpu_loader, device="cpu")
    result = _run(trainer, model, examples, settings, tmp_path, None)
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    assert result.steps == len(log) == 8
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    # The shared loop saves each epoch's LoRA for unsloth as for torch; the last is the final one.
    assert result.epochs == list(range(1, 9))
    assert (tmp_path / "epochs" / "epoch-8" / "adapter.gguf").read_bytes() == (tmp_path / "adapter.gguf").read_bytes()
    gen = LlamaCppGenerator(model, adapter=tmp_path / "adapter.gguf")
    base = LlamaCppGenerator(model)
    try:
        from kmismatch_lite.qa import prompts

        ps = [prompts.zero_shot(e["question"]) for e in examples]
        adapted = gen.generate(ps, max_tokens=8, stop=["\n"])
        original = base.generate(ps, max_tokens=8, stop=["\n"])
    finally:
        gen.close()
        base.close()
    assert adapted != original


@pytest.mark.slow
def test_verify_answers_come_from_a_fresh_process_as_plain_peft_gives_them():
    """The unsloth backend's --verify answers run in a new process (no Unsloth patches there) and
    match what plain transformers + peft answers in this one, on the same device."""
    pytest.importorskip("peft", reason="needs the torch extra")
    from kmismatch_lite.qa import prompts
    from kmismatch_lite.backends import torch_lora, unsloth

    model = cards.resolve("smollm2-135m-instruct")
    shots = "Question: What is the capital of Italy?\nAnswer: Rome\n\n"
    ps = [shots + prompts.zero_shot(q) for q in ("What is the capital of France?", "What is the capital of Peru?")]
    fresh = unsloth.greedy_answers(model, None, ps, max_tokens=8)  # on the GPU where there is one
    here = torch_lora.greedy_answers(model, None, ps, max_tokens=8, device="cuda" if cuda_available() else "cpu")
    assert fresh == here
    assert all(isinstance(a, str) for a in fresh) and any(fresh)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_UNSLOTH, reason="unsloth is not installed (pip install 'kmismatch_lite[unsloth]')")
@pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU: the unsloth backend needs one")
def test_unsloth_adapter_is_faithful_in_llama_cpp(tmp_path):
    """The torch backend's faithfulness test, trained by Unsloth (QLoRA on the GPU): llama.cpp with
    the GGUF adapter answers as transformers + peft with the adapter does, on a decisive adapter."""
    from test_finetune import STUDENT, _finetune_and_verify

    res = _finetune_and_verify(STUDENT, tmp_path, backend="unsloth")
    assert res.verify["trainer"] == "unsloth"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_UNSLOTH, reason="unsloth is not installed (pip install 'kmismatch_lite[unsloth]')")
@pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU: the unsloth backend needs one")
def test_smoke_recipe_with_unsloth_end_to_end(tmp_path):
    # The student also plays the teacher: only the student's files are needed on the GPU machine,
    # and everything the unsloth backend touches (the student's fine-tunes) runs as in the recipe.
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "kmismatch_lite", "run", "smoke", "--out", str(out),
                           "-s", "finetune.backend=unsloth", "-s", "finetune.verify=true",
                           "-s", "models.teacher=smollm2-135m-instruct"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The smoke recipe's 3 steps leave near-tie answers, which the Q4_1-versus-float32 difference
    # flips: 0.80 and 0.85 agreement measured on an H200 (32 and 34 of 40 prompts, the export's own
    # error nil, docs/measurements.md), so 0.80 is the bar; faithfulness on a decisive adapter is
    # asserted above.
    for name in ("self", "teacher"):
        verify = json.loads((out / "finetune" / name / "verify.json").read_text())
        assert verify["trainer"] == "unsloth" and verify["prompts"] == len(verify["samples"]) > 0, verify
        assert verify["adapter_vs_trainer"] >= 0.80, verify
    res = json.loads((out / "results.json").read_text())
    assert set(res["conditions"]) == {"base_student", "self", "teacher", "base_teacher"}
