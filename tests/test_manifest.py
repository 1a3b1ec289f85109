"""The run's manifest tells the truth about every cell: its own resolved fine-tune settings (the
LoRA seed is the cell's seed; `[design] epochs` saves every epoch), the data it was built from and
the machine. Built from the real bundled model cards, without running a model."""

from __future__ import annotations

import os

import pytest

from kmismatch_lite import cards, plan, recipes, run


def _manifest(*settings: str) -> dict:
    recipe = recipes.load("smoke", list(settings))
    try:
        models = {role: cards.resolve(recipe["models"][role]) for role in ("student", "teacher")}
    except Exception as exc:  # the bundled models come with the models extra
        pytest.skip(f"bundled models unavailable: {exc}")
    return run.manifest(recipe, models, plan.build(recipe))


def test_each_cell_records_its_own_lora_seed_and_saved_epochs():
    man = _manifest("seeds=0,3,7", "finetune.lora.epochs=2", "design.epochs=true")
    assert "lora_settings" not in man
    assert [c["seed"] for c in man["cells"]] == [0, 3, 7]
    for cell in man["cells"]:
        assert cell["lora_settings"]["seed"] == cell["seed"]
        assert cell["lora_settings"]["save_epochs"] is True and cell["lora_settings"]["epochs"] == 2


def test_a_lora_seed_set_in_the_recipe_is_every_cells():
    man = _manifest("seeds=1,2", "finetune.lora.seed=11")
    assert [c["lora_settings"]["seed"] for c in man["cells"]] == [11, 11]


def test_a_single_seed_run_records_its_resolved_settings_data_and_machine():
    man = _manifest("seed=5")
    assert man["lora_settings"]["seed"] == 5 and man["lora_settings"]["save_epochs"] is False
    assert man["data"]["spec"] == "geonames:cities=100" and len(man["data"]["sha256"]) == 64
    assert man["data"] == _manifest("seed=6")["data"]
    assert man["machine"]["cpus"] == os.cpu_count() and man["packages"]["kmismatch_lite"]
