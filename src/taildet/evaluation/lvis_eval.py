"""LVIS federated AP (and COCO AP) through faster-coco-eval.

:func:`evaluate_lvis` gives the official lvis-api's numbers (LVIS v1 / v0.5 protocol) on the same
inputs, 3x faster, by running faster-coco-eval's C++ evaluator in ``lvis_style`` mode after doing
the steps faster-coco-eval leaves out:

1. results are validated (with :func:`taildet.evaluation.results_io.load_results`'s checks and
   errors);
2. each image keeps its ``max_dets`` (300) highest-scoring detections, as ``LVISResults`` does
   (faster-coco-eval only caps per image *and category*); with ``fixed=True`` (AP-fixed,
   Dave et al. 2021, the lvis-api's ``challenge2021`` result handling) there is no per-image cap
   and each category keeps its 10,000 highest-scoring detections over the whole dataset;
3. annotations and detections with area <= 0 are dropped, as the lvis-api's ``get_ann_ids``
   does (a zero-area box would otherwise count as a false positive).

Then the federated rules apply (faster-coco-eval, same as the lvis-api): a detection of class c
on image I is evaluated only when c is annotated on I or is in I's ``neg_category_ids``; an
unmatched detection of a class in I's ``not_exhaustive_category_ids`` is ignored. AP is the
101-point interpolated precision averaged over IoU 0.50:0.95 and over categories with at least one
ground-truth instance.

The work is done on numpy columns rather than a dict per detection, and faster-coco-eval runs
over a few categories at a time (:mod:`taildet.evaluation.federated`): the full LVIS v1 val
(5.9 M detections) fits in a few GB. The numbers are those of one run over everything to the bit
(``_evaluate_lvis_dicts``, kept as the reference), and equal the lvis-api's up to the last bit or
two of a float (faster-coco-eval computes precision as tp / (tp + fp), the lvis-api as
tp / (tp + fp + eps)).

Undefined numbers are ``NaN`` (the lvis-api says -1): AP of a category without ground truth,
APr when no rare category has ground truth, APs when there is no small object, and so on.

Frequency groups come from each GT category's ``frequency`` ("r"/"c"/"f"); when it is missing it
is derived from the category's ``image_count`` (rare 0-10 images, common 11-100, frequent > 100),
and when that is missing too from the number of images of the GT JSON that hold the category
(only meaningful when the GT is the training set).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Mapping

import numpy as np

from taildet.errors import DataError
from taildet.evaluation.eval_backend import (
    _all_recalls,
    _check_rle_sizes,
    _coco_objects,
    _federated_filter,
    _prepare_dets,
    _run,
    _summaries,
)
from taildet.evaluation.federated import PairIndex, evaluate_federated
from taildet.evaluation.pooled import pooled_matches
from taildet.evaluation.lvis_gt import (  # noqa: F401  (_box_problem, _frequencies: used by report and tests)
    _FREQS,
    MAX_BOX_COORD,
    _box_problem,
    _frequencies,
    _prepare_gt,
    check_gt,
    frequency_from_image_count,
    is_lvis,
    load_gt,
)
from taildet.evaluation.result_columns import ResultColumns, read_result_columns
from taildet.evaluation.results_io import cap_per_image, load_results, top_k_per_class

__all__ = [
    "AP_FIXED_DETS_PER_CLASS",
    "LVIS_MAX_DETS",
    "check_gt",
    "evaluate_coco",
    "evaluate_lvis",
    "frequency_from_image_count",
    "is_lvis",
    "load_gt",
]

#: Detections kept per image by the LVIS protocol.
LVIS_MAX_DETS = 300
#: Detections kept per category over the whole dataset by AP-fixed.
AP_FIXED_DETS_PER_CLASS = 10_000


def evaluate_lvis(gt_json_path: str | os.PathLike | Mapping, results: str | os.PathLike | list,
                  iou_type: str = "bbox", fixed: bool = False,
                  max_dets: int = LVIS_MAX_DETS, gt_name: str | None = None) -> dict[str, Any]:
    """LVIS federated evaluation, equal to the official lvis-api's numbers.

    Args:
        gt_json_path: LVIS GT JSON path (v1 or v0.5; a GT dict is accepted too).
        results: results JSON path or a list of result dicts (original category ids), see
            :mod:`taildet.evaluation.results_io`. Never modified.
        iou_type: ``"bbox"`` or ``"segm"`` (segm results carry an RLE ``segmentation``; GT
            polygons or RLE).
        fixed: AP-fixed: no per-image cap, each category's 10,000 best detections over the
            dataset (Dave et al. 2021; the lvis-api's ``challenge2021`` result handling, here
            with the ``iou_type`` asked for rather than boundary IoU).
        max_dets: the per-image cap of the standard protocol (300); ignored when ``fixed``.
        gt_name: the file name errors give when the GT is a dict (e.g. the file it was read from).

    Returns:
        dict with ``AP, AP50, AP75, APs, APm, APl, APr, APc, APf``, ``AR@300`` (average
        recall under the per-image cap in use: ``max_dets``, or none when ``fixed``) and
        ``APpool`` (every category's detections ranked together, Dave et al. 2021:
        :mod:`taildet.evaluation.pooled`; under the same cap, so with ``fixed`` it is the
        paper's) as fractions in [0, 1], ``NaN`` when undefined; ``per_class_AP`` {category id: AP, NaN for
        classes without GT}; ``num_images`` (GT images), ``num_results`` (results given),
        ``num_detections`` (detections evaluated: after the cap, without zero-area ones and
        without those the federated rule never looks at), ``iou_type``, ``fixed``,
        ``max_dets`` (``None`` when fixed).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', not {iou_type!r}")
    gt, gt_file = load_gt(gt_json_path, name=gt_name)
    return _evaluate_lvis(gt, gt_file, results, iou_type, fixed, max_dets)


def _evaluate_lvis(gt: Mapping, gt_file: str, results: str | os.PathLike | list, iou_type: str, fixed: bool,
                   max_dets: int) -> dict[str, Any]:
    """:func:`evaluate_lvis` of a GT that passed :func:`load_gt` (read from ``gt_file``)."""
    res_file = str(results) if isinstance(results, (str, os.PathLike)) else "<results list>"
    pairs = PairIndex(gt)
    cols = read_result_columns(results, pairs, iou_type, keep_segm=pairs.known if iou_type == "segm" else None)
    gt_prep = _prepare_gt(gt, lvis=True, iou_type=iou_type, file=gt_file)
    if iou_type == "segm":
        _check_rle_size_columns(cols, gt_prep, res_file)
    if not fixed and max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    s, num_detections = evaluate_federated(gt_prep, cols, pairs, iou_type, fixed, LVIS_MAX_DETS if fixed else max_dets,
                                           AP_FIXED_DETS_PER_CLASS)
    return _lvis_metrics(s, gt_prep, len(cols), num_detections, iou_type, fixed, max_dets)


def _lvis_metrics(s: dict, gt_prep: Mapping, num_results: int, num_detections: int, iou_type: str, fixed: bool,
                  max_dets: int) -> dict[str, Any]:
    ar = s.pop("_AR")
    metrics = {k: s[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")}
    metrics["AR@300"] = ar
    metrics["APpool"] = s["APpool"]
    metrics["per_class_AP"] = s["per_class_AP"]
    metrics.update(num_images=len(gt_prep["images"]), num_results=num_results, num_detections=num_detections,
                   iou_type=iou_type, fixed=bool(fixed), max_dets=None if fixed else int(max_dets))
    return metrics


def _check_rle_size_columns(cols: ResultColumns, gt_prep: Mapping, file: str) -> None:
    """``_check_rle_sizes`` on columns: the first result whose RLE size is not its image's."""
    ids = np.array([im["id"] for im in gt_prep["images"]], dtype=np.int64)
    hw = np.array([(int(im["height"]), int(im["width"])) for im in gt_prep["images"]], dtype=np.int64).reshape(-1, 2)
    order = np.argsort(ids)
    want = hw[order[np.searchsorted(ids, cols.image_id, sorter=order)]]
    bad = np.flatnonzero((cols.rle_size != want).any(axis=1))
    if len(bad):
        i = int(bad[0])
        h, w = want[i].tolist()
        raise DataError(file, f"results[{i}]", f"RLE size {cols.rle_size[i].tolist()} != "
                        f"image {int(cols.image_id[i])} size [{h}, {w}]")


def _evaluate_lvis_dicts(gt_json_path: str | os.PathLike | Mapping, results: str | os.PathLike | list,
                         iou_type: str = "bbox", fixed: bool = False,
                         max_dets: int = LVIS_MAX_DETS, gt_name: str | None = None) -> dict[str, Any]:
    """:func:`evaluate_lvis` the way taildet did it before issue 13: results as a list of dicts, one
    faster-coco-eval run over every image and category. Kept as the reference the columnar path is
    tested against (the same numbers to the bit); small inputs only."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', not {iou_type!r}")
    gt, gt_file = load_gt(gt_json_path, name=gt_name)
    res_file = str(results) if isinstance(results, (str, os.PathLike)) else "<results list>"
    dets = load_results(results, gt=gt, iou_type=iou_type)
    num_results = len(dets)
    gt_prep = _prepare_gt(gt, lvis=True, iou_type=iou_type, file=gt_file)
    if iou_type == "segm":
        _check_rle_sizes(dets, gt_prep, res_file)

    if fixed:
        dets = top_k_per_class(dets, AP_FIXED_DETS_PER_CLASS)
    else:
        if max_dets < 1:
            raise ValueError(f"max_dets must be >= 1, got {max_dets}")
        dets = cap_per_image(dets, max_dets)
    dets = _prepare_dets(dets, iou_type, drop_empty=True)
    dets = _federated_filter(dets, gt_prep)

    if fixed:
        # Large enough that faster-coco-eval's per-(image, class) cap never binds.
        per_pair = Counter((d["image_id"], d["category_id"]) for d in dets)
        cap = max([LVIS_MAX_DETS, *per_pair.values()])
    else:
        cap = max_dets
    coco_gt, coco_dt = _coco_objects(gt_prep, dets)
    ev = _run(coco_gt, coco_dt, iou_type, lvis_style=True, max_dets=[cap])

    freqs = {c["id"]: c["frequency"] for c in gt_prep["categories"]}
    groups = {g: [k for k, cid in enumerate(ev.params.catIds) if freqs[int(cid)] == g]
              for g in _FREQS}
    s = _summaries(ev, groups)
    pairs = PairIndex(gt)
    pooled = pooled_matches(gt_prep, np.array([d["score"] for d in dets], dtype=np.float64),
                            np.array([d["image_id"] for d in dets], dtype=np.int64),
                            np.array([d["category_id"] for d in dets], dtype=np.int64), pairs.key, ev.params.iouThrs)
    pooled.add_run(ev.ious, np.arange(len(dets)), pairs.key)
    s["APpool"] = pooled.ap(ev.params.recThrs)
    return _lvis_metrics(s, gt_prep, num_results, len(dets), iou_type, fixed, max_dets)


def evaluate_coco(gt_json_path: str | os.PathLike | Mapping, results: str | os.PathLike | list,
                  iou_type: str = "bbox", gt_name: str | None = None) -> dict[str, Any]:
    """COCO evaluation (non-federated, pycocotools semantics: at most 100 detections per image
    and category, crowd GT ignored) for COCO-format GT.

    Returns ``AP, AP50, AP75, APs, APm, APl, AR@1, AR@10, AR@100`` (fractions, NaN when
    undefined), ``per_class_AP`` {category id: AP or NaN}, ``num_images``, ``num_detections``,
    ``iou_type``.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', not {iou_type!r}")
    gt, gt_file = load_gt(gt_json_path, name=gt_name)
    res_file = str(results) if isinstance(results, (str, os.PathLike)) else "<results list>"
    dets = load_results(results, gt=gt, iou_type=iou_type)
    gt_prep = _prepare_gt(gt, lvis=False, iou_type=iou_type, file=gt_file)
    if iou_type == "segm":
        _check_rle_sizes(dets, gt_prep, res_file)
    dets = _prepare_dets(dets, iou_type, drop_empty=False)
    coco_gt, coco_dt = _coco_objects(gt_prep, dets)
    ev = _run(coco_gt, coco_dt, iou_type, lvis_style=False, max_dets=[1, 10, 100])
    s = _summaries(ev, None)
    s.pop("_AR")
    metrics = {k: s[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    for m, v in _all_recalls(ev).items():
        metrics[f"AR@{m}"] = v
    metrics["per_class_AP"] = s["per_class_AP"]
    metrics.update(num_images=len(gt_prep["images"]), num_detections=len(dets), iou_type=iou_type)
    return metrics
