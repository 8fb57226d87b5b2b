"""The error analysis of compared recipes over every replicate: one table, mean +- sd over seeds.

``taildet errors-table GT COMPARE_DIR --recipes a,b --json OUT`` runs
:func:`taildet.evaluation.error_analysis.error_breakdown` on ``COMPARE_DIR/<replicate>/<recipe>/
results_bbox.json`` for every replicate folder (``seed<s>``, ``data<d>_seed<s>``) that has one, and
writes a measured-tables summary (:func:`taildet.results_docs.write_table_summary`) that the docs
name in a ``table`` block, so the error analysis behind a claim is generated, never typed.

Columns (points of AP50, mean +- sample standard deviation over the ``n`` replicates):
AP50 overall and on the rare classes; dAP50 of each TIDE error type overall; dAP50 of the
classification errors on the rare and on the frequent classes; the number of detections the
analysis saw (after the per-image cap and the federated rule); the percentage of the rare
classes' false positives that are confusions with a frequent class.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from taildet.errors import DataError
from taildet.evaluation.error_analysis import ERROR_TYPES, error_breakdown
from taildet.fileio import check_not_inputs, check_output_path
from taildet.results_docs import write_table_summary

__all__ = ["COLUMNS", "replicate_dirs", "error_rows", "errors_table_main"]

def _dap_all(error: str, report: Mapping) -> float:
    return 100.0 * report["dAP50"][error]["all"]


_REPLICATE = re.compile(r"^(data\d+_)?seed\d+$")

#: (column title, function of one error_breakdown report -> value in points or a count).
COLUMNS: tuple[tuple[str, Callable[[Mapping], float]], ...] = (
    ("AP50", lambda r: 100.0 * r["AP50"]["all"]),
    ("AP50 rare", lambda r: 100.0 * r["AP50"]["r"]),
    *((f"dAP50 {e}", partial(_dap_all, e)) for e in ERROR_TYPES),
    ("dAP50 Cls rare", lambda r: 100.0 * r["dAP50"]["Cls"]["r"]),
    ("dAP50 Cls frequent", lambda r: 100.0 * r["dAP50"]["Cls"]["f"]),
    ("detections", lambda r: float(r["num_detections"])),
    ("rare FP on frequent (%)", lambda r: 100.0 * r["confusions"]["by_group"]["r"]["share"]["f"]),
)


def replicate_dirs(compare_dir: str | os.PathLike) -> list[Path]:
    """The replicate folders of a ``taildet compare`` output, sorted by name."""
    root = Path(compare_dir)
    if not root.is_dir():
        raise DataError(str(root), "compare directory", "not found (the output folder of `taildet compare`)")
    return sorted(p for p in root.iterdir() if p.is_dir() and _REPLICATE.match(p.name))


def _mean_sd(values: Sequence[float]) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.fmean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def error_rows(gt: str | os.PathLike, compare_dir: str | os.PathLike, recipes: Sequence[str],
               analyse: Callable[..., Mapping] = error_breakdown, progress: Callable[[str], Any] | None = None
               ) -> list[list[Any]]:
    """One row per recipe: ``[recipe, n, mean +- sd of each of COLUMNS]`` over the replicates that have
    ``<recipe>/results_bbox.json``. A recipe with no results in any replicate is an error naming it."""
    reps = replicate_dirs(compare_dir)
    rows = []
    for recipe in recipes:
        files = [d / recipe / "results_bbox.json" for d in reps if (d / recipe / "results_bbox.json").is_file()]
        if not files:
            raise DataError(str(compare_dir), f"recipe {recipe!r}",
                            f"no replicate has {recipe}/results_bbox.json (replicates: "
                            f"{', '.join(d.name for d in reps) or 'none'})")
        reports = []
        for f in files:
            if progress is not None:
                progress(f"error analysis: {f.parent.parent.name}/{recipe}")
            reports.append(analyse(gt, f, top_pairs=0))
        rows.append([recipe, len(reports)] + [_mean_sd([fn(r) for r in reports]) for _, fn in COLUMNS])
    return rows


def errors_table_main(gt: str | os.PathLike, compare_dir: str | os.PathLike, recipes: Sequence[str],
                      json_out: str | os.PathLike, command: str, print_fn=print) -> Path:
    """``taildet errors-table``: :func:`error_rows` printed and written to ``json_out`` (a
    measured-tables file, table name ``errors``). The output is checked before any work."""
    json_out = Path(json_out)
    check_output_path(json_out, what="--json")
    check_not_inputs({"--json": json_out}, {"ground truth": gt})
    if not Path(gt).is_file():
        raise DataError(str(gt), "ground truth", "file not found")
    rows = error_rows(gt, compare_dir, recipes, progress=print_fn)
    columns = ["recipe", "n"] + [c for c, _ in COLUMNS]
    table = {"columns": columns, "formats": ["s", "d"] + ["s"] * len(COLUMNS), "rows": rows}
    path = write_table_summary(json_out, f"Error analysis over replicates of {Path(compare_dir).name}",
                               {"errors": table}, command)
    print_fn("| " + " | ".join(columns) + " |")
    for row in rows:
        print_fn("| " + " | ".join(str(v) for v in row) + " |")
    print_fn(f"wrote {path}")
    return path
