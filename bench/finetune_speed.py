"""How fast does `kmm finetune` (torch backend) train, against its earlier settings and a plain peft loop?

Four ways fine-tune the same LoRA (same model, settings, seed and examples) for one epoch:
`kmm finetune` as it is (the frozen model in bfloat16, float32 LoRA, plain matmul-softmax
attention), `kmm finetune` as it was before (`compute = "mixed"`: autocast bfloat16 matmuls with a
float32 residual stream, and torch's fused attention, `sdpa`), the exact path (`compute =
"float32"`, `sdpa`, as before any bfloat16), and the loop a user would write from the peft docs
(transformers' default attention, examples padded to `max_length`, shuffled,
`model(..., labels=...).loss`).
Training tokens/s counts the real (non-padding) tokens divided by the training time (loading and
the GGUF export are left out). The data are a quickstart fine-tuning set (`--data
runs/quickstart/sets/self.jsonl`), or by default 400 built-in training questions with the gold
answer on a seeded 30% and "I don't know" on the rest, as such a set looks. The machine may be
shared and its load drifts, so the four alternate, in rotating order, in every repeat; process
CPU seconds per 1,000 tokens are reported too, as they move less with the load. Medians over
repeats and their ratios are printed.

    python bench/finetune_speed.py [--data sets/self.jsonl] [--model smollm2-135m-instruct] [-n 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import peft
import torch

from kmismatch_lite import cards
from kmismatch_lite.qa import data, prompts, scoring
from kmismatch_lite.backends.torch_lora import load_base
from kmismatch_lite.finetune import LoraSettings, finetune, read_examples

SIDES = ["kmm bfloat16", "kmm mixed sdpa", "kmm float32 sdpa", "plain peft"]


def plain_peft(model: cards.Model, examples: list[dict], s: LoraSettings) -> tuple[float, float, int]:
    """The baseline: pad to max_length, shuffle, HF loss. Returns (seconds, cpu seconds, real tokens)."""
    lm, tok = load_base(model, attention="sdpa")       # transformers' default attention
    torch.manual_seed(s.seed)
    lm = peft.get_peft_model(lm, peft.LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                                 target_modules=s.target_modules, task_type="CAUSAL_LM"))
    rows = []
    for ex in examples:
        prompt = tok(prompts.zero_shot(ex["question"]))["input_ids"]
        ids = (prompt + tok(prompts.target_text(ex["target"]), add_special_tokens=False)["input_ids"])[:s.max_length]
        pad = s.max_length - len(ids)
        labels = [-100] * len(prompt) + ids[len(prompt):] + [-100] * pad
        rows.append((ids + [tok.pad_token_id or 0] * pad, [1] * len(ids) + [0] * pad, labels))
    order = list(range(len(rows)))
    random.Random(s.seed).shuffle(order)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=s.learning_rate, weight_decay=0.0)
    lm.train()
    tokens, wall, cpu = 0, time.perf_counter(), time.process_time()
    for _ in range(s.epochs):
        for i in range(0, len(order), s.batch_size):
            ids, mask, labels = (torch.tensor(x) for x in zip(*[rows[j] for j in order[i:i + s.batch_size]]))
            loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            tokens += int(mask.sum())
    return time.perf_counter() - wall, time.process_time() - cpu, tokens


def ours(name: str, examples: list[dict], s: LoraSettings) -> tuple[float, float, int, float]:
    """finetune() itself; the training time is what it reports. Returns (seconds, cpu, tokens, waste)."""
    with tempfile.TemporaryDirectory() as tmp:
        cpu0 = time.process_time()
        res = finetune(name, examples, Path(tmp), settings=s)
        cpu = time.process_time() - cpu0
        info = json.loads((res.adapter_dir / "kmm_finetune.json").read_text())
    # The CPU time includes loading and export; scale it to the training share of the wall time.
    return info["train_seconds"], cpu * info["train_seconds"] / res.seconds, info["tokens"], info["padding_waste"]


def default_examples(n: int = 400, seed: int = 0) -> list[dict]:
    """Built-in training questions with a quickstart-like mix of gold and abstain targets."""
    rng = random.Random(seed)
    return [{"question": q.question, "target": q.answers[0] if rng.random() < 0.3 else scoring.ABSTAIN_TARGET}
            for q in data.load("geonames").train[:n]]


def run_side(side: str, model: cards.Model, examples: list[dict], s: LoraSettings) -> tuple[float, float, float]:
    """(tokens/s, cpu-s per 1k tokens, padding share) of one side."""
    if side == "plain peft":
        sec, cpu, tokens = plain_peft(model, examples, s)
        waste = 1 - tokens / (len(examples) * s.max_length)
    else:
        words = side.split()            # "kmm <compute> [<attention>]"
        sec, cpu, tokens, waste = ours(model.name, examples,
                                       replace(s, compute=words[1], attention=words[2] if len(words) > 2 else s.attention))
    return tokens / sec, 1000 * cpu / tokens, waste


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", type=Path, help="a fine-tuning set (JSONL question/target), e.g. a run's sets/self.jsonl")
    ap.add_argument("-n", type=int, default=400, help="use the first N examples (tokens/s does not need them all)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = cards.resolve(args.model)
    examples = (read_examples(args.data) if args.data else default_examples())[:args.n]
    s = LoraSettings(epochs=1)
    print(f"{args.model}: {len(examples)} examples ({args.data or 'built-in'}), rank {s.rank}, batch {s.batch_size}, "
          f"max_length {s.max_length}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    runs: dict[str, list] = {side: [] for side in SIDES}
    for r in range(args.repeats):
        for side in SIDES[r % len(SIDES):] + SIDES[:r % len(SIDES)]:
            tps, cpu, waste = run_side(side, model, examples, s)
            runs[side].append((tps, cpu))
            print(f"  repeat {r + 1} {side:17s} {tps:7.1f} tokens/s  {cpu:6.2f} cpu-s/1k tokens  padding {waste:.0%}",
                  flush=True)
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in runs.items()}
    for k, (tps, cpu) in med.items():
        print(f"median {k:17s} {tps:7.1f} tokens/s  {cpu:6.2f} cpu-s/1k tokens")
    new = med["kmm bfloat16"]
    for other in SIDES[1:]:
        print(f"ratio kmm bfloat16 / {other}: {new[0] / med[other][0]:.2f}x tokens/s, "
              f"{med[other][1] / new[1]:.2f}x less CPU per token")


if __name__ == "__main__":
    main()
