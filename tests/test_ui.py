"""The progress bar on narrow terminals: the counts and times are never cut, the texts give way."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from rich.progress import Progress

from kmismatch_lite import ui


def _line(width: int, total: int, done: int, description: str, info: str) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=True, color_system=None)
    bar = Progress(*ui.progress_columns(width, total), console=console, auto_refresh=False)
    task = bar.add_task(description, total=total, info=info)
    bar.update(task, advance=done)
    console.print(bar.make_tasks_table(bar.tasks))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("width", [60, 80, 100, 160])
@pytest.mark.parametrize("total, done", [(180, 90), (12000, 345)])
def test_counts_and_times_survive_a_narrow_terminal(width, total, done):
    line = _line(width, total, done, "fine-tuning smollm2-135m-instruct (torch)", "loss=1.234 tok_s=204")
    assert len(line) <= width
    assert f" {done}/{total} 0:00:00 eta -:--:--" in line


def test_a_wide_terminal_shows_everything():
    line = _line(160, 180, 90, "fine-tuning smollm2-135m-instruct (torch)", "loss=1.234 tok_s=204")
    assert line.startswith("fine-tuning smollm2-135m-instruct (torch) ") and line.endswith("loss=1.234 tok_s=204")


@pytest.mark.parametrize("width", [80, 120])
def test_the_stages_board_keeps_its_counts_and_each_running_stage(monkeypatch, width):
    buf = io.StringIO()
    monkeypatch.setattr(ui, "err", Console(file=buf, width=width, force_terminal=True, color_system=None))
    long = "seed-12/finetune.lora.rank=8/evaluate/dose-0.5-epoch-2"
    with ui.stages_board(120) as board:
        for name in ("seed-0/data", "seed-0/generate/teacher", long):
            board.start(name)
        board.finish("seed-0/data")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue()).replace("\r", "\n")
    last = [line for line in text.splitlines() if line.strip()][-3:]
    assert last[0].startswith("stages: 2 running, 117 left ") and " 1/120 " in last[0] and "eta" in last[0]
    assert long in last[2] and "seed-0/generate/teacher" in last[1]
    assert all(len(line) <= width for line in last)


def _screen(buf: io.StringIO) -> list[str]:
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue()).replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip()]


def test_a_bar_keeps_its_counts_when_the_terminal_narrows_under_it(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(ui, "err", Console(file=buf, width=160, force_terminal=True, color_system=None))
    with ui.progress_bar("fine-tuning smollm2-135m-instruct (torch)", 180) as advance:
        advance(35, loss="1.234", tok_s="204")
        ui.err.width = 80  # the window narrowed while the fine-tune runs
        advance(1, loss="1.230", tok_s="205")
    last = _screen(buf)[-1]
    assert len(last) <= 80 and re.search(r" 36/180 \d:\d\d:\d\d eta (\d:\d\d:\d\d|-:--:--) ", last), last


@pytest.mark.parametrize("width", [60, 80])
def test_a_narrow_table_wraps_and_folds_but_never_cuts_a_figure(monkeypatch, width):
    buf = io.StringIO()
    monkeypatch.setattr(ui, "out", Console(file=buf, width=width, color_system=None))
    columns = ["", "wrong t / s", "difference (95%)", "p", "abstained t / s", "n", "mismatch"]
    rows = [["seed 0", "11 / 13", "-12.5 [-37.5, +12.5]", "0.625", "0 / 0", "16", "35.7%"],
            ["random effects", "", "-0.2 [-113.4, +113.0]", "", "", "", ""],
            ["hierarchical bootstrap", "", "[-21.9, +12.5]", "", "", "", ""]]
    ui.table("pooled", columns, rows)
    text = buf.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= width

    def chars(s: str) -> list[str]:
        return sorted(s.replace("─", "").replace(" ", "").replace("\n", ""))

    assert chars(text) == chars("pooled" + "".join(columns) + "".join("".join(r) for r in rows))
    if width == 80:
        assert "[-113.4," in text and "+113.0]" in text  # a word wraps whole where it fits
