"""Protocol step 11, training length: each fine-tuned condition's correct, wrong and abstained
answers against the epoch whose saved LoRA gave them, per cell and pooled over seeds. Each
epoch's rates carry a 95% hierarchical bootstrap interval (seeds, then test questions; with one
seed, the test questions alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from kmismatch_lite.qa import scoring
from kmismatch_lite.finetune import LoraSettings
from kmismatch_lite.io import read_jsonl

LEVEL = 0.95


def epoch_condition(cond: str, epoch: int) -> str:
    """The name of a condition's evaluation at a saved epoch (its stage and samples file)."""
    return f"{cond}-epoch-{epoch}"

# {condition: {epoch: (samples name, evaluation rows)}} of one seed
Runs = dict[str, dict[int, tuple[str, list[dict]]]]


def cell_section(recipe: dict, evaluated: dict, by_epoch: tuple[dict, dict]) -> dict:
    """The `epochs` entry of one cell: `by_epoch` holds ({condition: {epoch: (samples, metrics)}},
    {condition: the epoch its own adapter is}). Without a dev split the last epoch's answers are
    the condition's own evaluation."""
    epochs, kept = by_epoch
    s = LoraSettings.from_dict(recipe["finetune"]["lora"])
    dev = s.dev_fraction > 0
    runs: Runs = {}
    for cond in kept:
        per = {n: (epoch_condition(cond, n), rows) for n, (rows, _) in epochs.get(cond, {}).items()}
        if not dev:
            per[s.epochs] = (cond, evaluated[cond][0])
        runs[cond] = dict(sorted(per.items()))
    return _section([runs], [recipe["seed"]], [kept], s.epochs, dev, recipe["report"]["bootstrap"],
                    recipe["seed"])


def pooled(out: Path, cells: list[dict], n_boot: int) -> dict:
    """The `epochs` entry of one grid point, pooled over its seeds' cells (their samples files)."""
    runs, kept = [], []
    for c in cells:
        conditions = c["epochs"]["conditions"]
        runs.append({cond: {e["epoch"]: _read(out / c["folder"], e["counts"][0]["samples"]) for e in v["by_epoch"]}
                     for cond, v in conditions.items()})
        kept.append({cond: v["kept_epoch"][0] for cond, v in conditions.items()})
    first = cells[0]["epochs"]
    return _section(runs, [c["seed"] for c in cells], kept, first["epochs"], first["dev_split"], n_boot, 0)


def _read(folder: Path, name: str) -> tuple[str, list[dict]]:
    return name, read_jsonl(folder / "samples" / f"{name}.jsonl")


def _section(runs: list[Runs], seeds: list[int], kept: list[dict], planned: int, dev: bool, n_boot: int,
             seed: int) -> dict:
    """Per condition and epoch, each seed's counts and the rates pooled over the seeds that
    reached that epoch (a dev split's patience can stop a seed early)."""
    rng = np.random.default_rng(seed)
    conditions = {}
    for cond in runs[0]:
        epochs = sorted({n for r in runs for n in r.get(cond, {})})
        conditions[cond] = {
            "kept_epoch": [k[cond] for k in kept],
            "by_epoch": [_epoch(n, [(s, r[cond][n]) for s, r in zip(seeds, runs) if n in r.get(cond, {})],
                                n_boot, rng) for n in epochs],
        }
    return {"epochs": planned, "dev_split": dev, "seeds": len(runs), "conditions": conditions}


def _epoch(epoch: int, per_seed: Sequence[tuple[int, tuple[str, list[dict]]]], n_boot: int,
           rng: np.random.Generator) -> dict:
    from kmismatch_lite.stats import resample_seeds_then_questions

    counts, flags = [], []
    for seed, (name, rows) in per_seed:
        verdicts = [r["verdict"] for r in rows]
        counts.append({"seed": seed, "samples": name, "n": len(rows), **{v: verdicts.count(v) for v in scoring.VERDICTS}})
        flags.append(np.array([[x == v for x in verdicts] for v in scoring.VERDICTS], dtype=float))
    boot = resample_seeds_then_questions(flags, n_boot, rng).mean(axis=1)  # resamples x verdicts
    lo, hi = np.quantile(boot, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2], axis=0)
    means = np.mean([f.mean(axis=1) for f in flags], axis=0)
    return {"epoch": epoch, "seeds": len(counts), "counts": counts,
            "rates": {v: float(means[i]) for i, v in enumerate(scoring.VERDICTS)},
            "rates_ci": {v: [float(lo[i]), float(hi[i])] for i, v in enumerate(scoring.VERDICTS)}}


# --- table, sentence and figure ---

COLUMNS = ["condition", "epoch", "correct", "wrong (per seed)", "abstained", "wrong-answer rate (95%)"]


def _mean(counts: list[dict], verdict: str) -> str:
    m = sum(c[verdict] for c in counts) / len(counts)
    return f"{m:g}" if float(m).is_integer() else f"{m:.1f}"


def rows(section: dict) -> list[list[str]]:
    """One row per condition and epoch: counts (means over seeds) and the wrong-answer rate."""
    out = []
    for cond, v in section["conditions"].items():
        for e in v["by_epoch"]:
            c, (lo, hi) = e["counts"], e["rates_ci"][scoring.WRONG]
            wrong = _mean(c, scoring.WRONG) + (f" ({', '.join(str(x[scoring.WRONG]) for x in c)})" if len(c) > 1 else "")
            out.append([cond, str(e["epoch"]), _mean(c, scoring.CORRECT), wrong, _mean(c, scoring.ABSTAINED),
                        f"{100 * e['rates'][scoring.WRONG]:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"])
    return out


def text(section: dict) -> str:
    """The first and last epoch's wrong-answer rate of each condition, and which epoch each kept."""
    parts = []
    for cond, v in section["conditions"].items():
        first, last = v["by_epoch"][0], v["by_epoch"][-1]
        parts.append(f"{cond} {100 * first['rates'][scoring.WRONG]:.1f}% after epoch {first['epoch']}, "
                     f"{100 * last['rates'][scoring.WRONG]:.1f}% after epoch {last['epoch']}")
    seeds = section["seeds"]
    how = (f"over {seeds} seeds, 95% intervals from a hierarchical bootstrap over seeds and test questions"
           if seeds > 1 else "one seed, 95% intervals from a bootstrap over test questions")
    if section["dev_split"]:
        kept = "; ".join(f"{cond} {', '.join(map(str, v['kept_epoch']))}" for cond, v in section["conditions"].items())
        tail = (f" With a dev split, each condition's own adapter is the epoch of lowest dev loss ({kept}"
                f"{' per seed' if seeds > 1 else ''}); every row here is that epoch's own LoRA.")
    else:
        tail = f" Epoch {section['epochs']} is the condition's own adapter and evaluation."
    return f"Wrong-answer rate by training epoch ({how}): {'; '.join(parts)}.{tail}"


def panel(ax, section: dict) -> None:
    """Wrong-answer rate against epoch, one line per condition, intervals as error bars."""
    k = len(section["conditions"])
    for i, (cond, v) in enumerate(section["conditions"].items()):
        # Each condition's points a little aside, so overlapping error bars stay readable.
        x = [e["epoch"] + 0.04 * (i - (k - 1) / 2) for e in v["by_epoch"]]
        y = [100 * e["rates"][scoring.WRONG] for e in v["by_epoch"]]
        ci = [e["rates_ci"][scoring.WRONG] for e in v["by_epoch"]]
        err = [[yi - 100 * lo for yi, (lo, _) in zip(y, ci)], [100 * hi - yi for yi, (_, hi) in zip(y, ci)]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=cond)
    ax.set_xticks(range(1, section["epochs"] + 1))
    ax.set_xlabel("training epoch (the LoRA saved at its end)")
    ax.set_ylabel("wrong answers, % of test questions")
    ax.legend(fontsize=7)
