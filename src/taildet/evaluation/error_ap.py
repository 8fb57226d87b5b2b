"""Per-class AP50 of chosen classes with the federated evaluator's runs (for the error analysis's
oracle fixes, :mod:`taildet.evaluation.error_analysis`).

Under the federated protocol a class's AP depends only on its own ground truth and detections
(:mod:`taildet.evaluation.federated`), so an oracle fix that changes the lists of a few classes
needs only those classes evaluated again; every other class keeps its AP. And AP50 needs only the
IoU threshold 0.5: faster-coco-eval matches and accumulates each threshold on its own, so a run
with ``iouThrs = [0.5]`` gives the same AP50 as the 10-threshold run (tested equal to
:func:`~taildet.evaluation.federated.evaluate_federated`'s ``per_class_AP50``). The runs are the
evaluator's (:func:`~taildet.evaluation.federated._runs`: a few categories at a time, only their
images), without APpool and the other summaries.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from taildet.evaluation.eval_backend import _coco_objects
from taildet.evaluation.federated import PairIndex, _det_dicts, _detections, _groups, _runs
from taildet.evaluation.lvis_eval import AP_FIXED_DETS_PER_CLASS, LVIS_MAX_DETS
from taildet.evaluation.result_columns import ResultColumns

__all__ = ["per_class_ap50"]


def per_class_ap50(gt_prep: Mapping, cols: ResultColumns, pairs: PairIndex, iou_type: str,
                   classes: Iterable[int] | None = None) -> dict[int, float]:
    """{category id: AP50} of ``classes`` (default: every GT category), NaN for a class without
    ground truth, as ``evaluate_federated(gt_prep, cols, pairs, iou_type, False, 300, ...)``
    gives them in ``per_class_AP50`` (the same per-image cap, zero-area and federated rules)."""
    from faster_coco_eval import COCOeval_faster  # optional: faster_coco_eval, imported on use

    cat_ids = np.array(sorted({c["id"] for c in gt_prep["categories"]}), dtype=np.int64)
    wanted = cat_ids if classes is None else np.intersect1d(cat_ids, np.fromiter(classes, dtype=np.int64))
    out = {int(c): float("nan") for c in wanted}
    if not len(wanted):
        return out
    dets = _detections(cols, pairs, iou_type, False, LVIS_MAX_DETS, AP_FIXED_DETS_PER_CLASS)
    keep = np.isin(dets["category_id"], wanted)
    dets = {k: (v[keep] if isinstance(v, np.ndarray) else [x for x, t in zip(v, keep.tolist()) if t])
            for k, v in dets.items()}
    anns = gt_prep["annotations"]
    gt_cat = np.array([a["category_id"] for a in anns], dtype=np.int64)
    gt_img = np.array([a["image_id"] for a in anns], dtype=np.int64)
    gt_groups, det_groups = _groups(gt_cat, wanted), _groups(dets["category_id"], wanted)
    images = {im["id"]: im for im in gt_prep["images"]}
    cats = {c["id"]: c for c in gt_prep["categories"]}
    quiet = lambda *a, **k: None  # noqa: E731
    for run in _runs(wanted, gt_groups, det_groups, gt_img, dets["image_id"]):
        gt_idx = np.sort(np.concatenate([gt_groups[k] for k in run]))
        det_idx = np.sort(np.concatenate([det_groups[k] for k in run]))
        img_ids = np.union1d(gt_img[gt_idx], dets["image_id"][det_idx]).tolist()
        run_gt = {"images": [images[i] for i in img_ids], "categories": [cats[int(wanted[k])] for k in run],
                  "annotations": [dict(anns[j]) for j in gt_idx.tolist()]}
        coco_gt, coco_dt = _coco_objects(run_gt, _det_dicts(dets, det_idx, iou_type))
        ev = COCOeval_faster(coco_gt, coco_dt, iou_type, lvis_style=True, print_function=quiet)
        ev.params.maxDets = [LVIS_MAX_DETS]
        ev.params.iouThrs = np.array([0.5])
        ev.evaluate()
        ev.accumulate()
        prec = np.asarray(ev.eval["precision"])[0, :, :, ev.params.areaRngLbl.index("all"), -1]  # [R, K]
        for k, cid in enumerate(ev.params.catIds):
            p = prec[:, k]
            p = p[p > -1]
            out[int(cid)] = float(np.mean(p)) if p.size else float("nan")
    return out
