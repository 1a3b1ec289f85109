"""LoRA on the CPU with transformers + peft, starting from the student's own GGUF weights
(dequantized by `hf_from_gguf`), so the adapter fits the base llama.cpp evaluates."""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

from kmismatch_lite.cards import Model
from kmismatch_lite.errors import missing_extra

# OpenMP's wait policy is left to the user (OMP_WAIT_POLICY=passive helps on a crowded machine;
# on an idle one the default trained 1.7x faster here: 284 vs 164 tokens/s).

try:
    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
except ImportError:
    raise missing_extra("torch, transformers and peft", "torch") from None

from kmismatch_lite import lora_data
from kmismatch_lite.hf_from_gguf import hf_folder


def load_base(model: Model):
    """(causal LM in float32, tokenizer) from the student's GGUF, with all CPU cores in use
    (OMP_NUM_THREADS, where set, says how many)."""
    torch.set_num_threads(threads())
    transformers.utils.logging.disable_progress_bar()  # our own bar is the only one on stderr
    folder = hf_folder(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return lm, tokenizer


def threads() -> int:
    """OMP_NUM_THREADS where set, else the cores this process may run on (taskset, cgroups)."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class TorchTrainer:
    """Fits a LoRA with AdamW on length-bucketed batches; the loss covers the target tokens only."""

    name = "torch"

    def __init__(self, model: Model, settings):
        self.model, self.settings = model, settings

    def train(self, examples: Sequence[dict], out_dir, *, progress=None) -> dict[str, Any]:
        s = self.settings
        lm, tokenizer = load_base(self.model)
        torch.manual_seed(s.seed)
        config = peft.LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                 target_modules=list(s.target_modules), task_type="CAUSAL_LM")
        with _quiet():
            model = peft.get_peft_model(lm, config)
        return fit(model, tokenizer, examples, s, Path(out_dir), progress=progress)


@contextmanager
def _quiet():
    """peft calls a transformers API deprecated in v5; the FutureWarning is not ours to fix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def fit(model, tokenizer, examples: Sequence[dict], settings, out_dir: Path, *, progress=None,
        device: str = "cpu") -> dict[str, Any]:
    """Train a peft model (LoRA attached) on the examples and save it to `out_dir/adapter`.

    Shared by every torch-family trainer (torch on the CPU, unsloth on a GPU): only the loading
    differs between them.
    """
    s = settings
    encoded, cut = lora_data.encode(tokenizer, examples, s.max_length)
    lengths = [len(e.ids) for e in encoded]
    plan = lora_data.batch_plan(lengths, s.batch_size, s.epochs, s.seed)
    with compute_dtype(model, getattr(s, "compute", "float32"), device) as compute:
        log, seconds, tokens = _loop(model, encoded, plan, tokenizer.pad_token_id or 0, s.learning_rate,
                                     progress, device)
    with _quiet():
        model.save_pretrained(Path(out_dir) / "adapter")
    return {
        "lora": lora_data.lora_arrays(model), "log": log, "steps": len(plan),
        "final_loss": log[-1]["loss"], "tokens": tokens, "train_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1), "truncated_prompts": cut,
        "padding_waste": round(lora_data.padding_waste(plan, lengths), 4),
        "compute": compute, "threads": torch.get_num_threads(),
    }


@contextmanager
def compute_dtype(model, compute: str, device: str):
    """Run the steps inside with bfloat16 matmuls when `compute` asks for it on the CPU; yields
    what was used ("bfloat16", "float32", or "as loaded" on other devices, where the loader chose).

    The frozen base projections are cast to bfloat16 once (autocast would cast them again at every
    call); the LoRA weights stay float32, so their gradients and the optimizer state do too.
    """
    if device != "cpu":
        yield "as loaded"
        return
    if compute != "bfloat16":
        yield "float32"
        return
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Linear) and base.weight.dtype == torch.float32:
            base.weight.data = base.weight.data.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yield "bfloat16"


def _loop(model, encoded, plan, pad_id: int, learning_rate: float, progress,
          device: str) -> tuple[list[dict], float, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    causal_lm = model.get_base_model()
    model.train()
    log, seconds, tokens = [], 0.0, 0
    for step, batch_ids in enumerate(plan, 1):
        t0 = time.perf_counter()
        batch = {k: v.to(device) for k, v in lora_data.collate([encoded[i] for i in batch_ids], pad_id).items()}
        loss = lora_data.target_loss(causal_lm, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        tokens += int(batch["attention_mask"].sum())
        row = {"step": step, "loss": round(loss.item(), 5), "tokens_per_second": round(tokens / seconds, 1)}
        log.append(row)
        if progress:
            progress(1, loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_second']:.0f}")
    return log, seconds, tokens


def greedy_answers(model: Model, adapter_dir: Path | None, prompts: Sequence[str], *, max_tokens: int) -> list[str]:
    """Greedy answers of the torch model (with the peft adapter in `adapter_dir`, if given),
    cut at the first newline, as llama.cpp's generator does."""
    from kmismatch_lite.prompts import clean_output

    lm, tokenizer = load_base(model)
    if adapter_dir is not None:
        with _quiet():
            lm = peft.PeftModel.from_pretrained(lm, str(adapter_dir))
    lm.eval()
    vocab = tokenizer.get_vocab()
    stop = [tokenizer.eos_token_id] + [vocab[t] for t in ("<end_of_turn>", "<|eot_id|>") if t in vocab]
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                              do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
            outputs.append(clean_output(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    return outputs
