"""Figures and the final table."""

from __future__ import annotations

import attrs


@attrs.define
class Figure:
    """One line of the table: a measured value, its baseline and their ratio."""

    scenario: str
    name: str
    value: float | None
    unit: str
    baseline: str = ""  # name and value of the baseline, as text
    ratio: float | None = None
    target: str = ""  # e.g. ">= 0.8x", "< 256 MiB"
    ok: bool | None = None  # target met? None when there is no target
    note: str = ""
    #: (chart, series, x) when the figure is a point of a plot (see benchmarks.plot)
    point: tuple[str, str, float] | None = None


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("ops/s", "MB/s", "MiB") or abs(value) >= 100:
        return f"{value:,.0f} {unit}".strip()
    return f"{value:.1f} {unit}".strip()


def render(figures: list[Figure], machine: list[tuple[str, str]], header: str) -> str:
    """The table; figures without a name are plot points only and are left out."""
    figures = [f for f in figures if f.name]
    rows = [("scenario", "figure", "value", "baseline (same run)", "ratio", "target", "met")]
    rows.extend(
        (
            f.scenario,
            f.name,
            _num(f.value, f.unit) if f.value is not None else ("skipped" if f.note else "-"),
            f.baseline,
            "-" if f.ratio is None else f"{f.ratio:.2f}x",
            f.target,
            "" if f.ok is None else ("yes" if f.ok else "NO"),
        )
        for f in figures
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [header, ""]
    for key, value in machine:
        lines.append(f"  {key + ':':<18} {value}")
    lines.append("")

    def fmt(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    lines.append(fmt(rows[0]))
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.extend(fmt(r) for r in rows[1:])
    notes = [(f.scenario, f.name, f.note) for f in figures if f.note]
    if notes:
        lines.append("")
        lines.append("notes:")
        lines.extend(f"  {s} / {n}: {t}" for s, n, t in notes)
    return "\n".join(lines)
