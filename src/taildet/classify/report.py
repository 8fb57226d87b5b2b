"""Report of a classification run: the per-class accuracy vs training count figure and a table.

matplotlib is imported on use (figures only); the figure is drawn on its own ``Figure`` (the
global backend is left alone) and written atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from taildet.fileio import atomic_write

__all__ = ["plot_per_class", "format_table"]


def plot_per_class(per_class: Mapping[str, Sequence[float]], train_counts: Sequence[int],
                   out_png: str | os.PathLike, title: str | None = None,
                   errors: Mapping[str, Sequence[float]] | None = None) -> str:
    """Per-class accuracy (%) of each method (one line each) over the classes in order of
    decreasing training count (x ticks: the counts; shaded: many / medium / few shot);
    ``errors``: optional per-class half-widths drawn as bands (clipped to 0-100). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional: matplotlib, imported on use
    from matplotlib.figure import Figure  # optional: matplotlib, imported on use

    counts = np.asarray(train_counts, dtype=np.float64)
    order = np.argsort(-counts, kind="stable")
    x = np.arange(counts.size)
    fig = Figure(figsize=(max(6.4, 0.16 * counts.size), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    sorted_counts = counts[order]
    for lo, hi, name, shade in ((100.5, np.inf, "many", "0.93"), (19.5, 100.5, "medium", "0.97"),
                                (-np.inf, 19.5, "few", "0.90")):
        idx = np.nonzero((sorted_counts > lo) & (sorted_counts < hi))[0]
        if idx.size:
            ax.axvspan(idx[0] - 0.5, idx[-1] + 0.5, color=shade, lw=0, zorder=0)
            ax.text((idx[0] + idx[-1]) / 2, 101, name, ha="center", va="bottom", fontsize=8, color="0.35")
    for i, (name, acc) in enumerate(per_class.items()):
        y = np.asarray(acc, dtype=np.float64)[order]
        ax.plot(x, y, marker="o", ms=3, lw=1.2, label=name, color=f"C{i % 10}")
        if errors is not None and name in errors:
            e = np.asarray(errors[name], dtype=np.float64)[order]
            ax.fill_between(x, np.clip(y - e, 0, 100), np.clip(y + e, 0, 100), color=f"C{i % 10}", alpha=0.12, lw=0)
    step = max(1, counts.size // 25)
    ax.set_xticks(x[::step])
    ax.set_xticklabels([str(int(c)) for c in sorted_counts[::step]], fontsize=7)
    ax.set_xlim(-0.5, counts.size - 0.5)
    ax.set_xlabel("classes by training count (tick: the class's training images)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_ylim(-2, 108)
    ax.set_title(title or "per-class accuracy vs training count")
    ax.legend(fontsize=8, loc="lower left")
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.92)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(out_png, lambda fh: fh.write(buf.getvalue()))
    return os.fspath(out_png)


def _cell(v: float | None, ci: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1f}" if ci is None or math.isnan(ci) else f"{v:.1f} ± {ci:.1f}"


def format_table(rows: Mapping[str, Mapping[str, float]], keys: Sequence[str] = ("top1", "many", "medium", "few",
                                                                                 "mean_class_acc")) -> str:
    """A Markdown table: one row per method, columns ``keys`` (a value, or ``(mean, half-width)``)."""
    head = "| method | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for name, m in rows.items():
        cells = []
        for k in keys:
            v = m.get(k)
            cells.append(_cell(*v) if isinstance(v, (tuple, list)) else _cell(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
