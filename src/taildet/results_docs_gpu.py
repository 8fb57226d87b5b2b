"""Issue 18's GPU suite summary (``benchmarks/gpu_suite.py --out``): reading it and its table, as
plain text (the script's printout) and as Markdown (the ``gpu_suite`` block of the docs, see
:mod:`taildet.results_docs`). A summary that is not committed yet renders as one line saying so.

The summary is a JSON object with ``kind: "gpu suite"``, ``mode`` (``gpu`` or ``cpu-smoke``),
``date``, ``command``, ``device`` (``type``, ``name``), ``torch``, ``sizes``, ``rounds``
(``warmup``, ``timed``), ``goals_met`` (None when not judged) and ``rows``: per row ``group``,
``label``, ``unit``, ``samples_ms``, ``median_ms``, ``reference_label``, ``ratio``, ``goal`` and
``verdict`` (``PASS`` / ``MISS`` / ``-`` / ``smoke: not judged``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from taildet.errors import DataError

__all__ = ["GPU_SUITE_COLUMNS", "load_gpu_suite", "gpu_suite_cells", "gpu_suite_caption", "format_gpu_suite",
           "format_gpu_suite_text"]

GPU_SUITE_COLUMNS = ["group", "row", "median", "unit", "reference", "ratio", "goal", "verdict"]
_TEXT_COLUMNS = {0, 1, 3, 4, 7}  # left-aligned


def load_gpu_suite(path: str | Path) -> dict | None:
    """The summary at ``path``, or None when the file does not exist (no run committed yet)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(str(path), "file", f"cannot read the GPU suite summary ({err})") from None
    if not isinstance(doc, dict) or doc.get("kind") != "gpu suite" or not isinstance(doc.get("rows"), list):
        raise DataError(str(path), "file", "not a GPU suite summary (needs kind 'gpu suite' and rows; written "
                                           "by benchmarks/gpu_suite.py --out)")
    return doc


def gpu_suite_cells(doc: Mapping) -> tuple[list[str], list[list[str]]]:
    """``(columns, rows)`` of text cells, one row per measured row: group, row, median (ms),
    unit, reference, ratio to it, goal, verdict."""
    rows = []
    for r in doc["rows"]:
        rows.append([r["group"], r["label"], f"{r['median_ms']:.2f}", r["unit"], r.get("reference_label") or "-",
                     "-" if r.get("ratio") is None else f"{r['ratio']:.3f}x",
                     "-" if r.get("goal") is None else f"<= {r['goal']:.2f}x", r["verdict"]])
    return list(GPU_SUITE_COLUMNS), rows


def gpu_suite_caption(doc: Mapping) -> str:
    """One paragraph: date, device, mode and whether every goal was met, torch, command, sizes, rounds."""
    z, n = doc.get("sizes", {}), doc.get("rounds", {})
    met = {True: "every goal met", False: "goals missed (MISS rows)", None: "not judged"}[doc.get("goals_met")]
    return (f"Measured {doc.get('date', '?')} on {doc.get('device', {}).get('name', '?')} ({doc.get('mode')} run, "
            f"{met}), torch {doc.get('torch', '?')}: `{doc.get('command', '?')}`. Backbone {z.get('backbone')}, "
            f"{z.get('classes')} classes, {z.get('images')} images of {z.get('size')} px, "
            f"{z.get('rois_per_image')} RoIs/image, {z.get('gts_per_image')} GTs/image, AMP "
            f"{'on' if z.get('amp') else 'off'}; median of {n.get('timed')} interleaved rounds after "
            f"{n.get('warmup')} warm-up; ratio = median of the per-round ratios to the reference.")


def format_gpu_suite(doc: Mapping | None, source: str = "the GPU suite summary") -> str:
    """Markdown: caption and table; one line when no run is committed (``doc`` None)."""
    if doc is None:
        return (f"No GPU run of the suite is committed yet (`{source}` does not exist; "
                "`benchmarks/gpu_suite.sh` on a GPU machine writes it).")
    cols, rows = gpu_suite_cells(doc)
    align = "|".join(":---" if i in _TEXT_COLUMNS else "---:" for i in range(len(cols)))
    return "\n".join([gpu_suite_caption(doc), "", "| " + " | ".join(cols) + " |", f"|{align}|"]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def format_gpu_suite_text(doc: Mapping) -> str:
    """Plain text: caption, then the table with aligned columns (text left, numbers right)."""
    cols, rows = gpu_suite_cells(doc)
    width = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in _TEXT_COLUMNS else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, width))).rstrip()

    head = line(cols)
    return "\n".join([gpu_suite_caption(doc), head, "-" * len(head)] + [line(r) for r in rows])
