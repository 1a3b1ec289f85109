"""The designs' part of a report: each unit's table, note and figure (designs/), for one cell's
results or each grid point pooled over seeds, as markdown and the figures <unit>.png."""

from __future__ import annotations

from pathlib import Path

from kmismatch_lite import designs
from kmismatch_lite.designs.report_parts import Table
from kmismatch_lite.io import atomic_path


def tables(section: dict) -> list[Table]:
    """(title, columns, rows, sentence) of each design in a cell's results or a pooled grid point."""
    return [u.table(section[u.key]) for u in designs.reported(section)]


def _md_table(columns: list[str], rows: list[list[str]]) -> str:
    return (f"| {' | '.join(columns)} |\n|{'---|' * len(columns)}\n"
            + "".join(f"| {' | '.join(map(str, r))} |\n" for r in rows))


def markdown(section: dict, level: str = "##", images: bool = True) -> str:
    """The design sections of report.md ('' when the recipe has no design)."""
    parts = []
    for unit in designs.reported(section):
        title, columns, rows, text = unit.table(section[unit.key])
        image = f"\n![{unit.key}]({unit.key}.png)\n" if images and unit.panel else ""
        parts.append(f"{level} {title}\n\n{unit.note}\n\n{_md_table(columns, rows)}\n{text}\n{image}\n")
    return "".join(parts)


def image_links(section: dict) -> str:
    return "".join(f"![{u.key}]({u.key}.png)\n\n" for u in designs.reported(section) if u.panel)


def figures(entries: list[tuple[str, dict]], res: dict, out: Path) -> None:
    """<unit>.png (one panel per labelled section) for each unit with a figure whose sections
    `entries` hold."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    title = f"student {res['student']}, teacher {res['teacher']}"
    for unit in designs.UNITS:
        if unit.key is None or unit.panel is None:
            continue
        panels = [(label, e[unit.key]) for label, e in entries if unit.key in e]
        if not panels:
            # A rerun without the design must not leave an earlier run's figure beside the report.
            (out / f"{unit.key}.png").unlink(missing_ok=True)
            continue
        width, height = unit.panel_size
        fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
        for ax, (label, section) in zip(axes[0], panels):
            unit.panel(ax, section)
            ax.set_title(f"{title}{': ' + label if label else ''}", fontsize=9)
        fig.tight_layout()
        with atomic_path(out / f"{unit.key}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
