"""Is `kmm check`'s llama.cpp generator at least as fast as a plain llama-cpp-python loop?

Both answer the same rendered few-shot prompts (the geonames test split) with the same model,
threads and context, greedy, stop at the first newline, 16 tokens at most. On a shared machine
load drifts by 50% within a minute, so the two are interleaved finely: every repeat walks the
questions in chunks and runs each chunk with both (the order flipping chunk by chunk), summing
each one's wall and CPU time. The medians over repeats of questions per second (wall) and of
CPU milliseconds per question, and their ratios, are printed, plus how many answers agree.

    python bench/check_speed.py [--model smollm2-135m-instruct] [-n 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from kmismatch_lite import cards, check, data, prompts
from kmismatch_lite.backends.llamacpp import LlamaCppGenerator


def plain_loop(llm, rendered: list[str]) -> list[str]:
    """The baseline: one create_completion call per question, as a user would write it."""
    outs = []
    for p in rendered:
        r = llm.create_completion(p, max_tokens=prompts.MAX_TOKENS, temperature=0, stop=prompts.STOP)
        outs.append(prompts.clean_output(r["choices"][0]["text"]))
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("-n", type=int, default=300, help="questions")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--chunk", type=int, default=25, help="questions per interleaved chunk")
    args = ap.parse_args()

    from llama_cpp import Llama

    model = cards.resolve(args.model)
    qs = data.load("geonames", seed=0)
    questions = qs.test[: args.n]
    template = prompts.few_shot(qs.exemplars, seed=0)
    rendered = [template.render(q.question) for q in questions]
    n = len(rendered)

    t0 = time.perf_counter()
    ours = LlamaCppGenerator(model, seed=0, threads=args.threads)
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = Llama(model_path=str(model.gguf_path), n_ctx=1024, seed=0, n_threads=args.threads,
                  n_batch=512, n_gpu_layers=0, verbose=False)
    load_plain = time.perf_counter() - t0

    def run(name: str, chunk: list[str]) -> list[str]:
        if name == "kmm":
            return ours.generate(chunk, max_tokens=prompts.MAX_TOKENS, stop=prompts.STOP)
        return plain_loop(plain, chunk)

    qps: dict[str, list[float]] = {"kmm": [], "plain": []}
    cpu_ms: dict[str, list[float]] = {"kmm": [], "plain": []}
    answers: dict[str, list[str]] = {"kmm": [], "plain": []}
    for i in range(args.repeats):
        wall, cpu = {"kmm": 0.0, "plain": 0.0}, {"kmm": 0.0, "plain": 0.0}
        for j, start in enumerate(range(0, n, args.chunk)):
            chunk = rendered[start:start + args.chunk]
            for name in (("kmm", "plain") if (i + j) % 2 == 0 else ("plain", "kmm")):
                w0, c0 = time.perf_counter(), time.process_time()
                outs = run(name, chunk)
                wall[name] += time.perf_counter() - w0
                cpu[name] += time.process_time() - c0
                if i == 0:
                    answers[name] += outs
        for name in qps:
            qps[name].append(n / wall[name])
            cpu_ms[name].append(1000 * cpu[name] / n)
        print(f"repeat {i + 1}: kmm {qps['kmm'][-1]:6.2f} q/s {cpu_ms['kmm'][-1]:6.1f} cpu-ms/q | "
              f"plain {qps['plain'][-1]:6.2f} q/s {cpu_ms['plain'][-1]:6.1f} cpu-ms/q", flush=True)
    ours.close()
    plain.close()

    # End to end as `kmm check` runs it (model load, answers, scoring, sha256), once.
    t0 = time.perf_counter()
    res = check.evaluate(model, questions, template, options={"threads": args.threads})
    e2e = n / (time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in qps.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_ms.items()}
    agree = sum(a == b for a, b in zip(answers["kmm"], answers["plain"]))
    print(f"model {model.name}, {n} questions, {template.shots}-shot, {args.threads} threads, "
          f"{args.repeats} repeats interleaved in chunks of {args.chunk}")
    print(f"load: kmm {load_ours:.2f}s, plain {load_plain:.2f}s")
    print(f"median q/s (wall): kmm {med['kmm']:.2f}, plain {med['plain']:.2f}, "
          f"ratio kmm/plain {med['kmm'] / med['plain']:.3f}")
    print(f"median cpu-ms per question: kmm {med_cpu['kmm']:.1f}, plain {med_cpu['plain']:.1f}, "
          f"ratio plain/kmm {med_cpu['plain'] / med_cpu['kmm']:.3f}")
    print(f"end-to-end check.evaluate (load + answer + score + sha256): {e2e:.2f} q/s, "
          f"{res.tally.correct} correct of {n}")
    print(f"identical answers kmm vs plain: {agree}/{n}")


if __name__ == "__main__":
    main()
