"""The plan of a run: its cells (one per seed and grid point) and the stages each cell needs.

`build(recipe)` is data in, data out: it reads no file and runs no model, so a test can print a
plan and see which stages cells share before anything runs. A stage's folder names exactly what
it depends on: its seed and the grid settings it reads (directly or through the stages it reads
from). Cells that agree on those share the stage, so it is computed once.

Layout: a recipe with one `seed` and no `[sweep]` keeps the flat layout (`data/`, `generate/...`,
results beside them). With `seeds` or a `[sweep]`, stages go under `seed-N/`, then under
`KEY=VALUE,...` for the grid settings they depend on; each cell's results sit in
`seed-N[/KEY=VALUE,...]/`, and the pooled results at the top of the run folder.

A recipe's `[design]` adds stages to every cell (`design_stages`): the mismatch-dose sets with a
fine-tune and an evaluation per dose (dose 0 is the self set, so it names the self stages), for
SliCK categories one greedy evaluation of the base student per extra few-shot prompt and one
sampled evaluation (the run's own prompt) per sample, and for training length (`epochs = true`)
one evaluation per fine-tuned condition and saved epoch.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from kmismatch_lite.dose import dose_name
from kmismatch_lite.finetune import LoraSettings

# stage -> (recipe settings it reads, stages whose outputs it reads), in running order
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "data": (("seed", "data"), ()),
    "generate/teacher": (("models.teacher", "generate"), ("data",)),
    "generate/student": (("models.student", "generate"), ("data",)),
    "sets": ((), ("generate/teacher", "generate/student")),
    "finetune/self": (("models.student", "finetune"), ("sets",)),
    "finetune/teacher": (("models.student", "finetune"), ("sets",)),
    "evaluate/base_student": (("models.student", "evaluate"), ("data",)),
    "evaluate/self": (("models.student", "evaluate"), ("data", "finetune/self")),
    "evaluate/teacher": (("models.student", "evaluate"), ("data", "finetune/teacher")),
    "evaluate/base_teacher": (("models.teacher", "evaluate"), ("data",)),
}


@dataclass(frozen=True)
class Stage:
    """One stage of one cell: where it is written and the folders of the stages it reads."""

    name: str
    folder: str
    needs: dict[str, str]


@dataclass(frozen=True)
class Cell:
    """One seed at one grid point: its own resolved recipe and the stages it needs."""

    seed: int
    point: dict[str, Any]
    folder: str
    recipe: dict
    stages: dict[str, Stage]

    @property
    def label(self) -> str:
        return ", ".join([f"seed {self.seed}"] + [f"{k}={v}" for k, v in self.point.items()])


@dataclass(frozen=True)
class Plan:
    """Every cell of a run; `multi` when the recipe names `seeds` or a `[sweep]`."""

    cells: list[Cell]
    seeds: list[int]
    grid: dict[str, list]
    multi: bool

    def stages(self) -> list[Stage]:
        """The distinct stages, each once, in the order the cells first need them."""
        seen: dict[str, Stage] = {}
        for cell in self.cells:
            for stage in cell.stages.values():
                seen.setdefault(stage.folder, stage)
        return list(seen.values())

    def points(self) -> list[dict[str, Any]]:
        """The grid points, in order ([{}] without a sweep)."""
        return [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())]

    def cells_at(self, point: dict[str, Any]) -> list[Cell]:
        return [c for c in self.cells if c.point == point]


def set_setting(recipe: dict, key: str, value: Any) -> None:
    """Set a dotted setting (`finetune.lora.epochs`) in a nested recipe dict."""
    *parents, leaf = key.split(".")
    node = recipe
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = copy.deepcopy(value)


def _reads(setting: str, key: str) -> bool:
    return key == setting or key.startswith(setting + ".")


def _name(key: str, value: Any) -> str:
    # Values can hold '/' (a file path), ':' (a data set spec; no folder name on Windows may) or
    # spaces; quoting keeps one folder per value, readable, on every system.
    return quote(f"{key}={value}", safe="=.,-_+@")


def design_stages(recipe: dict) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """The stages a recipe's `[design]` adds, in the form of STAGES. Dose 0 has none of its own:
    its set is the self set, so its fine-tune and evaluation are `finetune/self`, `evaluate/self`."""
    design = recipe.get("design") or {}
    out: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    if design.get("doses"):
        out["dose_sets"] = (("design.doses",), ("generate/teacher", "generate/student"))
    for d in (d for d in design.get("doses") or () if float(d) != 0.0):
        name = dose_name(float(d))
        out[f"finetune/{name}"] = (("models.student", "finetune"), ("dose_sets",))
        out[f"evaluate/{name}"] = (("models.student", "evaluate"), ("data", f"finetune/{name}"))
    if design.get("categories") == "slick":
        # Prompt 1 is the run's own: its greedy answers are evaluate/base_student's.
        for i in range(2, design["slick_prompts"] + 1):
            out[f"slick/prompt-{i}"] = (("models.student", "evaluate"), ("data",))
        for j in range(1, design["slick_samples"] + 1):
            out[f"slick/sample-{j}"] = (("models.student", "evaluate"), ("data",))
    for cond, epoch in epoch_evaluations(recipe):
        out[f"evaluate/{epoch_condition(cond, epoch)}"] = (("models.student", "evaluate"), ("data", f"finetune/{cond}"))
    return out


def finetuned_conditions(recipe: dict) -> list[str]:
    """The conditions with a fine-tune of their own: self, teacher and each dose but 0 (the self set)."""
    doses = (recipe.get("design") or {}).get("doses") or ()
    return ["self", "teacher"] + [dose_name(float(d)) for d in doses if float(d) != 0.0]


def epoch_evaluations(recipe: dict) -> list[tuple[str, int]]:
    """(condition, epoch) of every saved epoch's evaluation that `[design] epochs` adds. The last
    epoch's LoRA is the condition's own adapter, evaluated already; with a dev split the adapter
    kept is the best epoch's, so every epoch gets its own evaluation."""
    if not (recipe.get("design") or {}).get("epochs"):
        return []
    s = LoraSettings.from_dict(recipe["finetune"]["lora"])
    last = s.epochs if s.dev_fraction > 0 else s.epochs - 1
    return [(cond, n) for cond in finetuned_conditions(recipe) for n in range(1, last + 1)]


def epoch_condition(cond: str, epoch: int) -> str:
    """The name of a condition's evaluation at a saved epoch (its stage and samples file)."""
    return f"{cond}-epoch-{epoch}"


def stage_table(recipe: dict) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Every stage a cell of `recipe` runs: the protocol's, then its design's."""
    return {**STAGES, **design_stages(recipe)}


def _aliases(recipe: dict, stages: dict[str, Stage]) -> None:
    if any(float(d) == 0.0 for d in (recipe.get("design") or {}).get("doses") or ()):
        for kind in ("finetune", "evaluate"):
            stages[f"{kind}/{dose_name(0.0)}"] = stages[f"{kind}/self"]


def _stages(table: dict, seed: int, point: dict[str, Any], multi: bool) -> dict[str, Stage]:
    depends: dict[str, list[str]] = {}
    stages: dict[str, Stage] = {}
    for name, (settings, needs) in table.items():
        keys = {k for k in point if any(_reads(s, k) for s in settings)}
        keys.update(*(depends[n] for n in needs))
        depends[name] = sorted(keys, key=list(point).index)
        parts = [f"seed-{seed}", ",".join(_name(k, point[k]) for k in depends[name])] if multi else []
        folder = "/".join([p for p in parts if p] + [name])
        stages[name] = Stage(name, folder, {n: stages[n].folder for n in needs})
    return stages


def _cell_recipe(recipe: dict, seed: int, point: dict[str, Any]) -> dict:
    cell = {k: copy.deepcopy(v) for k, v in recipe.items() if k not in ("seeds", "sweep")}
    cell["seed"] = seed
    for key, value in point.items():
        set_setting(cell, key, value)
    return cell


def build(recipe: dict) -> Plan:
    """The plan of a resolved recipe: one cell per seed and grid point, seed by seed."""
    seeds = list(recipe.get("seeds") or [recipe["seed"]])
    grid = {k: list(v) for k, v in (recipe.get("sweep") or {}).items()}
    multi = "seeds" in recipe or bool(grid)
    plan = Plan([], seeds, grid, multi)
    for seed in seeds:
        for point in plan.points():
            folder = "/".join([f"seed-{seed}"] + ([",".join(_name(k, v) for k, v in point.items())]
                                                   if point else [])) if multi else ""
            cell_recipe = _cell_recipe(recipe, seed, point)
            stages = _stages(stage_table(cell_recipe), seed, point, multi)
            _aliases(cell_recipe, stages)
            plan.cells.append(Cell(seed, point, folder, cell_recipe, stages))
    return plan
