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
    """Per-class accuracy (%) against the class's training images (log x), one line per method
    (classes in order of decreasing count); ``errors``: optional per-class half-widths drawn as
    bands. Returns the path written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional: matplotlib, imported on use
    from matplotlib.figure import Figure  # optional: matplotlib, imported on use

    counts = np.asarray(train_counts, dtype=np.float64)
    order = np.argsort(-counts, kind="stable")
    x = np.maximum(counts[order], 0.5)
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for i, (name, acc) in enumerate(per_class.items()):
        y = np.asarray(acc, dtype=np.float64)[order]
        ax.plot(x, y, marker="o", ms=3, lw=1.2, label=name, color=f"C{i % 10}")
        if errors is not None and name in errors:
            e = np.asarray(errors[name], dtype=np.float64)[order]
            ax.fill_between(x, y - e, y + e, color=f"C{i % 10}", alpha=0.15, lw=0)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.axvline(100.5, color="0.6", lw=0.8, ls="--")
    ax.axvline(19.5, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("training images of the class (log; many > 100 | medium 20-100 | few < 20)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_ylim(-2, 102)
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
