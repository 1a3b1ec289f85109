"""The plan of a run, checked without running a model: its cells, and which stages they share."""

from collections import Counter

import pytest

from kmismatch_lite import plan, recipes


PAPER = ["data", "generate/teacher", "generate/student", "sets", "finetune/self", "finetune/teacher",
         "evaluate/base_student", "evaluate/self", "evaluate/teacher", "evaluate/base_teacher"]


def build(*settings):
    return plan.build(recipes.load("smoke", list(settings)))


def by_name(p: plan.Plan) -> Counter:
    return Counter(s.name for s in p.stages())


def test_single_seed_keeps_the_flat_layout():
    p = build()
    assert not p.multi and len(p.cells) == 1
    cell = p.cells[0]
    assert cell.folder == "" and cell.seed == 0 and cell.point == {}
    assert [s.folder for s in p.stages()] == list(PAPER)
    assert cell.stages["evaluate/self"].needs == {"data": "data", "finetune/self": "finetune/self"}


def test_seeds_give_one_cell_and_one_set_of_stages_per_seed():
    p = build("seeds=0,1,2")
    assert p.multi and [c.seed for c in p.cells] == [0, 1, 2]
    assert [c.folder for c in p.cells] == ["seed-0", "seed-1", "seed-2"]
    assert [c.recipe["seed"] for c in p.cells] == [0, 1, 2]
    assert all("seeds" not in c.recipe and "sweep" not in c.recipe for c in p.cells)
    assert set(by_name(p).values()) == {3}
    assert p.cells[1].stages["sets"].folder == "seed-1/sets"


def test_a_finetune_sweep_shares_data_generation_and_sets_within_a_seed():
    p = build("seeds=0,1", "sweep.finetune.lora.epochs=1,2,4")
    assert len(p.cells) == 6
    assert [c.point for c in p.cells[:3]] == [{"finetune.lora.epochs": e} for e in (1, 2, 4)]
    assert [c.recipe["finetune"]["lora"]["epochs"] for c in p.cells[:3]] == [1, 2, 4]
    counts = by_name(p)
    # data, generation, sets and the base models' evaluation: once per seed, not once per cell
    for name in ("data", "generate/teacher", "generate/student", "sets", "evaluate/base_student",
                 "evaluate/base_teacher"):
        assert counts[name] == 2, name
    for name in ("finetune/self", "finetune/teacher", "evaluate/self", "evaluate/teacher"):
        assert counts[name] == 6, name
    first = p.cells[0].stages
    assert first["finetune/self"].folder == "seed-0/finetune.lora.epochs=1/finetune/self"
    assert first["generate/student"].folder == "seed-0/generate/student"
    assert p.cells[0].folder == "seed-0/finetune.lora.epochs=1"


def test_a_data_sweep_reaches_every_stage_downstream_of_the_data():
    p = build("sweep.data.test=8,16")
    assert p.multi and p.seeds == [0]
    counts = by_name(p)
    assert set(counts.values()) == {2}
    assert p.cells[1].stages["finetune/self"].folder == "seed-0/data.test=16/finetune/self"


def test_a_teacher_sweep_leaves_the_student_generation_shared():
    p = plan.build({**recipes.load("smoke", ["seeds=0"]),
                    "sweep": {"models.teacher": ["gemma-3-270m", "smollm2-135m-instruct"]}})
    counts = by_name(p)
    assert counts["generate/student"] == 1 and counts["evaluate/base_student"] == 1
    assert counts["generate/teacher"] == 2 and counts["evaluate/base_teacher"] == 2
    # the teacher's set changes, so both fine-tunes (through the sets) do too
    assert counts["sets"] == 2 and counts["finetune/self"] == 2


def test_a_report_only_sweep_shares_every_stage():
    p = build("seeds=0", "sweep.report.bootstrap=100,200")
    assert len(p.cells) == 2 and len(p.stages()) == len(PAPER)
    assert [c.recipe["report"]["bootstrap"] for c in p.cells] == [100, 200]


def test_same_folder_means_same_inputs():
    # Two cells sharing a stage folder must agree on every setting the stage reads.
    p = build("seeds=0,1", "sweep.finetune.lora.rank=4,8", "sweep.evaluate.backend=llamacpp,openai")
    seen = {}
    for cell in p.cells:
        for stage in cell.stages.values():
            reads = stage.record.settings
            values = (cell.seed, *(repr(_get(cell.recipe, k)) for k in reads), tuple(stage.needs.values()))
            assert seen.setdefault(stage.folder, values) == values, stage.folder


def _get(recipe, key):
    node = recipe
    for part in key.split("."):
        node = node[part]
    return node


def test_folder_names_quote_values_that_are_paths():
    p = plan.build({**recipes.load("smoke"), "sweep": {"data.dataset": ["jsonl:/tmp/a b.jsonl", "geonames"]}})
    assert p.cells[0].stages["data"].folder == "seed-0/data.dataset=jsonl%3A%2Ftmp%2Fa%20b.jsonl/data"


@pytest.mark.parametrize("settings", [(), ("seeds=3,1",), ("sweep.finetune.lora.rank=4,8",)])
def test_points_and_cells_at(settings):
    p = build(*settings)
    assert sum(len(p.cells_at(pt)) for pt in p.points()) == len(p.cells)


def test_the_runner_computes_a_shared_stage_once_and_reuses_it_on_rerun(tmp_path):
    from kmismatch_lite.run import Run

    p = build("seeds=0,1", "sweep.finetune.lora.rank=4,8")
    calls = []

    def run_all(run):
        for cell in p.cells:
            for stage in cell.stages.values():
                run.stage(stage, {"stage": stage.folder}, lambda tmp, f=stage.folder: calls.append(f))

    first = Run(tmp_path, log=lambda message: None)
    run_all(first)
    assert sorted(calls) == sorted(s.folder for s in p.stages()) and len(calls) == len(set(calls))
    assert first.ran == calls and first.reused == []
    again = Run(tmp_path, log=lambda message: None)
    run_all(again)
    assert len(calls) == len(p.stages()) and again.ran == [] and len(again.reused) == len(p.stages())
    with pytest.raises(RuntimeError, match="two sets of inputs"):
        again.stage(p.cells[0].stages["data"], {"stage": "something else"}, lambda tmp: None)


def test_grid_folder_names_are_valid_on_windows_too():
    p = build("sweep.data.dataset=geonames:cities=50,geonames:cities=60")
    forbidden = set('<>:"|?*\\')
    for stage in p.stages():
        for part in stage.folder.split("/"):
            assert not forbidden & set(part), part
    assert "seed-0/data.dataset=geonames%3Acities=50/data" in {s.folder for s in p.stages()}
