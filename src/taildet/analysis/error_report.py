"""Tables, figures and files of the error analysis (:func:`taildet.evaluation.error_analysis.error_breakdown`):
``taildet errors GT RESULTS`` (:func:`errors_main`) and the error-analysis section of compare's
report (:func:`compare_error_sections`). matplotlib is imported on use only (Agg backend)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from taildet.evaluation.error_analysis import ERROR_TYPES, error_breakdown
from taildet.evaluation.results_io import _atomic_write_text, save_metrics
from taildet.fileio import check_not_inputs, check_output_path

__all__ = ["ERROR_FILES", "compare_error_section", "compare_error_sections", "errors_main", "format_error_tables",
           "plot_confusion_pairs", "plot_error_breakdown", "write_error_files"]

#: What ``taildet errors --out DIR`` writes into DIR.
ERROR_FILES = ("errors.json", "errors.md", "errors_dap.png", "errors_pairs.png")
_GROUP_NAMES = {"all": "all", "r": "rare", "c": "common", "f": "frequent"}
_COLOURS = {"Cls": "#d62728", "Loc": "#ff7f0e", "Both": "#bcbd22", "Dupe": "#9467bd", "Bkg": "#1f77b4",
            "Missed": "#7f7f7f"}


def _pts(x: Any, digits: int = 2) -> str:
    """A fraction in points (percent), ``-`` when undefined."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100.0 * float(x):.{digits}f}"


def format_error_tables(report: Mapping, max_classes: int = 20) -> str:
    """Markdown: the dAP50 table (error types x frequency groups, with counts), the confusion shares
    by predicted group and for the rare classes (the ``max_classes`` with most false positives),
    and the costliest confusion pairs."""
    g = ("all", "r", "c", "f")
    lines = [f"AP50 ({report['iou_type']}, t_f = {report['fg_iou']}, t_b = {report['bg_iou']}): "
             + ", ".join(f"{_GROUP_NAMES[k]} {_pts(report['AP50'][k])}" for k in g)
             + f"; {report['num_detections']} detections analysed ({report['num_true_positives']} true positives, "
               f"{report['num_ignored']} ignored as not exhaustive), {report['num_gt']} GT.", "",
             "| error | count | dAP50 | dAP50 rare | dAP50 common | dAP50 frequent | count r / c / f |",
             "|:---|---:|---:|---:|---:|---:|:---:|"]
    for e in ERROR_TYPES:
        c, d = report["counts"][e], report["dAP50"][e]
        lines.append(f"| {e} | {c['all']} | {_pts(d['all'])} | {_pts(d['r'])} | {_pts(d['c'])} | {_pts(d['f'])} "
                     f"| {c['r']} / {c['c']} / {c['f']} |")
    conf = report["confusions"]
    lines += ["", "Share of each group's false positives that are confusions (Cls or Both) with a class of "
              "each group (percent):", "",
              "| predicted group | false positives | with frequent | with common | with rare |",
              "|:---|---:|---:|---:|---:|"]
    for k in ("r", "c", "f"):
        row = conf["by_group"][k]
        lines.append(f"| {_GROUP_NAMES[k]} | {row['false_positives']} | {_pts(row['share']['f'], 1)} | "
                     f"{_pts(row['share']['c'], 1)} | {_pts(row['share']['r'], 1)} |")
    rare = sorted((r for r in conf["per_class"] if r["group"] == "r"), key=lambda r: (-r["false_positives"], r["id"]))
    if rare:
        lines += ["", "Rare classes (most false positives first):", "",
                  "| rare class | false positives | with frequent | with common | with rare |",
                  "|:---|---:|---:|---:|---:|"]
        for r in rare[:max_classes]:
            lines.append(f"| {r['name']} ({r['id']}) | {r['false_positives']} | {_pts(r['share']['f'], 1)} | "
                         f"{_pts(r['share']['c'], 1)} | {_pts(r['share']['r'], 1)} |")
        if len(rare) > max_classes:
            lines.append(f"| ({len(rare) - max_classes} more rare classes) | | | | |")
    if report["pairs"]:
        lines += ["", "Costliest confusion pairs (cost: the overall AP50 the predicted class loses to them, "
                  "in points; gain: that class's own AP50 without them):", "",
                  "| predicted | true | confusions | gain (predicted class AP50) | cost (AP50) |",
                  "|:---|:---|---:|---:|---:|"]
        for p in report["pairs"]:
            lines.append(f"| {p['predicted_name']} ({p['predicted_group']}) | {p['true_name']} ({p['true_group']}) "
                         f"| {p['count']} | {_pts(p['gain'])} | {_pts(p['cost'], 3)} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib  # optional: matplotlib, a heavy dependency imported on use

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # optional: matplotlib, imported on use

    return plt


def plot_error_breakdown(report: Mapping, out_png: str | os.PathLike, title: str | None = None) -> Path:
    """Stacked bars: per frequency group (all / rare / common / frequent) the dAP50 of each error
    type, in points. Returns the path written."""
    plt = _pyplot()
    groups = ("all", "r", "c", "f")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    bottom = [0.0] * len(groups)
    for e in ERROR_TYPES:
        vals = [100.0 * float(report["dAP50"][e][g]) if not math.isnan(report["dAP50"][e][g]) else 0.0
                for g in groups]
        ax.bar([_GROUP_NAMES[g] for g in groups], vals, bottom=bottom, label=e, color=_COLOURS[e])
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylim(0, max(max(bottom) * 1.3, 1e-3))  # room for the legend
    ax.set_ylabel("dAP50 (points): AP50 gained by fixing the error type")
    ax.set_title(title or "error breakdown (TIDE types, LVIS federated AP50)")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_confusion_pairs(pairs: Sequence[Mapping], out_png: str | os.PathLike, title: str | None = None) -> Path:
    """Horizontal bars: the cost of each confusion pair (predicted <- true, with their groups), in
    AP50 points, costliest on top. Returns the path written."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 1.2 + 0.32 * max(len(pairs), 1)))
    labels = [f"{p['predicted_name']} ({p['predicted_group']}) <- {p['true_name']} ({p['true_group']})"
              for p in pairs][::-1]
    ax.barh(labels, [100.0 * p["cost"] for p in pairs][::-1], color="#d62728")
    if not pairs:
        ax.text(0.5, 0.5, "no confusions", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("cost: overall AP50 lost to the confusions (points)")
    ax.set_title(title or "costliest confusions (predicted <- true)", fontsize=10)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_error_files(report: Mapping, out: Path, title: str | None = None) -> list[Path]:
    """``errors.json``, ``errors.md`` and the two figures of ``report`` into the folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [save_metrics(report, out / "errors.json")]
    paths.append(_atomic_write_text(f"# {title or 'Error analysis'}\n\n{format_error_tables(report)}\n\n"
                                    "![dAP50 per error type](errors_dap.png)\n\n"
                                    "![costliest confusions](errors_pairs.png)\n", out / "errors.md"))
    paths.append(plot_error_breakdown(report, out / "errors_dap.png", title=title))
    paths.append(plot_confusion_pairs(report["pairs"], out / "errors_pairs.png"))
    return paths


def errors_main(gt: str | os.PathLike, results: str | os.PathLike, out: str | os.PathLike | None = None,
                iou_type: str = "bbox", top_pairs: int = 10, print_fn=print) -> dict:
    """``taildet errors``: the error breakdown of ``results`` on ``gt``, printed; with ``out`` (a
    folder, created if needed) also :data:`ERROR_FILES`. ``out`` is checked before any work and
    may not hold an input."""
    if out is not None:
        out = Path(out)
        check_output_path(out, directory=True, what="--out")
        check_not_inputs({f"--out {n}": out / n for n in ERROR_FILES}, {"ground truth": gt, "results file": results})
    report = error_breakdown(gt, results, iou_type=iou_type, top_pairs=top_pairs)
    print_fn(format_error_tables(report))
    if out is not None:
        written = write_error_files(report, out, title=f"Error analysis of {Path(results).name}")
        print_fn("wrote " + ", ".join(str(p) for p in written))
    return report


def _recipe_report(out_dir: Path, replicate: str, recipe: str, val_json: str | os.PathLike) -> dict | None:
    """The error analysis of ``out_dir/replicate/recipe/results_bbox.json`` with its files written into
    ``out_dir/replicate/errors_<recipe>/``; ``None`` when the run has no results file."""
    results = out_dir / replicate / recipe / "results_bbox.json"
    if not results.exists():
        return None
    report = error_breakdown(val_json, results, top_pairs=5)
    write_error_files(report, out_dir / replicate / f"errors_{recipe}", title=f"Error analysis: {recipe} ({replicate})")
    return report


def _recipe_lines(report: Mapping, replicate: str, recipe: str) -> list[str]:
    rel = f"{replicate}/errors_{recipe}"
    return [f"#### Error analysis: {recipe}", "", format_error_tables(report, max_classes=5), "",
            f"![dAP50 {recipe}]({rel}/errors_dap.png) ![confusions {recipe}]({rel}/errors_pairs.png)", ""]


def compare_error_section(out_dir: str | os.PathLike, replicate: str, recipe: str,
                          val_json: str | os.PathLike) -> list[str]:
    """Report lines of one compare recipe: its error analysis (run on
    ``out_dir/replicate/recipe/results_bbox.json``, files in ``out_dir/replicate/errors_<recipe>/``),
    the tables and links to the figures; no lines when the run has no results file."""
    report = _recipe_report(Path(out_dir), replicate, recipe, val_json)
    return [] if report is None else _recipe_lines(report, replicate, recipe)


def compare_error_sections(out_dir: str | os.PathLike, replicate: str, recipes: Sequence[str],
                           val_json: str | os.PathLike) -> list[str]:
    """Compare's error-analysis section: one table of every recipe with a results file (AP50 and the
    rare classes' dAP50 per error type, and the share of the rare classes' false positives that
    are confusions with a frequent class), then each recipe's own tables and figures."""
    reports = {}
    for recipe in recipes:
        report = _recipe_report(Path(out_dir), replicate, recipe, val_json)
        if report is not None:
            reports[recipe] = report
    if not reports:
        return []
    lines = [f"## Error analysis ({replicate}; TIDE error types, AP50, `taildet errors`)", "",
             "dAP50 on the rare classes per error type (points), and the share of the rare classes' false "
             "positives that are confusions with a frequent class:", "",
             "| recipe | AP50 | AP50 rare | " + " | ".join(ERROR_TYPES) + " | rare FP on frequent (%) |",
             "|:---|---:|---:|" + "---:|" * len(ERROR_TYPES) + "---:|"]
    for recipe, r in reports.items():
        lines.append(f"| {recipe} | {_pts(r['AP50']['all'])} | {_pts(r['AP50']['r'])} | "
                     + " | ".join(_pts(r["dAP50"][e]["r"]) for e in ERROR_TYPES)
                     + f" | {_pts(r['confusions']['by_group']['r']['share']['f'], 1)} |")
    lines.append("")
    for recipe, r in reports.items():
        lines += _recipe_lines(r, replicate, recipe)
    return lines
