"""The smoke recipe over several seeds and a small grid, end to end on the real bundled models:
stages shared within a seed, every stage reused on rerun, a seed added later computes only its
own stages, and a single-seed run of the same setting gives the same verdicts as its cell."""

import json
import re

import pytest

from conftest import run_kmm

pytestmark = [pytest.mark.integration, pytest.mark.slow]

pytest.importorskip("llama_cpp", reason="needs the llamacpp extra")
pytest.importorskip("peft", reason="needs the torch extra")
pytest.importorskip("statsmodels", reason="needs the stats extra")

# Smaller than smoke's own sizes: this runs three seeds, each at two grid points.
SIZES = ("-s", "data.train=12", "-s", "data.test=8")
GRID = ("-s", "sweep.finetune.lora.rank=4,8")


def kmm_run(out, *settings):
    proc = run_kmm("run", "smoke", "--out", str(out), *SIZES, *GRID, *settings, cwd=out.parent, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def running(proc) -> list[str]:
    return re.findall(r"stage (\S+): running", proc.stderr)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds") / "run"
    return out, kmm_run(out, "-s", "seeds=0,1")


def test_each_stage_runs_once_however_many_cells_need_it(two_seeds):
    out, proc = two_seeds
    ran = running(proc)
    assert len(ran) == len(set(ran))
    for seed in (0, 1):
        for stage in ("data", "generate/teacher", "generate/student", "sets", "evaluate/base_student",
                      "evaluate/base_teacher"):
            assert f"seed-{seed}/{stage}" in ran
        for rank in (4, 8):
            for stage in ("finetune/self", "finetune/teacher", "evaluate/self", "evaluate/teacher"):
                assert f"seed-{seed}/finetune.lora.rank={rank}/{stage}" in ran
    assert len(ran) == 2 * 6 + 2 * 2 * 4


def test_results_report_and_forest_plot(two_seeds, tmp_path):
    out, proc = two_seeds
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1] and len(res["cells"]) == 4
    assert [e["point"] for e in res["points"]] == [{"finetune.lora.rank": 4}, {"finetune.lora.rank": 8}]
    for entry in res["points"]:
        p = entry["pooled"]
        cells = [c for c in res["cells"] if c["point"] == entry["point"]]
        assert p["seeds"] == 2
        assert p["differences"] == pytest.approx([c["hypothesis"]["wrong_rate_difference"] for c in cells])
        lo, hi = p["random_effects"]["ci"]
        assert lo <= p["random_effects"]["estimate"] <= hi
        assert p["stratified"]["a_only"] == sum(c["hypothesis"]["teacher_wrong_only"] for c in cells)
        for c in cells:
            assert (out / c["folder"] / "report.md").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seeds"] == [0, 1] and len(manifest["cells"]) == 4
    assert_forest_is_the_results(out, res, tmp_path / "again")
    report = (out / "report.md").read_text()
    assert "Over 2 seeds" in report.split("## Result", 1)[1].split("###")[0]
    assert "Over 2 seeds" in proc.stdout and "4 cells" in proc.stderr


def test_rerun_reuses_every_stage_and_a_new_seed_runs_only_its_own(two_seeds):
    out, _ = two_seeds
    before = (out / "results.json").read_text()
    again = kmm_run(out, "-s", "seeds=0,1")
    assert running(again) == [] and "reused" in again.stderr
    assert (out / "results.json").read_text() == before
    third = kmm_run(out, "-s", "seeds=0,1,2")
    ran = running(third)
    assert ran and all(s.startswith("seed-2/") for s in ran)
    assert len(ran) == 6 + 2 * 4
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1, 2] and all(e["pooled"]["seeds"] == 3 for e in res["points"])


def test_a_single_seed_run_gives_the_verdicts_of_its_cell(two_seeds, tmp_path):
    out, _ = two_seeds
    single = tmp_path / "single"
    proc = run_kmm("run", "smoke", "--out", str(single), *SIZES, "-s", "seed=1", "-s", "finetune.lora.rank=4",
                   cwd=tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((single / "results.json").read_text())
    assert "cells" not in res and res["seed"] == 1 and (single / "data" / "stage.json").is_file()
    cell = out / "seed-1" / "finetune.lora.rank=4"
    assert json.loads((cell / "results.json").read_text())["hypothesis"] == res["hypothesis"]
    for cond in ("base_student", "self", "teacher", "base_teacher"):
        a = [json.loads(x)["verdict"] for x in (cell / "samples" / f"{cond}.jsonl").read_text().splitlines()]
        b = [json.loads(x)["verdict"] for x in (single / "samples" / f"{cond}.jsonl").read_text().splitlines()]
        assert a == b, cond


def assert_forest_is_the_results(out, res: dict, again) -> None:
    """forest.png is exactly the figure drawn from results.json (byte for byte), and that figure
    holds per grid point each seed's difference, then the pooled estimate, in points."""
    from kmismatch_lite import report
    from test_figures import figures_drawn, forest_rows

    again.mkdir()
    with figures_drawn() as drawn:
        report.forest(res, again / "forest.png")
    assert (again / "forest.png").read_bytes() == (out / "forest.png").read_bytes()
    rows = forest_rows(drawn[again / "forest.png"])
    expected = []
    for entry in res["points"]:
        cells = [c for c in res["cells"] if c["point"] == entry["point"]]
        expected += [(False, 100 * c["hypothesis"]["wrong_rate_difference"]) for c in cells]
        expected.append((True, 100 * entry["pooled"]["random_effects"]["estimate"]))
    assert [r[4] for r in rows] == [pooled for pooled, _ in expected]
    assert [r[1] for r in rows] == pytest.approx([x for _, x in expected])
