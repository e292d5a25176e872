"""Formatting shared by the benchmarks: rates, durations and plain-text tables."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["fmt_rate", "fmt_ratio", "fmt_s", "median", "table"]


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}/s"


def fmt_s(x: float) -> str:
    return f"{x * 1000:,.1f} ms" if x < 1 else f"{x:,.2f} s"


def fmt_ratio(x: float) -> str:
    return f"{x:.3f}x" if x < 0.1 else f"{x:.2f}x"


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def table(title: str, rows: list[tuple[str, ...]]) -> str:
    """``rows[0]`` is the header; the first column is left-aligned, the others right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [title]
    for j, r in enumerate(rows):
        cells = zip(r, widths, strict=True)
        lines.append(
            "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))
        )
        if j == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)
