"""The benchmark plot: downtime against device count, throughput against channel count.

Figures carry a :attr:`~benchmarks.report.Figure.point` (chart, series, x) when they
belong on a chart; :func:`write_plot` draws every chart that has points into one PNG.
matplotlib is optional (``pip install -e '.[bench]'``): without it the plot is
skipped with a message saying so.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.report import Figure

#: chart name -> (title, x label, y label)
CHARTS = {
    "downtime": ("Downtime against device count", "devices K", "downtime (ms)"),
    "throughput": ("Stop-copy throughput against channel count", "channels", "MB/s"),
}


def series(figures: list[Figure]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """chart -> series -> sorted (x, value) points."""
    charts: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for fig in figures:
        if fig.point is None or fig.value is None:
            continue
        chart, name, x = fig.point
        charts.setdefault(chart, {}).setdefault(name, []).append((x, fig.value))
    for by_name in charts.values():
        for points in by_name.values():
            points.sort()
    return charts


def write_plot(figures: list[Figure], path: Path) -> str:
    """Draw the charts into ``path`` (PNG); returns a line saying what was done."""
    charts = series(figures)
    if not charts:
        return "plot: no figures to plot in this run"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot: skipped, matplotlib is not installed (pip install -e '.[bench]')"
    names = [c for c in CHARTS if c in charts]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, chart in zip(axes[0], names, strict=True):
        title, xlabel, ylabel = CHARTS[chart]
        for name, points in sorted(charts[chart].items()):
            xs, ys = zip(*points, strict=True)
            style = "--" if name.startswith(("model", "min(")) else "-o"
            ax.plot(xs, ys, style, label=name)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted({x for pts in charts[chart].values() for x, _ in pts}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"
