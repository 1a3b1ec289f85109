"""What `kmm check --deterministic` costs: answers per second of the default generator (8 answers
decoded at once), one at a time (parallel=1, each prompt reusing the cells it shares with the one
before), and deterministic (parallel=1, fresh=true: each prompt alone from an empty cache), on the
bundled models with the 3-shot prompt. Runs are interleaved chunk by chunk, as bench/check_speed.py
does, and the median over repeats is printed with the ratio to the default, and how many answers
equal the deterministic ones.

    python bench/deterministic.py [-n 200] [--repeats 3] [--chunk 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

from kmismatch_lite import cards
from kmismatch_lite.qa import data, prompts
from kmismatch_lite.backends.llamacpp import LlamaCppGenerator

MODES = {"default": {}, "parallel=1": {"parallel": 1}, "deterministic": {"parallel": 1, "fresh": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma-3-270m")
    args = ap.parse_args()
    qs = data.load("geonames", seed=0)
    template = prompts.few_shot(qs.exemplars, seed=0)
    rendered = [template.render(q.question) for q in qs.test[: args.n]]
    kw = dict(max_tokens=prompts.MAX_TOKENS, stop=prompts.STOP)
    for name in args.models.split(","):
        model = cards.resolve(name)
        gens = {mode: LlamaCppGenerator(model, **opts) for mode, opts in MODES.items()}
        rates = {mode: [] for mode in MODES}
        answers = {mode: [] for mode in MODES}
        for r in range(args.repeats):
            seconds = dict.fromkeys(MODES, 0.0)
            outs = {mode: [] for mode in MODES}
            for i, start in enumerate(range(0, len(rendered), args.chunk)):
                chunk = rendered[start:start + args.chunk]
                order = list(MODES)[i % 3:] + list(MODES)[:i % 3]
                for mode in order:
                    t0 = time.perf_counter()
                    outs[mode] += gens[mode].generate(chunk, **kw)
                    seconds[mode] += time.perf_counter() - t0
            for mode in MODES:
                rates[mode].append(len(rendered) / seconds[mode])
                answers[mode] = outs[mode]
        base = statistics.median(rates["default"])
        for mode in MODES:
            med = statistics.median(rates[mode])
            same = sum(a == b for a, b in zip(answers[mode], answers["deterministic"]))
            print(f"{name:24s} {mode:14s} {med:6.1f} q/s  {med / base:4.2f}x of default  "
                  f"{same}/{len(rendered)} equal to deterministic")
        for g in gens.values():
            g.close()


if __name__ == "__main__":
    main()
