"""Is `kmm finetune` (torch backend) at least as fast as a plain peft training loop?

Both fine-tune the same LoRA (same model, settings, seed and examples: geonames training
questions with their gold answers) for one epoch. The plain loop is what a user would write from
the peft docs: examples padded to `max_length`, shuffled, `model(..., labels=...).loss`. Training
tokens/s counts the real (non-padding) tokens of the examples divided by the training time (model
loading and the GGUF export are left out of both). The machine is shared and its load drifts, so
the two alternate, in flipping order, in every repeat; process CPU seconds per 1,000 tokens are
reported too, as they move less with the load. Medians over repeats and their ratios are printed.

    python bench/finetune_speed.py [--model smollm2-135m-instruct] [-n 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path


import peft  # noqa: E402
import torch  # noqa: E402

from kmismatch_lite import cards, data, prompts  # noqa: E402
from kmismatch_lite.backends.torch_lora import load_base  # noqa: E402
from kmismatch_lite.finetune import LoraSettings, finetune  # noqa: E402


def plain_peft(model: cards.Model, examples: list[dict], s: LoraSettings) -> tuple[float, float, int]:
    """The baseline: pad to max_length, shuffle, HF loss. Returns (seconds, cpu seconds, real tokens)."""
    lm, tok = load_base(model)
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
    for epoch in range(s.epochs):
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
    import json

    with tempfile.TemporaryDirectory() as tmp:
        cpu0 = time.process_time()
        res = finetune(name, examples, Path(tmp), settings=s)
        cpu = time.process_time() - cpu0
        info = json.loads((res.adapter_dir / "kmm_finetune.json").read_text())
    # The CPU time includes loading and export; scale it to the training share of the wall time.
    return info["train_seconds"], cpu * info["train_seconds"] / res.seconds, info["tokens"], info["padding_waste"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("-n", type=int, default=128, help="training examples")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = cards.resolve(args.model)
    examples = [{"question": q.question, "target": q.answers[0]} for q in data.load("geonames").train[:args.n]]
    s = LoraSettings(epochs=1)
    print(f"{args.model}: {len(examples)} examples, rank {s.rank}, batch {s.batch_size}, max_length {s.max_length}, "
          f"{os.cpu_count()} threads")
    runs = {"kmm finetune": [], "plain peft": []}
    for r in range(args.repeats):
        for side in (["kmm finetune", "plain peft"] if r % 2 == 0 else ["plain peft", "kmm finetune"]):
            if side == "kmm finetune":
                sec, cpu, tokens, waste = ours(args.model, examples, s)
            else:
                sec, cpu, tokens = plain_peft(model, examples, s)
                waste = 1 - tokens / (len(examples) * s.max_length)
            runs[side].append((tokens / sec, 1000 * cpu / tokens))
            print(f"  repeat {r + 1} {side:13s} {tokens / sec:7.1f} tokens/s  {1000 * cpu / tokens:6.2f} cpu-s/1k tokens  "
                  f"padding {waste:.0%}", flush=True)
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in runs.items()}
    for k, (tps, cpu) in med.items():
        print(f"median {k:13s} {tps:7.1f} tokens/s  {cpu:6.2f} cpu-s/1k tokens")
    print(f"ratio kmm/plain: {med['kmm finetune'][0] / med['plain peft'][0]:.2f}x tokens/s, "
          f"{med['plain peft'][1] / med['kmm finetune'][1]:.2f}x less CPU per token")


if __name__ == "__main__":
    main()
