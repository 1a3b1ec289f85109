"""One stage of one cell, as every runner computes it: what the stage sees (its context, from its
record and the stages it needs) and its computation, once, under its own lock: reused where its
key matches, else computed into a temporary folder that replaces the stage's folder whole."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from kmismatch_lite import cards, plan as planning
from kmismatch_lite.backends import cpu_threads
from kmismatch_lite.designs.unit import StageContext
from kmismatch_lite.io import atomic_dir, sha256_file, sha256_text, stage_lock, write_json


def model_key(model: cards.Model) -> tuple:
    """What names a model in a stage's key: its name and its file's sha256 (its URL if served);
    sha256_file reads each file once per process."""
    return model.name, sha256_file(model.gguf_path) if model.gguf_path else model.url


def key_of(obj: Any) -> str:
    """A stage's key: sha256 over its inputs as canonical JSON."""
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))


def stage_once(out: Path, name: str, inputs: dict, work: Callable[[Path], None],
               log: Callable[[str], None] = print) -> tuple[Path, str, bool]:
    """Under the stage's lock: reuse folder `out/name` if its key matches `inputs`, else run
    `work(tmp_dir)` atomically. Returns (folder, key, whether it ran). Two workers or two runs
    that reach the same stage compute it once: the second waits, then reuses."""
    folder, key = out / name, key_of(inputs)
    with stage_lock(folder, on_wait=lambda: log(f"stage {name}: another run is computing it; waiting")):
        marker = folder / "stage.json"
        if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("key") == key:
            log(f"stage {name}: unchanged, reused")
            return folder, key, False
        log(f"stage {name}: running")
        t0 = time.perf_counter()
        with atomic_dir(folder) as tmp:
            work(tmp)
            write_json(tmp / "stage.json", {"key": key, "seconds": round(time.perf_counter() - t0, 3),
                                            "code": inputs.get("code"), "threads": cpu_threads()})
        return folder, key, True


def stage_context(out: Path, cell: planning.Cell, name: str, models: dict[str, cards.Model], keys: dict,
                  done: dict[str, tuple[Path, str]], progress_factory=None) -> StageContext | None:
    """What stage `name` of `cell` sees, or None where it does not run: a stage it needs did not
    run, or its record says its input is absent."""
    stage = cell.stages[name]
    if any(n not in done for n in stage.record.needs):
        return None
    ctx = StageContext(cell.settings, models, keys, out, stage.folder, {n: done[n] for n in stage.record.needs},
                       progress_factory)
    if stage.record.present is not None and not stage.record.present(ctx):
        return None
    return ctx


def own_stages(cell: planning.Cell) -> list[str]:
    """The cell's stages in running order, without the names that are another stage (aliases)."""
    return [name for name, stage in cell.stages.items() if stage.name == name]
