"""The report's plots: matplotlib figures rendered to PNG `data:` URIs, so the page needs nothing
beside itself. matplotlib is imported when the first plot is drawn (the report task only), and
figures are made with the object API (no pyplot: no global state, no GUI backend)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

WIDTH, HEIGHT, DPI = 6.4, 2.9, 100
COLORS = ("#1a73e8", "#e8710a", "#188038", "#a142f4", "#d93025", "#12b5cb")


def _figure(height: float = HEIGHT) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def lines(series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
          log_y: bool = False) -> str:
    """One line per series (label → (x, y)); points without a value are left out."""
    fig, ax = _figure()
    for color, (label, (xs, ys)) in zip(_cycle(), series.items(), strict=False):
        points = [(x, y) for x, y in zip(xs, ys, strict=True) if _finite(y)]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None, markersize=3,
                    label=label, color=color)
    if log_y and all(y > 0 for _, ys in series.values() for y in ys if _finite(y)):
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize="small")
    return _png(fig)


def histogram(series: dict[str, Sequence[float]], xlabel: str, bins: int = 40, limit: float | None = None) -> str:
    """Overlaid histograms (label → values), with a dashed line at `limit` (e.g. max_seq_len)."""
    fig, ax = _figure()
    present = {label: list(values) for label, values in series.items() if values}
    low = min(min(v) for v in present.values())
    high = max(max(v) for v in present.values())
    edges = _edges(low, max(high, limit or high), bins)
    for color, (label, values) in zip(_cycle(), present.items(), strict=False):
        ax.hist(values, bins=edges, alpha=0.55, label=f"{label} ({len(values)})", color=color)
    if limit is not None:
        ax.axvline(limit, color="#5f6368", linestyle="--", linewidth=1, label=f"limit {limit:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend(fontsize="small")
    return _png(fig)


def interval(difference: float, low: float, high: float, min_improvement: float, mode: str,
             metric: str, level: float) -> str:
    """Challenger − champion with its interval, against 0 and the bound the interval must clear."""
    fig, ax = _figure(height=1.7)
    ax.errorbar([difference], [0], xerr=[[difference - low], [high - difference]], fmt="o", color=COLORS[0],
                capsize=6, label=f"difference, {level:.0%} interval")
    ax.axvline(0, color="#5f6368", linewidth=1)
    bound = -min_improvement if mode == "min" else min_improvement
    if min_improvement:
        ax.axvline(bound, color=COLORS[4], linestyle="--", linewidth=1, label=f"must clear {bound:+g}")
    ax.set_yticks([])
    better = "lower" if mode == "min" else "higher"
    ax.set_xlabel(f"{metric}: challenger − champion ({better} is better)")
    ax.legend(fontsize="small", loc="upper left")
    return _png(fig)


def bars(labels: Sequence[str], values: Sequence[float], colors: Sequence[str], xlabel: str) -> str:
    """Horizontal bars, top to bottom in the order given."""
    fig, ax = _figure(height=max(1.6, 0.32 * len(labels) + 0.8))
    positions = list(range(len(labels)))[::-1]
    ax.barh(positions, values, color=list(colors))
    ax.set_yticks(positions, labels=list(labels))
    ax.set_xlabel(xlabel)
    return _png(fig)


def _edges(low: float, high: float, bins: int) -> list[float]:
    if high <= low:
        return [low - 0.5, low + 0.5]
    step = (high - low) / bins
    return [low + step * i for i in range(bins + 1)]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _cycle() -> Any:
    while True:
        yield from COLORS
