"""How much does the fine-tuned student depend on its LoRA seed, per fine-tuning setting?

Takes a finished run folder (for example `kmm run recipes/quickstart.toml --out runs/quickstart`)
and keeps everything of it fixed (its split, its generations, its self and teacher sets); only the
fine-tune changes: each setting is trained with each LoRA seed on both sets, and each adapter
answers the run's test questions zero-shot through llama.cpp. Printed (markdown): per setting and
seed, the abstained and wrong counts of the self and teacher students, the dev loss where the
setting holds out a dev split, the steps and training seconds; then per setting the spread across
seeds (standard deviation and range of the abstain and wrong shares, and of the difference in
wrong-answer rate, teacher minus self: the experiment's measure). Results are kept under `--out`
per (setting, seed, set), so an interrupted sweep continues where it stopped.

    python bench/stable_finetune.py runs/quickstart --seeds 0 1 2 \\
        --setting default: --setting "es:learning_rate=3e-4,epochs=6,dev_fraction=0.1,patience=1"

A setting is `NAME:key=value,...` over the run's own `[finetune.lora]` settings (`NAME:` alone is
those settings as they are).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from kmismatch_lite import cards, check, recipes
from kmismatch_lite.qa import prompts
from kmismatch_lite.qa.data import Question
from kmismatch_lite.finetune import LoraSettings, finetune
from kmismatch_lite.io import read_jsonl, write_json

SETS = ("self", "teacher")


def parse_setting(text: str) -> tuple[str, dict]:
    """`NAME:key=value,...` -> (NAME, {key: value}) with values typed as LoraSettings has them."""
    name, _, body = text.partition(":")
    types = LoraSettings.types()
    out = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        out[key] = types[key](value) if key in types and types[key] is not list else value
    return name, out


def one(run_dir: Path, recipe: dict, lora: dict, seed: int, name: str, out: Path) -> dict:
    """Fine-tune on one set with one LoRA seed and score the test questions (cached in `out`)."""
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    student = cards.resolve(recipe["models"]["student"])
    ft = finetune(student.name, run_dir / "sets" / f"{name}.jsonl", out / "ft", backend=recipe["finetune"]["backend"],
                  settings={**lora, "seed": seed})
    info = json.loads((ft.adapter_dir / "kmm_finetune.json").read_text())
    test = [Question(**r) for r in read_jsonl(run_dir / "data" / "test.jsonl")]
    res = check.evaluate(student, test, prompts.PromptTemplate(), adapter=ft.adapter_gguf,
                         backend=recipe["evaluate"]["backend"], seed=recipe["seed"], options=recipe["evaluate"]["options"])
    m = res.metrics
    row = {"n": m["n"], "abstained": m["abstained"], "wrong": m["wrong"], "correct": m["correct"],
           "dev_loss": info.get("dev_loss"), "final_loss": info["final_loss"], "steps": info["steps"],
           "train_seconds": info["train_seconds"]}
    write_json(done, row)
    return row


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"SD {sd:.1%}, range {min(values):.1%}-{max(values):.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--setting", action="append", default=None, help="NAME:key=value,... (repeatable)")
    ap.add_argument("--recipe", default="quickstart")
    ap.add_argument("--out", type=Path, default=Path("runs/stable_finetune"))
    args = ap.parse_args()
    recipe = recipes.load(args.recipe)
    settings = [parse_setting(s) for s in (args.setting or ["default:"])]
    rows = {}
    for name, over in settings:
        lora = {**recipe["finetune"]["lora"], **over}
        for seed in args.seeds:
            for which in SETS:
                rows[name, seed, which] = r = one(args.run_dir, recipe, lora, seed, which, args.out / name / f"seed{seed}" / which)
                print(f"{name} seed {seed} {which}: abstained {r['abstained']}, wrong {r['wrong']}, "
                      f"dev loss {r['dev_loss']}, {r['steps']} steps, {r['train_seconds']:.0f} s", flush=True)
    print("\n| setting | LoRA seed | self abstained / wrong | teacher abstained / wrong | dev loss self / teacher | steps self / teacher | train s |")
    print("|---|---|---|---|---|---|---|")
    for (name, seed, _), _r in list(rows.items())[::2]:
        s, t = rows[name, seed, "self"], rows[name, seed, "teacher"]
        dev = " / ".join("-" if r["dev_loss"] is None else f"{r['dev_loss']:.3f}" for r in (s, t))
        print(f"| {name} | {seed} | {s['abstained']} / {s['wrong']} | {t['abstained']} / {t['wrong']} | {dev} | "
              f"{s['steps']} / {t['steps']} | {s['train_seconds'] + t['train_seconds']:.0f} |")
    print()
    for name, _ in settings:
        for which in SETS:
            rs = [rows[name, seed, which] for seed in args.seeds]
            print(f"{name} {which}: abstained {spread([r['abstained'] / r['n'] for r in rs])}; "
                  f"wrong {spread([r['wrong'] / r['n'] for r in rs])}")
        diffs = [(rows[name, seed, "teacher"]["wrong"] - rows[name, seed, "self"]["wrong"]) / rows[name, seed, "self"]["n"]
                 for seed in args.seeds]
        print(f"{name} wrong, teacher minus self: {spread(diffs)}")


if __name__ == "__main__":
    main()
