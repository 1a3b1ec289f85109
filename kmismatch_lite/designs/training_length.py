"""Training length (protocol step 11), whole: every fine-tuned condition's LoRA as saved at the
end of each epoch answers the test questions (one stage each), and the rates against epoch
(epoch_curve.py), per cell and pooled over seeds; its table and epochs.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import kmismatch_lite.designs.epoch_curve as epoch_curve
from kmismatch_lite.designs.stages import answer_stage, zero_shot
from kmismatch_lite.designs.unit import CellContext, StageContext, StageRecord, Unit, answered
from kmismatch_lite.designs.epoch_curve import epoch_condition
from kmismatch_lite.settings import CellSettings
from kmismatch_lite.lora_data import epoch_dir


def evaluations(s: CellSettings, finetuned: list[str]) -> list[tuple[str, int]]:
    """(condition, epoch) of every saved epoch's evaluation. The last epoch's LoRA is the
    condition's own adapter, evaluated already; with a dev split the adapter kept is the best
    epoch's, so every epoch gets its own evaluation."""
    lora = s.finetune.lora
    last = lora.epochs if lora.dev_fraction > 0 else lora.epochs - 1
    return [(cond, n) for cond in finetuned for n in range(1, last + 1)]


def _finetuned(stage_names: Iterable[str]) -> list[str]:
    """The conditions with a fine-tune of their own, from a cell's stage names."""
    return [n.split("/", 1)[1] for n in stage_names if n.startswith("finetune/")]


def _epoch_adapter(cond: str, epoch: int):
    def adapter(ctx: StageContext) -> tuple[Path, str]:
        folder, key = ctx.needs[f"finetune/{cond}"]
        return epoch_dir(folder, epoch) / "adapter.gguf", f"{key}/epoch-{epoch}"
    return adapter


def stages(s: CellSettings, earlier: list[StageRecord]) -> list[StageRecord]:
    out = []
    for cond, epoch in evaluations(s, _finetuned(r.name for r in earlier)):
        adapter = _epoch_adapter(cond, epoch)
        # An epoch a dev split's patience stopped before has no adapter, so no stage.
        out.append(answer_stage(f"evaluate/{epoch_condition(cond, epoch)}", "student", "test", zero_shot,
                                adapter=adapter, adapter_need=f"finetune/{cond}",
                                present=lambda ctx, adapter=adapter: adapter(ctx)[0].is_file()))
    return out


def cell(ctx: CellContext) -> dict:
    """Each fine-tuned condition's saved epochs' answers, and the epoch its own adapter is."""
    finetuned = _finetuned(ctx.stages)
    evaluated: dict[str, dict] = {}
    for cond, epoch in evaluations(ctx.settings, finetuned):
        folder = ctx.folders.get(f"evaluate/{epoch_condition(cond, epoch)}")
        if folder is not None:
            evaluated.setdefault(cond, {})[epoch] = answered(folder)
            ctx.samples[epoch_condition(cond, epoch)] = evaluated[cond][epoch][0]
    kept, dev_losses = {}, {}
    for cond in finetuned:
        info = json.loads((ctx.folders[f"finetune/{cond}"] / "adapter" / "kmm_finetune.json").read_text(encoding="utf-8"))
        kept[cond] = info.get("best_epoch", info["settings"]["epochs"])
        dev_losses[cond] = {r["epoch"]: r["dev_loss"] for r in info.get("dev_log", [])}
    return epoch_curve.cell_section(dict(ctx.settings.raw), ctx.evaluated, (evaluated, kept), dev_losses)


NOTE = ("Each fine-tuned condition's LoRA as saved at the end of every epoch answers the test questions "
        "(zero-shot). Counts are means over seeds (each seed's wrong answers in brackets); rates are over "
        "the test questions, with 95% intervals; the dev loss is the dev split's loss after that epoch "
        "(mean over seeds; - without a dev split). A dose-0 condition is the self one.")

UNIT = Unit(
    key="epochs",
    enabled=lambda s: s.design.epochs,
    stages=stages,
    cell=cell,
    pooled=lambda out, cells, n_boot: epoch_curve.pooled(out, cells, n_boot),
    table=lambda section: ("Training length: wrong answers against epoch", epoch_curve.COLUMNS,
                           epoch_curve.rows(section), epoch_curve.text(section)),
    note=NOTE,
    panel=epoch_curve.panel,
    panel_size=(6.5, 6.5),
)
