"""`kmm run RECIPE --dry-run`: what a run would do, before it does it. Per stage: whether it would
run or reuse the run folder's own copy (its key computed as the run would, where the stages it
reads are there to reuse and its models are on disk), the answers it generates with their prompt
and answer tokens, the training steps and tokens of a fine-tune, and an estimate of its wall time
and peak memory. Nothing is computed or written: the data split is read from the run folder or,
for the built-in and file question sets, drawn in memory; a hub recipe is planned from its cards.

Times come from this run folder's own earlier stages where it has some (seconds per answer, or per
training token, of a finished stage of the same kind and model), else from costs measured on a
2-core x86-64 VM (llama.cpp answering and the torch fine-tune of SmolLM2 135M on 2 threads),
scaled by the model's parameter count and the thread count: a rough guide, good to a factor of
about two on a CPU like it. A GPU backend has no such reference: run one seed, and the dry-run of
the rest reads that seed's timings.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from kmismatch_lite import cards, parallel, plan as planning
from kmismatch_lite.errors import KmmError
from kmismatch_lite.lora_data import n_batches, n_dev
from kmismatch_lite.qa import prompts
from kmismatch_lite.stage_run import key_of, model_key, own_stages, stage_context

# Measured on the 2-core VM (docs/measurements.md): llama.cpp decodes SmolLM2 135M Q4_1 at about
# 3.3 ms a token in batches; the torch fine-tune trains at 204 tokens a second; one seed's run
# peaked at 1.98 GB of RSS, its fine-tune. Costs scale with parameters and inversely with threads.
REFERENCE_PARAMS = 135e6
REFERENCE_THREADS = 2
SECONDS_PER_ANSWER_TOKEN = 0.0033
SECONDS_PER_TRAIN_TOKEN = 1 / 204
FINETUNE_FIXED_SECONDS = 10.0       # loading the student and exporting the adapter
TORCH_BASE_GB, TORCH_GB_PER_PARAM = 1.0, 6e-9
LLAMACPP_BASE_GB = 0.4
GGUF_BYTES_PER_PARAM = 0.6          # about 4.8 bits a weight, as Q4_K_M files are
CHARS_PER_TOKEN = 4
FEW_SHOT_ANSWER_TOKENS = 6          # a few-shot answer stops at its line's end
TYPICAL_QUESTION_CHARS, TYPICAL_TARGET_CHARS = 60, 12  # a question set not at hand


@dataclass
class StagePlan:
    """One distinct stage of the plan."""

    folder: str
    group: str                      # generate, evaluate, slick, finetune, data, sets, ...
    model: str | None
    role: str | None
    status: str                     # "run", "reuse", or "skip" (its input will not exist)
    answers: int = 0
    prompt_tokens: int = 0
    answer_tokens: int = 0          # at most: every answer at its token limit
    steps: int = 0
    train_tokens: int = 0
    seconds: float | None = None    # a fine-tune with an early stop: if it runs every epoch
    timed_from: str = ""            # "run folder" or "reference"
    early_stop: bool = False        # a fine-tune whose patience may end it before its last epoch
    likely_seconds: float | None = None  # such a fine-tune, stopping as early as the folder's finished ones
    memory_gb: float | None = None


@dataclass
class CellData:
    train: list[str]                # questions (and targets' text lengths, for a fine-tune)
    test: list[str]
    target_chars: float
    prefix: str


def params_of(spec: str, model: cards.Model | None) -> float | None:
    """A model's parameter count: its card's ("135M", "1.5B"), else from its GGUF's size."""
    card = model.card if model else cards.cards().get(spec)
    if card is not None:
        m = re.fullmatch(r"\s*([\d.]+)\s*([MB])\s*", card.params, re.I)
        if m:
            return float(m.group(1)) * (1e6 if m.group(2).upper() == "M" else 1e9)
    if model is not None and model.gguf_path is not None and model.gguf_path.is_file():
        return model.gguf_path.stat().st_size / GGUF_BYTES_PER_PARAM
    return None


def _sizes(spec: str, model: cards.Model | None) -> tuple[float | None, float | None]:
    """(parameters, GGUF size in GB) of a model spec: its file's size where it is on disk, else
    estimated from its card's parameter count."""
    params = params_of(spec, model)
    if model is not None and model.gguf_path is not None and model.gguf_path.is_file():
        return params, model.gguf_path.stat().st_size / 1e9
    return params, params * GGUF_BYTES_PER_PARAM / 1e9 if params else None


def _cell_data(cell: planning.Cell, out: Path) -> CellData:
    """The cell's questions and prompt: its data stage's files, else the split drawn in memory
    (built-in and file question sets), else the recipe's counts at typical lengths."""
    d = cell.settings.data
    folder = out / cell.stages["data"].folder
    if (folder / "stage.json").is_file():
        rows = {s: [json.loads(line) for line in (folder / f"{s}.jsonl").read_text(encoding="utf-8").splitlines() if line]
                for s in ("train", "test")}
        targets = [r["answers"][0] for r in rows["train"] if r.get("answers")]
        return CellData([r["question"] for r in rows["train"]], [r["question"] for r in rows["test"]],
                        statistics.fmean(map(len, targets)) if targets else TYPICAL_TARGET_CHARS,
                        (folder / "prompt.txt").read_text(encoding="utf-8"))
    if d.dataset == "geonames" or d.dataset.split(":", 1)[0] in ("jsonl", "csv", "parquet"):
        from kmismatch_lite.qa import data

        qs = data.load(d.dataset, seed=cell.settings.seed, test_frac=d.test_frac, n_exemplars=d.exemplars)
        train, test = qs.train[: d.train or None], qs.test[: d.test or None]
        targets = [q.answers[0] for q in train if q.answers]
        return CellData([q.question for q in train], [q.question for q in test],
                        statistics.fmean(map(len, targets)) if targets else TYPICAL_TARGET_CHARS,
                        prompts.few_shot(qs.exemplars, k=d.shots, seed=cell.settings.seed).prefix)
    if not d.train or not d.test:
        raise KmmError(f"--dry-run: '{d.dataset}' is not at hand, so data.train and data.test must be set to count its questions")
    typical = "x" * TYPICAL_QUESTION_CHARS
    exemplar = prompts.zero_shot(typical) + " " + "x" * TYPICAL_TARGET_CHARS + "\n\n"
    return CellData([typical] * d.train, [typical] * d.test, TYPICAL_TARGET_CHARS, exemplar * d.shots)


def _tokens(text_chars: float) -> int:
    return max(1, math.ceil(text_chars / CHARS_PER_TOKEN))


def _resolve(the_plan: planning.Plan) -> tuple[dict[str, cards.Model | None], list[str]]:
    """Each model spec resolved where its file is on disk; the lines saying which are not."""
    models: dict[str, cards.Model | None] = {}
    missing = []
    for cell in the_plan.cells:
        for role in ("student", "teacher"):
            spec = cell.recipe["models"][role]
            if spec in models:
                continue
            try:
                models[spec] = cards.resolve(spec)
            except KmmError as exc:
                models[spec] = None
                missing.append(str(exc))
    return models, missing


def _own_timings(out: Path, stages: list[planning.Stage], models: dict[str, str | None]) -> dict[tuple, list]:
    """Seconds per answer or per training token of the run folder's finished stages, with the
    threads each ran on, by (kind, model, few-shot); and the share of its planned steps each
    early-stopped fine-tune ran."""
    rates: dict[tuple, list[float]] = {}
    for st in stages:
        folder, load = out / st.folder, st.record.load
        if not load or not (folder / "stage.json").is_file():
            continue
        record = json.loads((folder / "stage.json").read_text(encoding="utf-8"))
        if not record.get("seconds"):
            continue
        seconds, threads = record["seconds"], record.get("threads") or 1
        if load["kind"] == "answer" and (folder / "samples.jsonl").is_file():
            n = sum(1 for line in (folder / "samples.jsonl").open(encoding="utf-8") if line.strip())
            if n:
                rates.setdefault(("answer", models[st.folder], load["few_shot"]), []).append((seconds / n, threads))
        elif load["kind"] == "finetune" and (folder / "adapter" / "kmm_finetune.json").is_file():
            info = json.loads((folder / "adapter" / "kmm_finetune.json").read_text(encoding="utf-8"))
            if info.get("tokens"):
                rates.setdefault(("finetune", models[st.folder], None), []).append((seconds / info["tokens"], threads))
            share = _share_run(info)
            if share is not None:
                rates.setdefault(("early stop", models[st.folder], None), []).append(share)
    return rates


def _own_rate(measured: list[tuple[float, int]], threads: int) -> float:
    """The median rate of the finished stages that ran on `threads` threads, else of all of them
    scaled to `threads` as the reference costs are (in proportion; rough)."""
    same = [rate for rate, t in measured if t == threads]
    return statistics.median(same) if same else statistics.median(rate * t for rate, t in measured) / threads


def _share_run(info: dict) -> float | None:
    """The share of its planned steps a finished fine-tune with an early stop ran, from its record."""
    settings = info.get("settings") or {}
    try:
        if not settings.get("patience") or not info.get("steps"):
            return None
        train = info["examples"] - n_dev(info["examples"], settings["dev_fraction"])
        planned = settings["epochs"] * n_batches(train, settings["batch_size"])
    except (KeyError, TypeError):
        return None
    return min(1.0, info["steps"] / planned) if planned else None


def plan_run(recipe: dict, out: Path, *, jobs: int = 1, threads: int | None = None) -> dict:
    """The dry-run of `recipe` into `out`: {"stages": [StagePlan], "cells", "missing", "threads",
    "jobs"}. Reads, never writes."""
    the_plan = planning.build(recipe)
    if jobs > 1 and not threads:
        threads = parallel.threads_for(jobs)
    per_stage_threads = threads or (os.cpu_count() or 1)
    models, missing = _resolve(the_plan)
    keys = {spec: model_key(m) for spec, m in models.items() if m is not None}
    sizes = {spec: _sizes(spec, m) for spec, m in models.items()}
    cells = {st.folder: c for c in the_plan.cells for st in c.stages.values()}
    model_of = {st.folder: c.recipe["models"][st.record.load["role"]] if "role" in st.record.load else None
                for c in the_plan.cells for st in c.stages.values()}
    distinct = the_plan.stages()
    rates = _own_timings(out, distinct, model_of)
    data: dict[str, CellData] = {}
    status: dict[str, tuple[str, str | None]] = {}  # folder -> (status, key)
    with parallel.thread_setting(threads):
        for cell in the_plan.cells:
            data[cell.folder] = _cell_data(cell, out)
            done: dict[str, tuple[Path, str]] = {}
            roles = {r: cell.recipe["models"][r] for r in ("student", "teacher")}
            for name in own_stages(cell):
                folder = cell.stages[name].folder
                if folder not in status:   # a stage cells share is decided once
                    status[folder] = _status(out, cell, name, roles, models, keys, done)
                state, key = status[folder]
                if state == "reuse":
                    done[name] = (out / folder, key)
    plans = []
    for st in distinct:
        cell = cells[st.folder]
        spec = model_of[st.folder]
        plans.append(_estimate(st, cell, status[st.folder][0], data[cell.folder], models.get(spec),
                               sizes.get(spec, (None, None)), spec, rates, per_stage_threads))
    return {"stages": plans, "cells": len(the_plan.cells), "missing": missing, "threads": per_stage_threads,
            "jobs": jobs}


def _status(out: Path, cell: planning.Cell, name: str, roles: dict, models: dict, keys: dict,
            done: dict) -> tuple[str, str | None]:
    """Whether a stage would run or be reused, as the runner would decide it."""
    st = cell.stages[name]
    marker = out / st.folder / "stage.json"
    if not marker.is_file() or any(n not in done for n in st.record.needs):
        return "run", None
    if any(models[spec] is None for spec in roles.values()):
        return "run", None
    role_models = {r: models[s] for r, s in roles.items()}
    role_keys = {r: keys[s] for r, s in roles.items()}
    ctx = stage_context(out, cell, name, role_models, role_keys, done)
    if ctx is None:
        return "skip", None
    key = key_of(st.record.inputs(ctx))
    return ("reuse", key) if json.loads(marker.read_text(encoding="utf-8")).get("key") == key else ("run", None)


def _estimate(st: planning.Stage, cell: planning.Cell, status: str, d: CellData, model: cards.Model | None,
              sizes: tuple[float | None, float | None], spec: str | None, rates: dict, threads: int) -> StagePlan:
    group = st.name.split("/", 1)[0]
    load = st.record.load
    p = StagePlan(st.folder, group, spec, load.get("role"), status)
    if not load:
        p.seconds, p.timed_from = 1.0, "reference"  # the split, the sets: a second or so
    params, gguf = sizes
    scale = (params / REFERENCE_PARAMS if params else None)
    thread_scale = REFERENCE_THREADS / max(1, threads)
    if load.get("kind") == "answer":
        questions = d.train if load["split"] == "train" else d.test
        prefix = len(d.prefix) if load["few_shot"] else 0
        p.answers = len(questions)
        own = sum(_tokens(len(prompts.zero_shot(q))) for q in questions)
        p.prompt_tokens = own + (_tokens(prefix) * len(questions))
        p.answer_tokens = len(questions) * prompts.MAX_TOKENS
        section = cell.settings.generate if group == "generate" else cell.settings.evaluate
        no_reference = (model is not None and model.served) or section.backend != "llamacpp"
        measured = rates.get(("answer", spec, load["few_shot"]))
        if measured:
            p.seconds, p.timed_from = _own_rate(measured, threads) * p.answers, "run folder"
        elif scale and not no_reference:
            expected = FEW_SHOT_ANSWER_TOKENS if load["few_shot"] else prompts.MAX_TOKENS
            p.seconds = (own + expected * p.answers) * SECONDS_PER_ANSWER_TOKEN * scale * thread_scale
            p.timed_from = "reference"
        p.memory_gb = None if no_reference or gguf is None else gguf + LLAMACPP_BASE_GB
    elif load.get("kind") == "finetune":
        lora, backend = cell.settings.finetune.lora, cell.settings.finetune.backend
        examples = len(d.train)
        train = examples - n_dev(examples, lora.dev_fraction)
        prompt_chars = statistics.fmean(len(prompts.zero_shot(q)) for q in d.train) if d.train else 0
        per_example = min(lora.max_length, _tokens(prompt_chars + 1 + d.target_chars))
        p.steps = lora.epochs * n_batches(train, lora.batch_size)
        p.train_tokens = lora.epochs * train * per_example
        measured = rates.get(("finetune", spec, None))
        if measured:
            p.seconds, p.timed_from = _own_rate(measured, threads) * p.train_tokens, "run folder"
        elif scale and backend == "torch":
            p.seconds = FINETUNE_FIXED_SECONDS + p.train_tokens * SECONDS_PER_TRAIN_TOKEN * scale * thread_scale
            p.timed_from = "reference"
        if params and backend == "torch":
            p.memory_gb = TORCH_BASE_GB + params * TORCH_GB_PER_PARAM
        p.early_stop = lora.patience > 0 and lora.epochs > 1
        shares = rates.get(("early stop", spec, None))
        if p.early_stop and shares and p.seconds is not None:
            p.likely_seconds = p.seconds * statistics.median(shares)
    if status == "reuse":
        p.seconds = p.likely_seconds = 0.0
    return p


# --- the printout ---

COLUMNS = ["stage", "model", "to run", "answers", "tokens", "steps", "time", "memory"]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def rows(result: dict) -> list[list[str]]:
    """One row per stage group and model: stages to run of all, answers, prompt + answer tokens
    and training steps of the stages to run, their estimated time and the largest peak memory."""
    groups: dict[tuple, list[StagePlan]] = {}
    for p in result["stages"]:
        groups.setdefault((p.group, p.role, p.model), []).append(p)
    several = {role for role in ("student", "teacher")
               if len({m for _, r, m in groups if r == role}) > 1}
    out = []
    for (group, role, model), ps in groups.items():
        todo = [p for p in ps if p.status == "run"]
        answers = sum(p.answers for p in todo)
        tokens = sum(p.prompt_tokens + p.answer_tokens for p in todo) + sum(p.train_tokens for p in todo)
        steps = sum(p.steps for p in todo)
        seconds = None if any(p.seconds is None for p in todo) else sum(p.seconds for p in todo)
        memory = [p.memory_gb for p in ps if p.memory_gb is not None]
        who = "-" if role is None else f"{role} {model}" if role in several else role
        out.append([group, who, f"{len(todo)} of {len(ps)}", f"{answers:,}" if answers else "-",
                    f"{tokens:,}" if tokens else "-", f"{steps:,}" if steps else "-",
                    _duration(seconds) if todo else "-", f"{max(memory):.1f} GB" if memory else "-"])
    return out


def summary(result: dict) -> list[str]:
    """The totals and what the estimates rest on, a line each."""
    todo = [p for p in result["stages"] if p.status == "run"]
    reused = sum(p.status == "reuse" for p in result["stages"])
    skipped = sum(p.status == "skip" for p in result["stages"])
    known = [p.seconds for p in todo if p.seconds is not None]
    unknown = len(todo) - len(known)
    jobs = result["jobs"]
    total = sum(known)
    early = [p for p in todo if p.early_stop]
    lines = [f"{result['cells']} cell{'s' if result['cells'] != 1 else ''}, {len(result['stages'])} stages: "
             f"{len(todo)} to run, {reused} to reuse" + (f", {skipped} without input" if skipped else "") + ".",
             f"To run: {sum(p.answers for p in todo):,} answers ({sum(p.prompt_tokens for p in todo):,} prompt tokens, "
             f"at most {sum(p.answer_tokens for p in todo):,} answer tokens); {'at most ' if early else ''}"
             f"{sum(p.steps for p in todo):,} training steps ({sum(p.train_tokens for p in todo):,} tokens)."]
    if todo:
        spread = f", about {_duration(total / jobs)} at --jobs {jobs}" if jobs > 1 else ""
        lines.append(f"Estimated time: {'at most ' if early else ''}{_duration(total)} one stage at a time{spread} "
                     f"({result['threads']} thread{'s' if result['threads'] != 1 else ''} a stage)"
                     + (f"; {unknown} stage{'s' if unknown != 1 else ''} without an estimate (no reference for "
                        "its backend here)" if unknown else "") + ".")
        if early:
            likely = [p for p in early if p.likely_seconds is not None]  # set only beside a time
            lines.append("The fine-tunes are counted to their last epoch; an early stop (patience) can end them sooner"
                         + (f": about {_duration(total - sum(p.seconds - p.likely_seconds for p in likely))} one "
                            "stage at a time if they stop as early as this run folder's finished ones"
                            if len(likely) == len(early) else "") + ".")
        sources = sorted({p.timed_from for p in todo if p.seconds is not None})
        said = {"run folder": "this run folder's finished stages",
                "reference": "llama.cpp and torch costs measured on a 2-core x86-64 VM's CPU, scaled by model "
                             "size and threads (rough; on a GPU far less)"}
        if sources:
            lines.append("Times from " + " and ".join(said[s] for s in sources) + ".")
    memory = [p.memory_gb for p in todo if p.memory_gb is not None]
    if memory:
        top = sorted(memory, reverse=True)[:jobs]
        lines.append(f"Peak memory: about {max(memory):.1f} GB one stage at a time"
                     + (f", up to {sum(top):.1f} GB with {jobs} at once" if jobs > 1 else "")
                     + " (rough; not a GPU's memory).")
    lines.extend(f"Not on disk: {m}" for m in result["missing"])
    return lines
