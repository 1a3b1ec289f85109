"""The plan of a run: its cells (one per seed and grid point) and the stages each cell needs.

`build(recipe)` is data in, data out: it reads no file and runs no model, so a test can print a
plan and see which stages cells share before anything runs. A stage's folder names exactly what
it depends on: its seed and the grid settings it reads (directly or through the stages it reads
from). Cells that agree on those share the stage, so it is computed once.

Layout: a recipe with one `seed` and no `[sweep]` keeps the flat layout (`data/`, `generate/...`,
results beside them). With `seeds` or a `[sweep]`, stages go under `seed-N/`, then under
`KEY=VALUE,...` for the grid settings they depend on; each cell's results sit in
`seed-N[/KEY=VALUE,...]/`, and the pooled results at the top of the run folder.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

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
    # Values can hold '/' (a file path) or spaces; quoting keeps one folder per value, readable.
    return quote(f"{key}={value}", safe="=:.,-_+@")


def _stages(seed: int, point: dict[str, Any], multi: bool) -> dict[str, Stage]:
    depends: dict[str, list[str]] = {}
    stages: dict[str, Stage] = {}
    for name, (settings, needs) in STAGES.items():
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
            plan.cells.append(Cell(seed, point, folder, _cell_recipe(recipe, seed, point),
                                   _stages(seed, point, multi)))
    return plan
