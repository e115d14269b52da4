"""Markdown tables for notebook output (``IPython.display.Markdown(markdown_table(...))``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def markdown_table(rows: dict[str, dict], columns: Sequence[str] | None = None, digits: int = 1) -> str:
    """A Markdown table from ``{row_name: {column: value}}`` (as :func:`summarize_counts` gives)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or next(iter(rows.values())).keys())

    def fmt(value) -> str:
        if isinstance(value, (bool, np.bool_)):
            return str(bool(value))
        if isinstance(value, (int, np.integer)):
            return f"{int(value):,}"
        if isinstance(value, (float, np.floating)):
            return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.{digits}f}"
        return str(value)

    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(values.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)
