"""How much does one llama.cpp decode step cost as more tokens share it?

Batched answering (`-o parallel=N`) puts one token of each of N answers into one `llama_decode`
call. It pays only where a step of N tokens costs much less than N steps of one token, that is
where a step is bound by reading the weights rather than by arithmetic. This measures it directly
for each bundled model: after the 3-shot prompt of the first test question is in the cache, time
one `llama_decode` of N new tokens at the next N positions (N = 1, 2, 4, 8, 16), the cache rolled
back after each. Printed per model and N: the median milliseconds per step, per token, and the
tokens per second against N = 1 (the most batched answering can gain at that N, before its own
overheads).

    python bench/decode_scaling.py [--models smollm2-135m-instruct,gemma-3-270m] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

from kmismatch_lite import cards
from kmismatch_lite.qa import data, prompts
from kmismatch_lite.backends.llamacpp import LlamaCppGenerator


def step_ms(llm, prefix: list[int], n: int, repeats: int) -> float:
    """Median wall milliseconds of decoding `n` tokens after `prefix` in one call (rolled back as
    the generator does: `eval` drops the cache cells from `n_tokens` on)."""
    filler = prefix[-n:] if len(prefix) >= n else (prefix * n)[:n]
    times = []
    for _ in range(repeats):
        llm.n_tokens = len(prefix)
        t0 = time.perf_counter()
        llm.eval(filler)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma-3-270m")
    ap.add_argument("--sizes", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ds = data.load("geonames")
    template = prompts.few_shot(ds.exemplars, 3)
    print("| model | tokens per step | ms per step | ms per token | tokens/s vs 1 |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        gen = LlamaCppGenerator(cards.resolve(name))
        try:
            llm = gen.llm
            prefix = llm.tokenize(template.render(ds.test[0].question).encode(), add_bos=True, special=True)
            llm.reset()
            llm.eval(prefix)
            base = None
            for n in sizes:
                ms = step_ms(llm, prefix, n, args.repeats)
                base = base or ms
                print(f"| {name} | {n} | {ms:.1f} | {ms / n:.2f} | {n * base / ms:.2f}x |", flush=True)
        finally:
            gen.close()


if __name__ == "__main__":
    main()
