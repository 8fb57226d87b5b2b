"""Evaluation: LVIS federated AP (APr/APc/APf, AP-fixed, bbox and segm), COCO AP, results
files, per-class tables and plots; long-tail classification accuracy (many / medium / few).

Entry points::

    from taildet.evaluation import evaluate_lvis
    m = evaluate_lvis("lvis_v1_val.json", "results.json", iou_type="bbox")   # m["AP"], m["APr"]
    m = evaluate_lvis("lvis_v1_val.json", "results.json", fixed=True)        # AP-fixed

Numbers equal the official lvis-api's (see :mod:`taildet.evaluation.lvis_eval`). Undefined
numbers are NaN, written as ``null`` by :func:`save_metrics`.
"""

from taildet.evaluation.classification import long_tail_accuracy, shot_split
from taildet.evaluation.lvis_eval import evaluate_coco, evaluate_lvis
from taildet.evaluation.report import (
    eval_results_main,
    format_metrics_table,
    format_per_class_table,
    per_class_table,
    plot_per_class_ap,
)
from taildet.evaluation.results_io import (
    cap_per_image,
    load_results,
    save_metrics,
    save_results,
    top_k_per_class,
)

__all__ = [
    "cap_per_image",
    "eval_results_main",
    "evaluate_coco",
    "evaluate_lvis",
    "format_metrics_table",
    "format_per_class_table",
    "load_results",
    "long_tail_accuracy",
    "per_class_table",
    "plot_per_class_ap",
    "save_metrics",
    "save_results",
    "shot_split",
    "top_k_per_class",
]
