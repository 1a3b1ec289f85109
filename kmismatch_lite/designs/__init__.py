"""The designs of the protocol, one unit each (unit.py): the paper's teacher-vs-self comparison
(paper.py), the mismatch dose (mismatch_dose.py), knowledge categories (knowledge_categories.py)
and training length (training_length.py). The plan, the runner and the report loop over UNITS and
never name one: a new design is one module, one line in UNITS, and its tests."""

from __future__ import annotations

from pathlib import Path

from kmismatch_lite.designs import knowledge_categories, mismatch_dose, paper, training_length
from kmismatch_lite.designs.unit import CellContext, StageRecord, Unit, answered
from kmismatch_lite.settings import CellSettings

UNITS: tuple[Unit, ...] = (paper.UNIT, mismatch_dose.UNIT, knowledge_categories.UNIT, training_length.UNIT)
# Where the evaluated conditions sit in a cell's tables: the base student first, the base teacher last.
_CONDITION_RANK = {"base_student": 0, "base_teacher": 2}


def active(s: CellSettings) -> list[Unit]:
    """The units a cell runs (the paper's always)."""
    return [u for u in UNITS if u.enabled(s)]


def stage_records(s: CellSettings) -> dict[str, StageRecord]:
    """Every stage a cell runs, by name, in running order: each unit's after those of
    the units before it."""
    records: list[StageRecord] = []
    for unit in active(s):
        records += unit.stages(s, list(records))
    out: dict[str, StageRecord] = {}
    for r in records:
        if r.name in out:
            raise RuntimeError(f"stage {r.name} is declared twice")
        out[r.name] = r
    return out


def aliases(s: CellSettings) -> dict[str, str]:
    """Stage names that are another stage of the cell (dose 0 is the self set's stages)."""
    out: dict[str, str] = {}
    for unit in active(s):
        out.update(unit.aliases(s))
    return out


def conditions(s: CellSettings) -> dict[str, str]:
    """Every evaluated condition of a cell and the stage whose answers it is."""
    merged: dict[str, str] = {}
    for unit in active(s):
        merged.update(unit.conditions(s))
    return dict(sorted(merged.items(), key=lambda kv: _CONDITION_RANK.get(kv[0], 1)))


def cell_results(ctx: CellContext) -> dict:
    """A finished cell's results: each unit's section (the paper's at the top); the units also
    fill `ctx.samples` and `ctx.files`."""
    ctx.evaluated = {cond: answered(ctx.folders[stage]) for cond, stage in conditions(ctx.settings).items()}
    res: dict = {}
    for unit in active(ctx.settings):
        section = unit.cell(ctx)
        if unit.key is None:
            res.update(section)
        else:
            res[unit.key] = section
    return res


def pooled(out: Path, cells: list[dict], n_boot: int) -> dict:
    """One grid point's sections pooled over its seeds' cells (their results and samples files)."""
    res: dict = {}
    for unit in UNITS:
        if unit.pooled is None:
            continue
        if unit.key is None:
            res.update(unit.pooled(out, cells, n_boot))
        elif unit.key in cells[0]:
            res[unit.key] = unit.pooled(out, cells, n_boot)
    return res


def reported(section: dict) -> list[Unit]:
    """The units with a table whose section `section` (a cell's results or a pooled point) holds."""
    return [u for u in UNITS if u.key is not None and u.table is not None and u.key in section]


def manifest(s: CellSettings, seeds: list[int]) -> dict:
    """What the units add to a run's manifest (SliCK's sampling)."""
    out: dict = {}
    for unit in active(s):
        out.update(unit.manifest(s, seeds))
    return out


def stale_files(s: CellSettings) -> list[str]:
    """Files a cell folder must not keep from an earlier run: those of the units this cell leaves off."""
    on = active(s)
    return [f for u in UNITS if u not in on for f in u.files]
