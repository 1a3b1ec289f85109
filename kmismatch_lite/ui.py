"""All terminal output: progress bars and logs on stderr, tables on stdout (the only rich user)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from rich import box
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Column, Table

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def log(message: str) -> None:
    err.print(message)


def _widths(width: int, total: int) -> tuple[int, int, int]:
    """Widths of the description, the bar and the info text on a `width`-column terminal, so
    that the counts and the times are never cut (the bar and the texts give way first)."""
    counts = 2 * len(str(max(total, 0))) + 1
    fixed = counts + 7 + 3 + 7 + 6  # done/total, elapsed, "eta", remaining, the six gaps
    room = max(width - fixed - 1, 24)
    bar = min(40, max(6, room // 5))
    description = min(48, max(10, (room - bar) * 3 // 5))
    return description, bar, max(room - bar - description, 0)


def progress_columns(width: int, total: int) -> list:
    """The bar's columns, sized for a terminal `width` columns wide."""
    description, bar, info = _widths(width, total)

    def text(template: str, most: int) -> TextColumn:
        return TextColumn(template, table_column=Column(no_wrap=True, overflow="ellipsis", max_width=most))

    return [text("{task.description}", description), BarColumn(bar_width=bar), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), text("{task.fields[info]}", info)]


class _Fitted(Progress):
    """A rich Progress whose columns are laid out again for the terminal's width whenever it
    changed since the last redraw: a terminal narrowed while a long stage runs keeps the counts
    and the times whole."""

    def __init__(self, layout: Callable[[int], Sequence], console: Console, **options) -> None:
        self._layout, self._width = layout, console.width
        super().__init__(*layout(console.width), console=console, **options)

    def get_renderables(self):
        # rich draws once while building the Progress, before `live` exists; the columns are
        # rebuilt only when the width changed, so that they keep their own refresh pacing
        if hasattr(self, "live") and self.console.width != self._width:
            self._width = self.console.width
            self.columns = tuple(self._layout(self._width))
        yield from super().get_renderables()


@contextmanager
def progress_bar(description: str, total: int, fields: str = "") -> Iterator:
    """Yield `advance(n=1, **info)`: a rich bar on stderr, with free-form info after it."""
    with _Fitted(lambda width: progress_columns(width, total), err, transient=False,
                 disable=not err.is_terminal and total < 2) as bar:
        task = bar.add_task(description, total=total, info=fields)

        def advance(n: int = 1, **info) -> None:
            text = " ".join(f"{k}={v}" for k, v in info.items())
            bar.update(task, advance=n, **({"info": text} if info else {}))

        yield advance


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, c in enumerate(columns):
        # On a narrow terminal cells wrap, and a word wider than its column folds onto the next
        # line: a figure is never cut short.
        t.add_column(c, justify="left" if i == 0 else "right", overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    out.print(t)


def tally_rows(named: dict[str, dict]) -> list[list[str]]:
    """Rows of counts and rates for tables of conditions or checks."""
    rows = []
    for name, m in named.items():
        rows.append([name, m["n"], m["correct"], m["wrong"], m["abstained"],
                     f"{m['hallucination_rate']:.1%}", f"{m['precision']:.1%}", f"{m['exact_match_rate']:.1%}"])
    return rows


TALLY_COLUMNS = ["condition", "n", "correct", "wrong", "abstained", "halluc.", "precision", "exact"]


def summary(message: str) -> None:
    """The one summary line every long command ends with (stderr)."""
    err.print(f"[bold]{message}[/bold]")


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


class _Board:
    """One bar over a run's stages (done of all, elapsed, eta, how many run and are left) and a
    line per running stage with its own elapsed time."""

    def __init__(self, overall: Progress, lines: Progress, total: int) -> None:
        self.overall, self.lines, self.total, self.running = overall, lines, total, {}
        self.task = overall.add_task(self._description(0), total=total)

    def _description(self, done: int) -> str:
        return f"stages: {len(self.running)} running, {self.total - done - len(self.running)} left"

    def _update(self) -> None:
        done = int(self.overall.tasks[0].completed)
        self.overall.update(self.task, description=self._description(done))

    def start(self, name: str) -> None:
        self.running[name] = self.lines.add_task(name)
        self._update()

    def finish(self, name: str) -> None:
        task = self.running.pop(name, None)
        if task is not None:
            self.lines.remove_task(task)
        self.overall.advance(self.task)
        self._update()


@contextmanager
def stages_board(total: int) -> Iterator[_Board]:
    """The progress of stages computed at once (`kmm run --jobs`), on stderr: the bar keeps its
    counts and times on a narrow terminal, each running stage's line its name and time."""
    from rich.console import Group
    from rich.live import Live
    from rich.progress import SpinnerColumn

    def overall_columns(width: int) -> list:
        description, bar, _ = _widths(width, total)
        description = max(description, len("stages: 99 running, 999 left"))
        return [TextColumn("{task.description}", table_column=Column(no_wrap=True, min_width=description)),
                BarColumn(bar_width=max(6, bar - 6)), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn()]

    spinner = SpinnerColumn()  # one spinner across redraws, so that it turns

    def line_columns(width: int) -> list:
        return [spinner, TextColumn("{task.description}", table_column=Column(
                no_wrap=True, overflow="ellipsis", max_width=max(width - 12, 20))), TimeElapsedColumn()]

    overall, lines = _Fitted(overall_columns, err), _Fitted(line_columns, err)
    board = _Board(overall, lines, total)
    if not err.is_terminal:
        yield board
        return
    with Live(Group(overall, lines), console=err, transient=False):
        yield board
