"""What a design is made of: its stage records, its per-cell result, its pooling over seeds, its
tables and its figure; and the two contexts the runner hands it (one stage's, one finished cell's).

A stage record is the one place a stage is declared: the plan reads its settings and needs to
name its folder, the runner reads its key inputs and its work. Both run from the same record, so
a stage cannot be declared twice or drift between the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kmismatch_lite.designs.report_parts import Table
from kmismatch_lite.io import read_jsonl
from kmismatch_lite.settings import CellSettings


@dataclass
class StageContext:
    """What one stage of one cell sees: the cell's settings and models, and the folder and key of
    each stage it needs."""

    settings: CellSettings
    models: dict
    model_keys: dict[str, Any]
    out: Path
    folder: str
    needs: dict[str, tuple[Path, str]]
    progress_factory: Any = None

    def path(self, need: str, name: str) -> Path:
        return self.needs[need][0] / name

    def key(self, need: str) -> str:
        return self.needs[need][1]

    def rows(self, need: str, name: str) -> list[dict]:
        return read_jsonl(self.path(need, name))


@dataclass(frozen=True)
class StageRecord:
    """One stage: its name, the recipe settings it reads and the stages it needs (for the plan),
    the inputs of its key and its work (for the runner). `present` is False for a stage whose
    input its needs did not produce (an epoch a dev split's patience stopped before). `load` says
    what it computes, for a plan made before a run (dry_run.py): {"kind": "answer", "role",
    "split", "few_shot"} or {"kind": "finetune", "role", "set"}; empty for the quick stages."""

    name: str
    settings: tuple[str, ...]
    needs: tuple[str, ...]
    inputs: Callable[[StageContext], dict]
    work: Callable[[StageContext, Path], None]
    present: Callable[[StageContext], bool] | None = None
    load: dict = field(default_factory=dict)


@dataclass
class CellContext:
    """A cell whose stages are done: their folders, the evaluated conditions' scored answers, and
    what the units add for the cell folder (more samples files, JSON files, hand-in fields)."""

    settings: CellSettings
    models: dict
    stages: list[str]
    folders: dict[str, Path]
    evaluated: dict[str, tuple[list[dict], dict]] = field(default_factory=dict)
    samples: dict[str, list[dict]] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)

    def json(self, stage: str, name: str) -> Any:
        return json.loads((self.folders[stage] / name).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Unit:
    """A design of the protocol, whole. `key` names its entry in a cell's results (None: its
    entries sit at the top, as the paper's comparison does). Every function takes the cell's
    settings or the unit's own section."""

    key: str | None
    enabled: Callable[[CellSettings], bool]
    # (the cell's settings, the stage records of the units before it) -> its own stage records
    stages: Callable[[CellSettings, list[StageRecord]], list[StageRecord]]
    cell: Callable[[CellContext], dict]
    conditions: Callable[[CellSettings], dict[str, str]] = lambda s: {}
    aliases: Callable[[CellSettings], dict[str, str]] = lambda s: {}
    pooled: Callable[[Path, list[dict], int], dict] | None = None
    table: Callable[[dict], Table] | None = None
    note: str = ""
    panel: Callable[[Any, dict], None] | None = None
    panel_size: tuple[float, float] = (6.5, 4)  # inches, one section's panel
    files: tuple[str, ...] = ()
    manifest: Callable[[CellSettings, list[int]], dict] = lambda s, seeds: {}


def answered(folder: Path) -> tuple[list[dict], dict]:
    """An answering stage's output: its scored samples and its metrics."""
    return read_jsonl(folder / "samples.jsonl"), json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
