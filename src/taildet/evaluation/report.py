"""Tables and plots of evaluation metrics, and the ``taildet eval-results`` helper.

* :func:`per_class_table` joins ``metrics["per_class_AP"]`` with the GT categories (name,
  frequency group, training image count).
* :func:`format_per_class_table` / :func:`format_metrics_table` render Markdown-compatible tables
  (numbers in percent with one decimal, ``-`` for undefined).
* :func:`plot_per_class_ap` draws per-class AP against training image count (log x axis), one
  colour per frequency group, with matplotlib's Agg backend (no display needed).
* :func:`eval_results_main` evaluates a results file, prints the tables and writes
  ``metrics.json``, ``per_class_ap.md`` and ``per_class_ap.png`` into an output folder.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from taildet.errors import DataError
from taildet.evaluation.lvis_eval import (
    LVIS_MAX_DETS,
    _evaluate_lvis,
    _frequencies,
    evaluate_coco,
    is_lvis,
    load_gt,
)
from taildet.evaluation.results_io import _atomic_write_text, save_metrics
from taildet.fileio import atomic_write, check_not_inputs, check_output_path

__all__ = [
    "eval_results_main",
    "format_metrics_table",
    "format_per_class_table",
    "per_class_table",
    "plot_per_class_ap",
]

_GROUP_NAME = {"r": "rare", "c": "common", "f": "frequent"}
_GROUP_COLOUR = {"r": "tab:red", "c": "tab:orange", "f": "tab:blue"}


def _pct(x: Any) -> str:
    if x is None:
        return "-"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "-" if math.isnan(x) else f"{100.0 * x:.1f}"


def per_class_table(metrics: Mapping, gt_json_path: str | os.PathLike | Mapping,
                    image_counts: Mapping[int, int] | None = None) -> list[dict]:
    """One row per GT category, in the GT's category order.

    Row keys: ``id``, ``name``, ``frequency`` (r/c/f; for a GT without one, derived as in
    :func:`taildet.evaluation.evaluate_lvis`; ``None`` for COCO GT), ``train_image_count``
    (``image_counts[id]`` when given, else the category's ``image_count`` when the GT has one,
    else the number of images of this GT holding the category), ``AP`` (NaN without GT).
    """
    gt, _ = load_gt(gt_json_path)
    return _per_class_rows(metrics, gt, image_counts)


def _per_class_rows(metrics: Mapping, gt: Mapping, image_counts: Mapping[int, int] | None) -> list[dict]:
    """:func:`per_class_table` of a GT that passed ``load_gt``."""
    per_class = {int(k): v for k, v in (metrics.get("per_class_AP") or {}).items()}
    freqs = _frequencies(gt) if is_lvis(gt) else {}
    counted: dict[int, int] | None = None
    rows = []
    for c in gt["categories"]:
        cid = int(c["id"])
        if image_counts is not None and cid in image_counts:
            n = int(image_counts[cid])
        elif c.get("image_count") is not None:
            n = int(c["image_count"])
        else:
            if counted is None:
                per_cat = defaultdict(set)
                for a in gt["annotations"]:
                    per_cat[int(a["category_id"])].add(a["image_id"])
                counted = {k: len(v) for k, v in per_cat.items()}
            n = counted.get(cid, 0)
        ap = per_class.get(cid)
        rows.append({"id": cid, "name": c.get("name", str(cid)), "frequency": freqs.get(cid),
                     "train_image_count": n,
                     "AP": float("nan") if ap is None else float(ap)})
    return rows


def format_per_class_table(rows: Sequence[Mapping], limit: int | None = None) -> str:
    """Markdown table of per-class rows (as given; ``limit`` keeps the first ``limit`` rows and
    says how many were left out)."""
    shown = list(rows) if limit is None else list(rows)[:max(limit, 0)]
    lines = ["| id | name | group | train images | AP |", "|---:|:---|:---:|---:|---:|"]
    for r in shown:
        lines.append(f"| {r['id']} | {r['name']} | {r.get('frequency') or '-'} | "
                     f"{r.get('train_image_count', '-')} | {_pct(r.get('AP'))} |")
    if len(shown) < len(rows):
        lines.append(f"| ... | ({len(rows) - len(shown)} more rows) | | | |")
    return "\n".join(lines)


def format_metrics_table(metrics_by_name: Mapping[str, Mapping],
                         keys: Sequence[str] = ("AP", "APr", "APc", "APf", "AP50")) -> str:
    """Markdown table, one row per named metrics dict, numbers in percent with one decimal
    (``-`` when undefined or absent)."""
    lines = ["| name | " + " | ".join(keys) + " |",
             "|:---|" + "|".join("---:" for _ in keys) + "|"]
    for name, m in metrics_by_name.items():
        lines.append(f"| {name} | " + " | ".join(_pct(m.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def plot_per_class_ap(rows: Sequence[Mapping], out_png: str | os.PathLike,
                      image_counts: Mapping[int, int] | None = None,
                      title: str | None = None) -> Path:
    """Scatter of per-class AP (percent) against training image count (log x axis), coloured by
    frequency group. ``image_counts`` (category id -> images in the TRAINING set) overrides the
    rows' ``train_image_count`` (which, read from a val JSON, counts val images). Classes with
    undefined AP or a count of 0 (not placeable on a log axis) are left out.
    """
    import matplotlib  # optional: matplotlib, imported on use

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # optional: matplotlib, imported on use
    from matplotlib.figure import Figure  # optional: matplotlib, imported on use

    pts: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        ap = r.get("AP")
        n = image_counts.get(r["id"]) if image_counts is not None else None
        if n is None:
            n = r.get("train_image_count")
        if ap is None or n is None or math.isnan(float(ap)) or n <= 0:
            continue
        pts[r.get("frequency")].append((float(n), 100.0 * float(ap)))

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for g in ("r", "c", "f", None):
        if not pts.get(g):
            continue
        xs, ys = zip(*pts[g])
        label = f"{_GROUP_NAME.get(g, 'all')} ({len(xs)})"
        ax.scatter(xs, ys, s=12, alpha=0.7, color=_GROUP_COLOUR.get(g, "tab:gray"), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel("AP (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, which="both", alpha=0.3)
    if pts:
        ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "per-class AP vs training images")
    fig.tight_layout()
    out_png = Path(out_png)
    atomic_write(out_png, lambda fh: fig.savefig(fh, dpi=120, format="png"))
    plt.close("all")
    return out_png


def _summary_lines(rows: Sequence[Mapping], k: int = 5) -> list[str]:
    with_gt = [r for r in rows if not math.isnan(r["AP"])]
    lines = [f"classes with ground truth: {len(with_gt)} of {len(rows)}"]
    by_group = defaultdict(list)
    for r in with_gt:
        by_group[r.get("frequency")].append(r["AP"])
    for g in ("r", "c", "f"):
        if g in by_group:
            v = by_group[g]
            zero = sum(1 for x in v if x == 0)
            lines.append(f"  {_GROUP_NAME[g]:>8}: {len(v)} classes, mean AP {_pct(sum(v) / len(v))}, "
                         f"{zero} at AP 0")
    ranked = sorted(with_gt, key=lambda r: (-r["AP"], r["id"]))
    if ranked:
        fmt = lambda r: f"{r['name']} ({_pct(r['AP'])})"  # noqa: E731
        lines.append("  best:  " + ", ".join(fmt(r) for r in ranked[:k]))
        lines.append("  worst: " + ", ".join(fmt(r) for r in ranked[::-1][:k]))
    return lines


def eval_results_main(gt: str | os.PathLike, results: str | os.PathLike | list,
                      iou_type: str = "bbox", fixed: bool = False,
                      out: str | os.PathLike | None = None,
                      image_counts: Mapping[int, int] | None = None,
                      print_fn=print) -> dict:
    """Evaluate a results file against a GT JSON and report.

    LVIS evaluation (:func:`evaluate_lvis`) when the GT is LVIS-format (categories with
    ``frequency`` or images with ``neg_category_ids``), COCO evaluation otherwise (``fixed`` is
    then an error). Prints the metrics table and a per-class summary; with ``out`` (a folder,
    created if needed) writes ``metrics.json``, ``per_class_ap.md`` and, for LVIS,
    ``per_class_ap.png``. Returns the metrics dict.
    """
    if out is not None:  # before any work: a bad --out is named before minutes of evaluation
        out = Path(out)
        check_output_path(out, directory=True, what="--out")
        inputs = {"ground truth": gt if not isinstance(gt, Mapping) else None,
                  "results file": results if isinstance(results, (str, os.PathLike)) else None}
        check_not_inputs({f"--out {n}": out / n for n in ("metrics.json", "per_class_ap.md", "per_class_ap.png")},
                         inputs)
    gt_data, gt_name = load_gt(gt)
    lvis = is_lvis(gt_data)
    if lvis:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_type must be 'bbox' or 'segm', not {iou_type!r}")
        metrics = _evaluate_lvis(gt_data, gt_name, results, iou_type=iou_type, fixed=fixed, max_dets=LVIS_MAX_DETS)
        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR@300", "APpool")
        name = f"{iou_type} AP-fixed" if fixed else iou_type
    else:
        if fixed:
            raise DataError(gt if not isinstance(gt, Mapping) else "<GT dict>", "",
                            "AP-fixed (--fixed) needs an LVIS-format GT (categories with 'frequency', "
                            "images with 'neg_category_ids'); this is COCO format")
        metrics = evaluate_coco(gt_data, results, iou_type=iou_type, gt_name=gt_name)
        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@100")
        name = f"{iou_type} (COCO)"
    metrics["protocol"] = "lvis" if lvis else "coco"
    print_fn(format_metrics_table({name: metrics}, keys=keys))
    print_fn(f"{metrics['num_detections']} detections evaluated on {metrics['num_images']} images")
    rows = _per_class_rows(metrics, gt_data, image_counts)
    for line in _summary_lines(rows):
        print_fn(line)
    if out is not None:
        save_metrics(metrics, out / "metrics.json")
        ranked = sorted(rows, key=lambda r: (math.isnan(r["AP"]), -r["train_image_count"], r["id"]))
        _atomic_write_text(format_per_class_table(ranked) + "\n", out / "per_class_ap.md")
        written = [out / "metrics.json", out / "per_class_ap.md"]
        if lvis:
            written.append(plot_per_class_ap(rows, out / "per_class_ap.png", image_counts=image_counts,
                                             title=f"per-class {name} AP"))
        print_fn("wrote " + ", ".join(str(p) for p in written))
    return metrics
