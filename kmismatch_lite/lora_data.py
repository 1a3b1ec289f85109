"""Fine-tuning data shared by the torch-family trainers: tokenising `question -> target` pairs the
way llama.cpp sees them, batching with little padding, the loss on the answer tokens only, and the
trained LoRA as numpy arrays for the GGUF export."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from kmismatch_lite.qa import prompts
from kmismatch_lite.errors import KmmError

IGNORE = -100
CHUNK_BATCHES = 16  # batches per length-sorted chunk: enough to group similar lengths, still shuffled


@dataclass(frozen=True)
class Encoded:
    """One training sequence: prompt then target tokens; the loss covers `ids[n_prompt:]`."""

    ids: tuple[int, ...]
    n_prompt: int


def encode(tokenizer, examples: Sequence[dict], max_length: int) -> tuple[list[Encoded], int]:
    """Token ids of `zero_shot(question) + target_text(target)` and how many prompts were cut.

    The prompt is tokenised alone with the tokenizer's special tokens (a BOS only where the model
    adds one, as llama.cpp does), the target alone without them, so training sees the prompt tokens
    llama.cpp will see. A prompt too long for `max_length` loses its start (after any BOS).
    """
    out, cut = [], 0
    for i, ex in enumerate(examples):
        prompt = tokenizer(prompts.zero_shot(ex["question"]))["input_ids"]
        target = tokenizer(prompts.target_text(ex["target"]), add_special_tokens=False)["input_ids"]
        room = max_length - len(target)
        if room < 2:
            raise KmmError(f"example {i + 1}: the target alone has {len(target)} tokens; raise max_length (now {max_length})")
        if len(prompt) > room:
            keep = 1 if prompt[0] == tokenizer.bos_token_id else 0
            prompt = prompt[:keep] + prompt[len(prompt) - (room - keep):]
            cut += 1
        out.append(Encoded(tuple(prompt) + tuple(target), len(prompt)))
    return out, cut


def n_batches(n_examples: int, batch_size: int) -> int:
    return -(-n_examples // batch_size)


def n_dev(n_examples: int, dev_fraction: float) -> int:
    """How many examples a dev split of `dev_fraction` holds out: at least one when asked for,
    never all of them."""
    if dev_fraction <= 0:
        return 0
    return min(max(1, round(n_examples * dev_fraction)), n_examples - 1)


def dev_split(n_examples: int, dev_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, dev indices), both in the examples' order; the same seed, the same split."""
    dev = set(random.Random(f"dev split {seed}").sample(range(n_examples), n_dev(n_examples, dev_fraction)))
    return [i for i in range(n_examples) if i not in dev], sorted(dev)


def batch_plan(lengths: Sequence[int], batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Example indices per step: each epoch shuffled with the seed, sorted by length within chunks
    of CHUNK_BATCHES batches (so a batch pads little), then the batches shuffled again.
    `epochs * ceil(n / batch_size)` steps; the same seed gives the same plan."""
    rng = random.Random(seed)
    chunk = batch_size * CHUNK_BATCHES
    plan: list[list[int]] = []
    for _ in range(epochs):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
            batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
        rng.shuffle(batches)
        plan += batches
    return plan


class DevCheck:
    """The dev split's loss after each epoch, for every trainer: keeps the LoRA weights of the
    lowest one (what `snapshot()` returns) and says when `patience` epochs in a row failed to
    lower it (patience 0: never). A trainer's subclass computes `loss()`, `snapshot()` and `restore()`."""

    def __init__(self, dev: Sequence[Encoded], patience: int):
        self.dev, self.patience = dev, patience
        self.log: list[dict] = []
        self.best_loss, self.best_state, self.worse = float("inf"), None, 0

    def loss(self) -> float:
        """Mean cross-entropy over all target tokens of the dev split."""
        raise NotImplementedError

    def snapshot(self) -> Any:
        """A copy of the LoRA weights as they are now."""
        raise NotImplementedError

    def restore(self) -> None:
        """Put the best epoch's LoRA weights back."""
        raise NotImplementedError

    def stop_after(self, epoch: int, step: int) -> bool:
        """Record the dev loss after `epoch`; True when training should stop."""
        loss = self.loss()
        self.log.append({"epoch": epoch, "step": step, "dev_loss": round(loss, 5)})
        if loss < self.best_loss:
            self.best_loss, self.worse = loss, 0
            self.best_state = self.snapshot()
        else:
            self.worse += 1
        return 0 < self.patience <= self.worse

    def summary(self) -> dict[str, Any]:
        best = min(self.log, key=lambda r: r["dev_loss"])
        return {"dev_examples": len(self.dev), "dev_loss": best["dev_loss"], "best_epoch": best["epoch"],
                "best_step": best["step"], "dev_log": self.log}


def step_done(row: dict, log: list[dict], progress: Callable | None, per_epoch: int, planned: int,
              on_epoch: Callable[[int], None] | None, best: DevCheck | None) -> bool:
    """After a training step: log its row and show it; at an epoch's end save the epoch
    (`on_epoch`) and check the dev loss. True when training stops early (the bar then jumps to
    its end, saying at which epoch)."""
    log.append(row)
    step = row["step"]
    if progress:
        progress(1, loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_second']:.0f}")
    if step % per_epoch:
        return False
    if on_epoch:
        on_epoch(step // per_epoch)
    if best and best.stop_after(step // per_epoch, step):
        if progress and step < planned:
            progress(planned - step, stopped=f"epoch {step // per_epoch}")
        return True
    return False


def lr_factor(schedule: str, steps: int) -> Callable[[int], float]:
    """The learning rate's multiplier at each step (0-based) of `steps`: 1 throughout for
    "constant"; for "linear", from 1 at the first step down to 1/steps at the last."""
    if schedule == "linear":
        return lambda step: max(0.0, 1 - step / steps)
    return lambda step: 1.0


def collate(items: Sequence[Encoded], pad_id: int, pad_to: int | None = None) -> dict[str, Any]:
    """Right-padded `input_ids` and `labels` (IGNORE on prompt and padding) as torch tensors.

    Padding only at the end lets the model run with a plain causal mask: no real token attends a pad.
    """
    import torch

    width = pad_to or max(len(e.ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        ids[row, :len(e.ids)] = torch.tensor(e.ids)
        labels[row, e.n_prompt:len(e.ids)] = torch.tensor(e.ids[e.n_prompt:])
        mask[row, :len(e.ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def target_loss(causal_lm, batch: dict[str, Any]):
    """Mean cross-entropy over the target tokens of the batch.

    Only the target positions go through the output layer: with Gemma's 262k-word vocabulary the
    full logits would cost more than the rest of the model.
    """
    import torch.nn.functional as F

    hidden = causal_lm.model(input_ids=batch["input_ids"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:
        logits = (logits / cap).tanh() * cap
    return F.cross_entropy(logits.float(), labels[keep])


def padding_waste(plan: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the token slots in the planned batches that are padding."""
    real = sum(lengths[i] for batch in plan for i in batch)
    slots = sum(len(batch) * max(lengths[i] for i in batch) for batch in plan)
    return 1 - real / slots if slots else 0.0


def lora_arrays(peft_model, adapter: str = "default") -> dict[str, tuple[Any, Any]]:
    """{HF module name: (A [rank, in], B [out, rank])} as float32 numpy arrays from a peft model,
    copies: later training steps leave them as they are now."""
    out = {}
    for name, module in peft_model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if lora_a is None or adapter not in lora_a:
            continue
        name = name.removeprefix("base_model.model.")
        a = lora_a[adapter].weight.detach().float().cpu().numpy().copy()
        b = lora_b[adapter].weight.detach().float().cpu().numpy().copy()
        out[name] = (a, b)
    return out


def epoch_dir(out_dir: Path, epoch: int) -> Path:
    """Where a fine-tune with `save_epochs` keeps the LoRA of the end of `epoch` (1-based):
    `adapter/` and `adapter.gguf`, as the final adapter."""
    return Path(out_dir) / "epochs" / f"epoch-{epoch}"
