"""How fast does `kmm check`'s llama.cpp generator answer, against a plain llama-cpp-python loop?

For each bundled model, two conditions: the base with the 3-shot prompt, and the zero-shot prompt
with a LoRA adapter (shaped as `kmm finetune` makes them: rank 8 on every attention and MLP
projection; B is zero, as at initialisation, so answers stay the base's while llama.cpp still
computes every LoRA product: its cost is what matters here).
Each condition answers the geonames test questions greedily (stop at newline, 16 tokens at most)
with the plain create_completion loop and with kmm's generator at each `--parallel` setting
(1 = one prompt at a time; N answers N at once in the fast mode, Ne in the exact mode). On a shared machine load drifts within a minute, so the runs are
interleaved: every repeat walks the questions in chunks and runs each chunk with every runner,
the order rotating chunk by chunk. Printed: the median over repeats of questions per second
(wall), the ratio to the plain loop, and how many answers equal the plain loop's.

    python bench/check_speed.py [--models smollm2-135m-instruct,gemma-3-270m] [-n 300]
        [--repeats 3] [--chunk 100] [--parallel 1,8,8e]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from kmismatch_lite import cards
from kmismatch_lite.qa import data, prompts
from kmismatch_lite.backends.llamacpp import LlamaCppGenerator
from kmismatch_lite.formats.export_gguf import export_lora_gguf, read_metadata
from kmismatch_lite.finetune import TARGET_MODULES


def zero_adapter(model: cards.Model, path: Path, rank: int = 8) -> Path:
    """A LoRA with the shapes of `kmm finetune`'s default adapter for `model`, B = 0."""
    meta = read_metadata(model.gguf_path)
    arch = meta["general.architecture"]
    d, ff, h = (meta[f"{arch}.{k}"] for k in ("embedding_length", "feed_forward_length", "attention.head_count"))
    hkv = meta.get(f"{arch}.attention.head_count_kv", h)
    hd = meta.get(f"{arch}.attention.key_length", d // h)
    shapes = {"q_proj": (d, h * hd), "k_proj": (d, hkv * hd), "v_proj": (d, hkv * hd), "o_proj": (h * hd, d),
              "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}
    part = {m: "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for m in shapes}
    rng = np.random.default_rng(0)
    lora = {f"model.layers.{i}.{part[m]}.{m}": (rng.standard_normal((rank, n_in)).astype(np.float32),
                                                np.zeros((n_out, rank), np.float32))
            for i in range(meta[f"{arch}.block_count"]) for m, (n_in, n_out) in shapes.items() if m in TARGET_MODULES}
    return export_lora_gguf(lora, alpha=16.0, base=model, out_path=path)


def plain_loop(llm, rendered: list[str]) -> list[str]:
    """The baseline: one create_completion call per question, as a user would write it."""
    outs = []
    for p in rendered:
        r = llm.create_completion(p, max_tokens=prompts.MAX_TOKENS, temperature=0, stop=prompts.STOP)
        outs.append(prompts.clean_output(r["choices"][0]["text"]))
    return outs


def runners(model: cards.Model, adapter: Path | None, parallels: list[str], threads: int):
    """Name -> answer(prompts) for the plain loop and kmm's generator at each parallel setting,
    and the objects to close afterwards."""
    from kmismatch_lite.backends.llamacpp import _quiet_llama

    plain = _quiet_llama(model_path=str(model.gguf_path), n_ctx=1024, seed=0, n_threads=threads, n_batch=512,
                         n_gpu_layers=0, lora_path=str(adapter) if adapter else None)
    out: dict[str, Callable] = {"plain": lambda chunk: plain_loop(plain, chunk)}
    opened = [plain]
    for p in parallels:
        gen = LlamaCppGenerator(model, adapter=adapter, seed=0, threads=threads, parallel=int(p.rstrip("e")),
                                exact=p.endswith("e"))
        out[f"kmm-p{p}"] = lambda chunk, gen=gen: gen.generate(chunk, max_tokens=prompts.MAX_TOKENS,
                                                               stop=prompts.STOP)
        opened.append(gen)
    return out, opened


def interleaved(run: dict[str, Callable], rendered: list[str], repeats: int, chunk: int):
    """Median questions/s per runner over repeats, and each runner's answers of the first repeat."""
    names, n = list(run), len(rendered)
    qps: dict[str, list[float]] = {k: [] for k in names}
    answers: dict[str, list[str]] = {k: [] for k in names}
    for i in range(repeats):
        wall = dict.fromkeys(names, 0.0)
        for j, start in enumerate(range(0, n, chunk)):
            part = rendered[start:start + chunk]
            shift = (i + j) % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                outs = run[name](part)
                wall[name] += time.perf_counter() - t0
                if i == 0:
                    answers[name] += outs
        for name in names:
            qps[name].append(n / wall[name])
        print("  repeat", i + 1, " ".join(f"{k} {qps[k][-1]:.2f}" for k in names), "q/s", flush=True)
    return {k: statistics.median(v) for k, v in qps.items()}, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma-3-270m")
    ap.add_argument("-n", type=int, default=300, help="questions")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--chunk", type=int, default=100, help="questions per interleaved chunk")
    ap.add_argument("--parallel", default="1,8,8e",
                    help="kmm generator settings to time (comma-separated; Ne: N at once, exact mode)")
    ap.add_argument("--forms", default="few-shot,zero-shot+lora")
    args = ap.parse_args()
    parallels = args.parallel.split(",")

    qs = data.load("geonames", seed=0)
    questions = qs.test[: args.n]
    template = prompts.few_shot(qs.exemplars, seed=0)
    print(f"{len(questions)} questions, {args.threads} threads, {args.repeats} repeats interleaved in "
          f"chunks of {args.chunk}, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}")
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = cards.resolve(name)
            for form in args.forms.split(","):
                lora = form.endswith("+lora")
                adapter = zero_adapter(model, Path(tmp) / f"{name}.gguf") if lora else None
                render = prompts.zero_shot if form.startswith("zero-shot") else template.render
                rendered = [render(q.question) for q in questions]
                print(f"{name}, {form}:", flush=True)
                run, opened = runners(model, adapter, parallels, args.threads)
                med, answers = interleaved(run, rendered, args.repeats, args.chunk)
                for obj in opened:
                    obj.close()
                for k in med:
                    same = sum(a == b for a, b in zip(answers[k], answers["plain"]))
                    summary.append(f"{name:22s} {form:16s} {k:8s} {med[k]:7.2f} q/s  "
                                   f"x{med[k] / med['plain']:.2f} plain  {same}/{len(rendered)} = plain")
    print(f"median q/s (wall), load average now {os.getloadavg()[0]:.1f}:")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
