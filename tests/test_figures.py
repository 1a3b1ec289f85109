"""The figures read back for what they drew, not for their file size: the forest plot's rows
(every seed's difference and interval, the pooled diamond), report.png's stacked counts, and the
dose, categories and epochs figures' points, each against figures worked out here from the
verdicts."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from unittest import mock

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="needs matplotlib")
pytest.importorskip("statsmodels", reason="needs the stats extra (scipy, statsmodels)")

from matplotlib.figure import Figure  # noqa: E402

from kmismatch_lite import report, report_designs  # noqa: E402
from kmismatch_lite.qa import scoring  # noqa: E402

C, W, A = scoring.CORRECT, scoring.WRONG, scoring.ABSTAINED
TEMP = re.compile(r"^\.(.+)\.[0-9a-f]{8}$")  # io.atomic_path's temporary name beside the target


@contextmanager
def figures_drawn() -> Iterator[dict[Path, Figure]]:
    """Every figure saved in the block, by the path it was written to (its temporary name undone)."""
    saved: dict[Path, Figure] = {}
    original = Figure.savefig

    def record(fig, fname, *args, **kwargs):
        path = Path(fname)
        m = TEMP.match(path.name)
        saved[path.parent / m.group(1) if m else path] = fig
        return original(fig, fname, *args, **kwargs)

    with mock.patch.object(Figure, "savefig", record):
        yield saved


def only_axes(fig: Figure):
    assert len(fig.axes) == 1, len(fig.axes)
    return fig.axes[0]


def errorbars(ax) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each labelled error-bar series: its x, its y, and its bars' (low, high) ends along the
    error direction."""
    out = {}
    for cont in ax.containers:
        if type(cont).__name__ != "ErrorbarContainer":
            continue
        line, _, bars = cont.lines
        segments = np.array(bars[0].get_segments())
        axis = 0 if cont.has_xerr else 1
        out[cont.get_label()] = (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float),
                                 segments[:, :, axis])
    return out


def bars(ax) -> dict[str, list[tuple[str, float, float]]]:
    """Each labelled bar series: (category tick label, bottom, height) per bar."""
    ticks = {round(t, 6): lab.get_text() for t, lab in zip(ax.get_xticks(), ax.get_xticklabels())}
    out = {}
    for cont in ax.containers:
        if type(cont).__name__ == "BarContainer":
            out[cont.get_label()] = [(ticks[round(p.get_x() + p.get_width() / 2, 6)], p.get_y(), p.get_height())
                                     for p in cont.patches]
    return out


def forest_rows(fig: Figure) -> list[tuple[str, float, float, float, bool]]:
    """The forest plot's rows from top to bottom: (label, estimate, low, high, pooled)."""
    ax = only_axes(fig)
    labels = {round(y): lab.get_text() for y, lab in zip(ax.get_yticks(), ax.get_yticklabels())}
    rows = {}
    for cont in ax.containers:
        line, _, (segs, *_) = cont.lines
        (x,), (y,) = line.get_xdata(), line.get_ydata()
        (lo, _), (hi, _) = segs.get_segments()[0]
        rows[round(y)] = (labels[round(y)], float(x), float(lo), float(hi), False)
    for patch in ax.patches:
        xy = patch.get_xy()
        y = round(float(np.mean(xy[:4, 1])))
        rows[y] = (labels[y], float(xy[1, 0]), float(xy[:, 0].min()), float(xy[:, 0].max()), True)
    assert sorted(rows) == sorted(labels), "every tick has one drawn row"
    return [rows[y] for y in sorted(rows, reverse=True)]


def assert_forest(fig: Figure, groups: list[tuple[str, list, tuple[float, float, float]]]) -> None:
    """The forest plot holds exactly these rows, in order: per group (a grid point's label prefix,
    its seeds as (label, difference, interval), its pooled (estimate, low, high)) each seed, then
    the pooled diamond; figures in points, given here as fractions."""
    rows = forest_rows(fig)
    expected = [(f"{prefix}{label}", (d, *ci), False) for prefix, seeds, pooled in groups
                for label, d, ci in [*seeds, ("pooled (random effects)", pooled[0], pooled[1:])]]
    assert [r[0] for r in rows] == [e[0] for e in expected]
    for (label, x, lo, hi, is_pooled), (_, figures, _) in zip(rows, expected):
        assert is_pooled == label.endswith("pooled (random effects)")
        assert (x, lo, hi) == pytest.approx(tuple(100 * v for v in figures), abs=1e-9), label
        assert lo <= x <= hi
    assert any(list(line.get_xdata()) == [0, 0] for line in only_axes(fig).lines)  # the zero line


# --- the forest plot ---

PER_SEED = [(60, 30, 10), (60, 25, 12), (60, 12, 28), (60, 22, 14), (60, 35, 9)]


@pytest.fixture
def pooled_forest(tmp_path):
    from test_headline_run import per_seed_effects, pooled_run, random_effects_by_wls

    with figures_drawn() as drawn:
        res, verdicts = pooled_run(tmp_path, PER_SEED)
    d, v = per_seed_effects(verdicts)
    hand = random_effects_by_wls(d, v)
    seeds = [(f"seed {i}", d[i], tuple(cell["hypothesis"]["bootstrap_95ci"]))
             for i, cell in enumerate(res["cells"])]
    return res, drawn, seeds, (hand["estimate"], *hand["ci"])


def test_forest_plot_draws_every_seed_and_the_pooled_diamond(tmp_path, pooled_forest):
    res, drawn, seeds, pooled = pooled_forest
    fig = drawn[tmp_path / "forest.png"]
    assert_forest(fig, [("", seeds, pooled)])
    assert len(seeds) == len(PER_SEED)
    assert fig.axes[0].get_title() == "student student-m, teacher teacher-m"
    # each seed's own report.png was drawn too, and nothing else beside them
    assert set(drawn) == {tmp_path / "forest.png"} | {tmp_path / c["folder"] / "report.png" for c in res["cells"]}


def test_a_forest_plot_missing_a_seed_fails_the_check(tmp_path, pooled_forest, monkeypatch):
    res, _, seeds, pooled = pooled_forest
    rows = report._forest_rows
    monkeypatch.setattr(report, "_forest_rows", lambda r: [x for x in rows(r) if x[0] != "seed 2"])
    with figures_drawn() as drawn:
        report.forest(res, tmp_path / "again.png")
    with pytest.raises(AssertionError):
        assert_forest(drawn[tmp_path / "again.png"], [("", seeds, pooled)])


# --- report.png ---

def test_report_chart_stacks_each_conditions_counts(tmp_path):
    from test_headline_run import evaluated_of, make_run, paired
    from kmismatch_lite import recipes

    teacher, self_ = paired(100, 40, 12)
    with figures_drawn() as drawn:
        make_run(tmp_path, recipes.load("smoke", ["report.bootstrap=200"]), teacher, self_)
    ax = only_axes(drawn[tmp_path / "report.png"])
    drawn_bars = bars(ax)
    assert list(drawn_bars) == [C, W, A]
    ev = evaluated_of(teacher, self_)
    conds = ["base_student", "self", "teacher", "base_teacher"]
    for cond_i, cond in enumerate(conds):
        verdicts = [r["verdict"] for r in ev[cond][0]]
        bottom = 0
        for verdict in (C, W, A):
            label, y0, height = drawn_bars[verdict][cond_i]
            assert (label, y0, height) == (cond, bottom, verdicts.count(verdict)), (cond, verdict)
            bottom += height
        assert bottom == len(verdicts)
    assert "400 test questions" in ax.get_title()


# --- dose.png, categories.png, epochs.png ---

def design_cell():
    from test_designs import cell, evaluated

    ev = evaluated()
    return ev, {"student": "s", "teacher": "t", **cell(ev, epochs=True)}


def rate(verdicts: list[str], verdict: str) -> float:
    return 100 * verdicts.count(verdict) / len(verdicts)


def assert_dose_figure(fig: Figure, section: dict, per_dose: dict[float, list[str]], teacher: list[str]) -> None:
    """dose.png: one series per verdict at the doses, at each dose's rate (points), with its
    interval, and the teacher condition's wrong-answer rate as a line."""
    ax = only_axes(fig)
    series = errorbars(ax)
    assert list(series) == [C, W, A]
    doses = sorted(per_dose)
    for verdict, (x, y, ends) in series.items():
        assert list(x) == doses
        assert list(y) == pytest.approx([rate(per_dose[d], verdict) for d in doses])
        ci = np.array(section["response"][verdict]["rates_ci"]) * 100
        assert ends == pytest.approx(ci)
        assert np.all(ends[:, 0] <= y) and np.all(y <= ends[:, 1])
    line = next(line for line in ax.lines if line.get_label() == "wrong, teacher's set")
    assert list(line.get_ydata()) == pytest.approx([rate(teacher, W)] * 2)


def test_dose_figure_draws_each_verdicts_rate_at_each_dose(tmp_path):
    ev, res = design_cell()
    with figures_drawn() as drawn:
        report_designs.figures([("", res)], res, tmp_path)
    assert set(drawn) == {tmp_path / f"{k}.png" for k in ("dose", "categories", "epochs")}
    per_dose = {d: [r["verdict"] for r in ev[f"dose-{d:g}"][0]] for d in (0.0, 1.0)}
    assert_dose_figure(drawn[tmp_path / "dose.png"], res["dose"], per_dose,
                       [r["verdict"] for r in ev["teacher"][0]])


def assert_categories_figure(fig: Figure, expected: dict[str, dict[str, int]]) -> None:
    """categories.png: per category (in order), each condition's wrong answers, stacked."""
    drawn = bars(only_axes(fig))
    assert list(drawn) == list(expected)
    bottoms: dict[str, float] = {}
    for cat, per_cond in expected.items():
        assert [(c, h) for c, _, h in drawn[cat]] == list(per_cond.items()), cat
        for cond, y0, h in drawn[cat]:
            assert y0 == bottoms.get(cond, 0)
            bottoms[cond] = y0 + h


def test_categories_figure_stacks_wrong_answers_by_category(tmp_path):
    ev, res = design_cell()
    with figures_drawn() as drawn:
        report_designs.figures([("", res)], res, tmp_path)
    known = [r["verdict"] == C for r in ev["base_student"][0]]  # cheap: Known = the base student's correct
    expected = {cat: {cond: sum(r["verdict"] == W and k == (cat == "Known") for r, k in zip(rows, known))
                      for cond, (rows, _) in ev.items()} for cat in ("Known", "Unknown")}
    assert sum(expected["Unknown"].values()) > 0 and sum(expected["Known"].values()) > 0
    assert_categories_figure(drawn[tmp_path / "categories.png"], expected)


def assert_epochs_figure(fig: Figure, expected: dict[str, list[float]]) -> None:
    """epochs.png: one series per condition, its wrong-answer rate (points) at epochs 1, 2, ...,
    each condition's points set a little aside from the epoch; below, teacher minus self."""
    ax, below = fig.axes
    series = errorbars(ax)
    assert list(series) == list(expected)
    for cond, (x, y, ends) in series.items():
        assert x == pytest.approx(np.arange(1, len(expected[cond]) + 1), abs=0.1), cond
        assert list(y) == pytest.approx(expected[cond]), cond
        assert np.all(ends[:, 0] <= y + 1e-9) and np.all(y <= ends[:, 1] + 1e-9)
    assert list(ax.get_xticks()) == list(range(1, max(map(len, expected.values())) + 1))
    (x, y, _), = errorbars(below).values()
    assert list(x) == list(range(1, len(expected["teacher"]) + 1))
    assert list(y) == pytest.approx(np.array(expected["teacher"]) - np.array(expected["self"]))


def test_epochs_figure_draws_each_conditions_wrong_rate_by_epoch(tmp_path):
    from test_designs import epoch_one

    ev, res = design_cell()
    with figures_drawn() as drawn:
        report_designs.figures([("", res)], res, tmp_path)
    first, _ = epoch_one(ev)
    expected = {cond: [rate([r["verdict"] for r in first[cond][1][0]], W), rate([r["verdict"] for r in ev[cond][0]], W)]
                for cond in ("self", "teacher", "dose-1")}
    assert all(a < b for a, b in expected.values())
    assert_epochs_figure(drawn[tmp_path / "epochs.png"], expected)
