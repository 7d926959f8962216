"""Markdown tables and number formatting shared by report.md, the console and the evaluation tables.

Why one module: every table the tool prints must show the same number the same way, with one
dash for a missing value. It sits in ``common`` (no torch, no numpy) so that both ``evaluation``
and ``reporting`` can import it without importing each other.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

MISSING = "–"   # the one mark for a value that was not measured


def is_number(x: object) -> bool:
    """A finite int or float (bools are not numbers here): a value worth averaging, printing or plotting."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x: object, nd: int = 3) -> str:
    """None -> the missing dash, bool -> yes/no, int as is, float with ``nd`` decimals (nan/inf spelled out)."""
    if x is None:
        return MISSING
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{nd}f}" if math.isfinite(x) else str(x)
    return str(x)


def fmt_ci(ci: Mapping | None, nd: int = 3) -> str:
    """'0.123 [0.100, 0.150]' from a ``summaries.bootstrap_ci`` dict; the dash when it has no mean."""
    if not ci or ci.get("mean") is None:
        return MISSING
    return f"{fmt(ci['mean'], nd)} [{fmt(ci.get('lo'), nd)}, {fmt(ci.get('hi'), nd)}]"


def fmt_pct(x: float | None, nd: int = 1, suffix: str = "%") -> str:
    """A fraction as a percentage: 0.1234 -> '12.3%'."""
    return MISSING if x is None else f"{100 * x:.{nd}f}{suffix}"


def md_cell(text: object) -> str:
    """A value made safe inside a table cell (pipes escaped, one line)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> list[str]:
    """The lines of a markdown table; cells are printed as given (format numbers with ``fmt`` first)."""
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
