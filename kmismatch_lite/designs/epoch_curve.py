"""Protocol step 11, training length: each fine-tuned condition's correct, wrong and abstained
answers against the epoch whose saved LoRA gave them, per cell and pooled over seeds. Each
epoch's rates carry a 95% hierarchical bootstrap interval (seeds, then test questions; with one
seed, the test questions alone). Where both the teacher and the self condition were fine-tuned,
each epoch also holds teacher minus self in wrong-answer rate: over several seeds pooled with the
seed as a random effect (as the paper's comparison is), for one seed its paired normal interval.
With a dev split, each epoch's dev loss is recorded beside its answers."""

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


def cell_section(recipe: dict, evaluated: dict, by_epoch: tuple[dict, dict],
                 dev_losses: dict[str, dict[int, float]] | None = None) -> dict:
    """The `epochs` entry of one cell: `by_epoch` holds ({condition: {epoch: (samples, metrics)}},
    {condition: the epoch its own adapter is}); `dev_losses` {condition: {epoch: dev loss}}.
    Without a dev split the last epoch's answers are the condition's own evaluation."""
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
                    recipe["seed"], [dev_losses or {}])


def pooled(out: Path, cells: list[dict], n_boot: int) -> dict:
    """The `epochs` entry of one grid point, pooled over its seeds' cells (their samples files)."""
    runs, kept, losses = [], [], []
    for c in cells:
        conditions = c["epochs"]["conditions"]
        runs.append({cond: {e["epoch"]: _read(out / c["folder"], e["counts"][0]["samples"]) for e in v["by_epoch"]}
                     for cond, v in conditions.items()})
        kept.append({cond: v["kept_epoch"][0] for cond, v in conditions.items()})
        losses.append({cond: {e["epoch"]: e["dev_loss"][0] for e in v["by_epoch"] if e.get("dev_loss", [None])[0] is not None}
                       for cond, v in conditions.items()})
    first = cells[0]["epochs"]
    return _section(runs, [c["seed"] for c in cells], kept, first["epochs"], first["dev_split"], n_boot, 0, losses)


def _read(folder: Path, name: str) -> tuple[str, list[dict]]:
    return name, read_jsonl(folder / "samples" / f"{name}.jsonl")


def _section(runs: list[Runs], seeds: list[int], kept: list[dict], planned: int, dev: bool, n_boot: int,
             seed: int, dev_losses: list[dict]) -> dict:
    """Per condition and epoch, each seed's counts and dev loss and the rates pooled over the seeds
    that reached that epoch (a dev split's patience can stop a seed early); teacher minus self
    per epoch where both were fine-tuned."""
    rng = np.random.default_rng(seed)
    conditions = {}
    for cond in runs[0]:
        epochs = sorted({n for r in runs for n in r.get(cond, {})})
        conditions[cond] = {"kept_epoch": [k[cond] for k in kept], "by_epoch": []}
        for n in epochs:
            reached = [(s, r[cond][n], d.get(cond, {}).get(n)) for s, r, d in zip(seeds, runs, dev_losses)
                       if n in r.get(cond, {})]
            entry = _epoch(n, [(s, answers) for s, answers, _ in reached], n_boot, rng)
            if dev:
                entry["dev_loss"] = [loss for _, _, loss in reached]
            conditions[cond]["by_epoch"].append(entry)
    out = {"epochs": planned, "dev_split": dev, "seeds": len(runs), "conditions": conditions}
    difference = _differences(runs, seeds)
    if difference:
        out["difference"] = difference
    return out


PAIR = ("teacher", "self")


def _wrong(rows: list[dict]) -> list[bool]:
    return [r["verdict"] == scoring.WRONG for r in rows]


def _differences(runs: list[Runs], seeds: list[int]) -> list[dict]:
    """Per epoch that both the teacher and the self condition reached: each seed's difference in
    wrong-answer rate (teacher minus self, paired over the test questions) with its standard error,
    and the pooled estimate with its 95% interval: random effects with the Hartung-Knapp interval
    over several seeds, the paired normal interval for one."""
    from scipy import stats as st

    from kmismatch_lite import stats

    a, b = PAIR
    if not all(a in r and b in r for r in runs):
        return []
    out = []
    for n in sorted({n for r in runs for n in r[a] if n in r[b]}):
        pairs = [(s, r[a][n][1], r[b][n][1]) for s, r in zip(seeds, runs) if n in r[a] and n in r[b]]
        per_seed = [stats.paired_difference(_wrong(x), _wrong(y)) for _, x, y in pairs]
        effects, variances = [e for e, _ in per_seed], [v for _, v in per_seed]
        entry = {"epoch": n, "seeds": [s for s, _, _ in pairs], "differences": effects,
                 "standard_errors": [float(np.sqrt(v)) for v in variances]}
        if len(pairs) > 1:
            re = stats.random_effects(effects, variances, level=LEVEL)
            entry.update(estimate=re["estimate"], ci=re["ci"], tau=re["tau"], method="random effects")
        else:
            z, se = st.norm.ppf(1 - (1 - LEVEL) / 2), float(np.sqrt(variances[0]))
            entry.update(estimate=effects[0], ci=[effects[0] - z * se, effects[0] + z * se], method="paired normal")
        out.append(entry)
    return out


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

COLUMNS = ["condition", "epoch", "correct", "wrong (per seed)", "abstained", "wrong-answer rate (95%)", "dev loss"]


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
                        f"{100 * e['rates'][scoring.WRONG]:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]", _dev_loss(e)])
    return out


def _dev_loss(entry: dict) -> str:
    """The epoch's dev loss, its mean over the seeds where there are several; "-" without a dev split."""
    losses = [x for x in entry.get("dev_loss", []) if x is not None]
    return f"{sum(losses) / len(losses):.4f}" if losses else "-"


def difference_text(section: dict) -> str:
    """Teacher minus self in wrong-answer rate at each epoch, with its interval."""
    rows = section.get("difference")
    if not rows:
        return ""
    many = len(rows[0]["seeds"]) > 1
    how = (f"pooled over {len(rows[0]['seeds'])} seeds with the seed as a random effect, 95% Hartung-Knapp intervals"
           if many else "one seed, 95% paired normal intervals")
    parts = [f"epoch {r['epoch']} {100 * r['estimate']:+.1f} points [{100 * r['ci'][0]:+.1f}, {100 * r['ci'][1]:+.1f}]"
             for r in rows]
    return f" Teacher minus self in wrong-answer rate ({how}): {'; '.join(parts)}."


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
    return f"Wrong-answer rate by training epoch ({how}): {'; '.join(parts)}.{tail}{difference_text(section)}"


def panel(ax, section: dict) -> None:
    """Wrong-answer rate against epoch, one line per condition, intervals as error bars; below it,
    where the section has one, teacher minus self against epoch with its intervals."""
    k = len(section["conditions"])
    for i, (cond, v) in enumerate(section["conditions"].items()):
        # Each condition's points a little aside, so overlapping error bars stay readable.
        x = [e["epoch"] + 0.04 * (i - (k - 1) / 2) for e in v["by_epoch"]]
        y = [100 * e["rates"][scoring.WRONG] for e in v["by_epoch"]]
        ci = [e["rates_ci"][scoring.WRONG] for e in v["by_epoch"]]
        err = [[yi - 100 * lo for yi, (lo, _) in zip(y, ci)], [100 * hi - yi for yi, (_, hi) in zip(y, ci)]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=cond)
    ax.set_xticks(range(1, section["epochs"] + 1))
    ax.set_ylabel("wrong answers, % of test questions")
    ax.legend(fontsize=7)
    rows = section.get("difference")
    if not rows:
        ax.set_xlabel("training epoch (the LoRA saved at its end)")
        return
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    below = make_axes_locatable(ax).append_axes("bottom", size="70%", pad=0.35, sharex=ax)
    ax.tick_params(labelbottom=False)
    y = [100 * r["estimate"] for r in rows]
    err = [[yi - 100 * r["ci"][0] for yi, r in zip(y, rows)], [100 * r["ci"][1] - yi for yi, r in zip(y, rows)]]
    below.errorbar([r["epoch"] for r in rows], y, yerr=err, marker="s", capsize=3, color="black",
                   label="teacher minus self")
    below.axhline(0, color="grey", linewidth=0.8)
    below.set_xlabel("training epoch (the LoRA saved at its end)")
    below.set_ylabel("teacher - self, points")
