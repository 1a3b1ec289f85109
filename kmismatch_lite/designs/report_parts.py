"""What the designs' tables and figures share: number formats, verdict colours, the table form."""

from __future__ import annotations

from kmismatch_lite.qa import scoring

Table = tuple[str, list[str], list[list[str]], str]  # (title, columns, rows, the sentence under it)

COLORS = {scoring.CORRECT: "#2e7d32", scoring.WRONG: "#c62828", scoring.ABSTAINED: "#9e9e9e"}


def pts(x: float) -> str:
    """A rate in percentage points, one decimal."""
    return f"{100 * x:.1f}"


def count(x: float) -> str:
    # Pooled over seeds these are means; one decimal says so without a run of digits.
    return f"{x:g}" if float(x).is_integer() else f"{x:.1f}"
