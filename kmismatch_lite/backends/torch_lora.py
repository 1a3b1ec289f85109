"""LoRA on the CPU with transformers + peft, starting from the student's own GGUF weights
(dequantized by `hf_from_gguf`), so the adapter fits the base llama.cpp evaluates."""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

from kmismatch_lite.cards import Model
from kmismatch_lite.errors import KmmError, missing_extra

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
from kmismatch_lite.backends import cpu_threads
from kmismatch_lite.lora_data import epoch_dir
from kmismatch_lite.formats.hf_from_gguf import hf_folder


def load_base(model: Model, attention: str = "sdpa"):
    """(causal LM in float32 with `attention`, tokenizer) from the student's GGUF, with all CPU
    cores in use (KMM_THREADS or OMP_NUM_THREADS, where set, says how many)."""
    torch.set_num_threads(threads())
    transformers.utils.logging.disable_progress_bar()  # our own bar is the only one on stderr
    folder = hf_folder(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                              attn_implementation=attention)
    return lm, tokenizer


def threads() -> int:
    """The threads torch computes with (backends.cpu_threads)."""
    return cpu_threads()


class TorchTrainer:
    """Fits a LoRA with AdamW on length-bucketed batches; the loss covers the target tokens only."""

    name = "torch"

    def __init__(self, model: Model, settings):
        if getattr(settings, "base_weights", "gguf") != "gguf":
            raise KmmError("the torch backend trains on the student's GGUF weights (base_weights = \"gguf\"); "
                           "base_weights = \"hub\" is for the unsloth and mlx backends")
        self.model, self.settings = model, settings

    def train(self, examples: Sequence[dict], out_dir, *, progress=None) -> dict[str, Any]:
        s = self.settings
        lm, tokenizer = load_base(self.model, attention=s.attention)
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
    """Train a peft model (LoRA attached) on the examples and save it to `out_dir/adapter`; with
    `save_epochs`, also each epoch's LoRA to `out_dir/epochs/epoch-N/adapter` (returned as arrays
    in "epoch_loras" for the GGUF export).

    Shared by every torch-family trainer (torch on the CPU, unsloth on a GPU): only the loading
    differs between them.
    """
    s = settings
    encoded, cut = lora_data.encode(tokenizer, examples, s.max_length)
    train_ids, dev_ids = lora_data.dev_split(len(encoded), getattr(s, "dev_fraction", 0.0), s.seed)
    train, dev = [encoded[i] for i in train_ids], [encoded[i] for i in dev_ids]
    lengths = [len(e.ids) for e in train]
    plan = lora_data.batch_plan(lengths, s.batch_size, s.epochs, s.seed)
    compute, autocast = compute_dtype(model, getattr(s, "compute", "float32"), device)
    best = DevCheck(model, dev, tokenizer.pad_token_id or 0, s, device, autocast) if dev else None
    epoch_loras: dict[int, dict] = {}

    def save_epoch(epoch: int) -> None:
        # Before any dev check restores an earlier epoch: this epoch's own weights.
        _save(model, epoch_dir(out_dir, epoch) / "adapter")
        epoch_loras[epoch] = lora_data.lora_arrays(model)

    log, seconds, tokens = _loop(model, train, plan, tokenizer.pad_token_id or 0, s, progress, device, best,
                                 autocast, on_epoch=save_epoch if getattr(s, "save_epochs", False) else None)
    _save(model, Path(out_dir) / "adapter")
    return {
        "lora": lora_data.lora_arrays(model), "epoch_loras": epoch_loras, "log": log, "steps": len(log),
        "final_loss": log[-1]["loss"], "tokens": tokens, "train_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1), "truncated_prompts": cut,
        "padding_waste": round(lora_data.padding_waste(plan[:len(log)], lengths), 4),
        "compute": compute, "threads": torch.get_num_threads(),
        **(best.summary() if best else {}),
    }


def _save(model, folder: Path) -> None:
    with _quiet():
        model.save_pretrained(folder)


class DevCheck(lora_data.DevCheck):
    """The dev split's loss after each epoch on a peft model; keeps the LoRA weights of the lowest
    one and says when `patience` epochs in a row failed to lower it (patience 0: never)."""

    def __init__(self, model, dev: Sequence, pad_id: int, settings, device: str,
                 autocast: Callable = nullcontext):
        super().__init__(dev, getattr(settings, "patience", 0))
        self.model, self.pad_id, self.device, self.autocast = model, pad_id, device, autocast
        self.batch_size = settings.batch_size

    def loss(self) -> float:
        """Mean cross-entropy over all target tokens of the dev split."""
        causal_lm = self.model.get_base_model()
        order = sorted(range(len(self.dev)), key=lambda i: len(self.dev[i].ids))
        total, count = 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                items = [self.dev[i] for i in order[start:start + self.batch_size]]
                batch = {k: v.to(self.device) for k, v in lora_data.collate(items, self.pad_id).items()}
                n = int((batch["labels"][:, 1:] != lora_data.IGNORE).sum())
                with self.autocast():
                    total += lora_data.target_loss(causal_lm, batch).item() * n
                count += n
        self.model.train()
        return total / count

    def snapshot(self) -> dict:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def restore(self) -> None:
        """Put the best epoch's LoRA weights back."""
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in self.best_state:
                    p.copy_(self.best_state[n])


def compute_dtype(model, compute: str, device: str) -> tuple[str, Callable]:
    """Prepare `model` for `compute`: (what is used, a context each forward pass runs in). On the
    CPU the LoRA weights, their gradients and the optimizer state stay float32 in every mode:

    - "bfloat16": every frozen weight (embeddings, norms, projections) is cast to bfloat16 once,
      so the model computes in bfloat16 throughout; peft runs each LoRA product in float32 and
      adds it to the bfloat16 output of its projection.
    - "mixed": the frozen projections in bfloat16, everything else float32, and each forward pass
      under autocast, which runs the matmuls in bfloat16 and keeps the residual stream float32.
      Autocast is entered per forward pass: one region around all steps would keep reusing its
      first bfloat16 copy of the LoRA weights (its cast cache lives as long as the region).
    - "float32": the exact path.

    On other devices the loader chose ("as loaded").
    """
    if device != "cpu":
        return "as loaded", nullcontext
    if compute == "bfloat16":
        for param in model.parameters():
            if not param.requires_grad and param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
        return "bfloat16", nullcontext
    if compute != "mixed":
        return "float32", nullcontext
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Linear) and base.weight.dtype == torch.float32:
            base.weight.data = base.weight.data.to(torch.bfloat16)
    return "mixed", lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def _loop(model, encoded, plan, pad_id: int, s, progress, device: str, best: DevCheck | None = None,
          autocast: Callable = nullcontext, on_epoch: Callable[[int], None] | None = None,
          ) -> tuple[list[dict], float, int]:
    """The optimizer steps of `plan`; after each epoch, `on_epoch(epoch)` then the dev check."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lora_data.lr_factor(getattr(s, "lr_schedule", "constant"), len(plan)))
    causal_lm = model.get_base_model()
    per_epoch = lora_data.n_batches(len(encoded), s.batch_size)
    model.train()
    log, seconds, tokens = [], 0.0, 0
    for step, batch_ids in enumerate(plan, 1):
        t0 = time.perf_counter()
        batch = {k: v.to(device) for k, v in lora_data.collate([encoded[i] for i in batch_ids], pad_id).items()}
        with autocast():
            loss = lora_data.target_loss(causal_lm, batch)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        tokens += int(batch["attention_mask"].sum())
        row = {"step": step, "loss": round(loss.item(), 5), "tokens_per_second": round(tokens / seconds, 1)}
        if lora_data.step_done(row, log, progress, per_epoch, len(plan), on_epoch, best):
            break
    if best:
        best.restore()
    return log, seconds, tokens


def greedy_answers(model: Model, adapter_dir: Path | None, prompts: Sequence[str], *, max_tokens: int,
                   device: str = "cpu") -> list[str]:
    """Greedy answers of the torch model (with the peft adapter in `adapter_dir`, if given),
    cut at the first newline, as llama.cpp's generator does."""
    from kmismatch_lite.qa.prompts import clean_output

    lm, tokenizer = load_base(model)
    if adapter_dir is not None:
        with _quiet():
            lm = peft.PeftModel.from_pretrained(lm, str(adapter_dir))
    lm.to(device).eval()
    vocab = tokenizer.get_vocab()
    stop = [tokenizer.eos_token_id] + [vocab[t] for t in ("<end_of_turn>", "<|eot_id|>") if t in vocab]
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                              do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
            outputs.append(clean_output(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    return outputs
