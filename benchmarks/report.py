"""The report: a plain-text table (or JSON) of every row."""

from __future__ import annotations

import json
from collections.abc import Sequence

from benchmarks.harness import Row, format_number

__all__ = ["table", "to_json"]

_HEADERS = ("benchmark", "size", "measured", "baseline", "ratio", "target", "met")


def _cells(row: Row) -> tuple[str, ...]:
    baseline = (
        "" if row.baseline is None else f"{format_number(row.baseline)} ({row.baseline_name})"
    )
    ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
    met = {None: "", True: "met", False: "MISSED"}[row.met]
    return (
        row.name,
        f"{row.size:,}",
        f"{format_number(row.measured)} {row.unit}",
        baseline,
        ratio,
        "" if row.target is None else row.target.describe(row.unit),
        met,
    )


def table(rows: Sequence[Row], *, markdown: bool = False) -> str:
    """The rows as an aligned text table, or a Markdown one."""
    lines = [_HEADERS, *(_cells(row) for row in rows)]
    if markdown:
        out = ["| " + " | ".join(line) + " |" for line in lines]
        out.insert(1, "| " + " | ".join("---" for _ in _HEADERS) + " |")
        return "\n".join(out)
    widths = [max(len(line[i]) for line in lines) for i in range(len(_HEADERS))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in text)


def to_json(rows: Sequence[Row], meta: dict[str, object]) -> str:
    return json.dumps({"meta": meta, "rows": [row.to_json() for row in rows]}, indent=2)
