"""The plan of a run: its cells (one per seed and grid point) and the stages each cell needs.

`build(recipe)` is data in, data out: it reads no file and runs no model, so a test can print a
plan and see which stages cells share before anything runs. A stage's folder names exactly what
it depends on: its seed and the grid settings it reads (directly or through the stages it reads
from). Cells that agree on those share the stage, so it is computed once.

Layout: a recipe with one `seed` and no `[sweep]` keeps the flat layout (`data/`, `generate/...`,
results beside them). With `seeds` or a `[sweep]`, stages go under `seed-N/`, then under
`KEY=VALUE,...` for the grid settings they depend on; each cell's results sit in
`seed-N[/KEY=VALUE,...]/`, and the pooled results at the top of the run folder.

A cell's stages are the stage records of the designs its recipe runs (designs/): the paper's
comparison always, then the mismatch dose, knowledge categories and training length where the
recipe's `[design]` asks; dose 0 names the self stages. The plan reads each record's settings and
needs; the runner, the same record's key inputs and work.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from kmismatch_lite import designs, settings
from kmismatch_lite.designs.unit import StageRecord
from kmismatch_lite.settings import CellSettings

@dataclass(frozen=True)
class Stage:
    """One stage of one cell: where it is written, the folders of the stages it reads, and its
    record (the settings it reads, its key inputs and its work)."""

    name: str
    folder: str
    needs: dict[str, str]
    record: StageRecord | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Cell:
    """One seed at one grid point: its own resolved recipe (as a dict and typed) and the stages it needs."""

    seed: int
    point: dict[str, Any]
    folder: str
    recipe: dict
    stages: dict[str, Stage]
    settings: CellSettings | None = field(default=None, compare=False, repr=False)

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


def stage_table(cell_recipe: dict) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Every stage a cell runs, as (settings it reads, stages it needs), in running order."""
    return {name: (r.settings, r.needs) for name, r in designs.stage_records(settings.of(cell_recipe)).items()}


def _stages(records: dict[str, StageRecord], seed: int, point: dict[str, Any], multi: bool) -> dict[str, Stage]:
    depends: dict[str, list[str]] = {}
    stages: dict[str, Stage] = {}
    for name, record in records.items():
        settings, needs = record.settings, record.needs
        keys = {k for k in point if any(_reads(s, k) for s in settings)}
        keys.update(*(depends[n] for n in needs))
        depends[name] = sorted(keys, key=list(point).index)
        parts = [f"seed-{seed}", ",".join(_name(k, point[k]) for k in depends[name])] if multi else []
        folder = "/".join([p for p in parts if p] + [name])
        stages[name] = Stage(name, folder, {n: stages[n].folder for n in needs}, record)
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
            typed = settings.of(cell_recipe)
            stages = _stages(designs.stage_records(typed), seed, point, multi)
            stages.update({alias: stages[target] for alias, target in designs.aliases(typed).items()})
            plan.cells.append(Cell(seed, point, folder, cell_recipe, stages, typed))
    return plan
