"""Is `kmm check`'s llama.cpp generator at least as fast as a plain llama-cpp-python loop?

Both answer the same rendered few-shot prompts (the geonames test split) with the same model,
threads and context, greedy, stop at the first newline, 16 tokens at most. Repeats alternate
(ours, plain, ours, plain, ...) in one process so machine load hits both alike; the medians of
questions per second and their ratio are printed, plus how many answers agree.

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

    runs: dict[str, list[float]] = {"kmm": [], "plain": []}
    answers: dict[str, list[str]] = {}
    for i in range(args.repeats):
        for name in ("kmm", "plain"):
            t0 = time.perf_counter()
            if name == "kmm":
                outs = ours.generate(rendered, max_tokens=prompts.MAX_TOKENS, stop=prompts.STOP)
            else:
                outs = plain_loop(plain, rendered)
            qps = n / (time.perf_counter() - t0)
            runs[name].append(qps)
            answers[name] = outs
            print(f"repeat {i + 1}: {name:5s} {qps:7.2f} q/s", flush=True)
    ours.close()
    plain.close()

    # End to end as `kmm check` runs it (model load, answers, scoring, sha256), once.
    t0 = time.perf_counter()
    res = check.evaluate(model, questions, template, options={"threads": args.threads})
    e2e = n / (time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in runs.items()}
    agree = sum(a == b for a, b in zip(answers["kmm"], answers["plain"]))
    print(f"model {model.name}, {n} questions, {template.shots}-shot, {args.threads} threads, "
          f"{args.repeats} alternating repeats")
    print(f"load: kmm {load_ours:.2f}s, plain {load_plain:.2f}s")
    print(f"median q/s: kmm {med['kmm']:.2f}, plain {med['plain']:.2f}, "
          f"ratio kmm/plain {med['kmm'] / med['plain']:.3f}")
    print(f"all runs q/s: kmm {[round(x, 2) for x in runs['kmm']]}, plain {[round(x, 2) for x in runs['plain']]}")
    print(f"end-to-end check.evaluate (load + answer + score + sha256): {e2e:.2f} q/s, "
          f"{res.tally.correct} correct of {n}")
    print(f"identical answers kmm vs plain: {agree}/{n}")


if __name__ == "__main__":
    main()
