"""LVIS federated evaluation of results held as columns, one group of categories at a time.

The federated protocol makes categories independent once each image keeps its ``max_dets``
best detections: the precision / recall curve of category c depends only on c's ground truth and
c's detections, image by image, in image-id order (faster-coco-eval, like the lvis-api, evaluates
each (image, category) pair on its own and accumulates each category over the images). So
:func:`evaluate_federated` runs faster-coco-eval on a few categories at a time -- with only the
images where those categories have ground truth or detections -- and writes each run's
per-category columns into the arrays one run over everything would give. The numbers are the
same to the bit (tests/test_evaluation_scale.py compares them with the one-run path), while a run
only ever holds its categories' detections as dicts and its (image, category) grid stays small:
one run over LVIS v1 val builds 19,809 x 1,203 cells, most of them empty.

Before that, the per-image cap (or AP-fixed's per-category top 10,000), the zero-area rule and the
federated filter are applied to the columns, in the lvis-api's order.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from taildet.evaluation.eval_backend import _FREQS, _coco_objects, _run, summaries
from taildet.evaluation.lvis_gt import _ann_area
from taildet.evaluation.pooled import pooled_matches
from taildet.evaluation.result_columns import GtIds, ResultColumns, cap_order, top_k_order

__all__ = ["PairIndex", "evaluate_federated"]

#: What one faster-coco-eval run costs beyond its cells, in cells of its (image, category) grid.
RUN_COST = 100
#: Detections of one run at most (its detections are dicts while it runs).
RUN_DETECTIONS = 300_000


class PairIndex(GtIds):
    """The GT's ids and the (image, category) pairs the federated protocol evaluates: the category is annotated on
    the image (an annotation with 0 < area < inf, as the lvis-api keeps) or in its
    ``neg_category_ids``. Built from a GT that passed :func:`~taildet.evaluation.lvis_gt.load_gt`."""

    def __init__(self, gt: Mapping):
        super().__init__(gt)
        img, cat = [], []
        for a in gt["annotations"]:
            if 0 < _ann_area(a) < math.inf:
                img.append(a["image_id"])
                cat.append(a["category_id"])
        for im in gt["images"]:
            neg = im.get("neg_category_ids") or []
            img += [im["id"]] * len(neg)
            cat += list(neg)
        self.keys = np.unique(self.key(np.array(img, dtype=np.int64), np.array(cat, dtype=np.int64)))

    def key(self, image_id: np.ndarray, category_id: np.ndarray) -> np.ndarray:
        """int64 key of each pair (ids must be the GT's)."""
        return (np.searchsorted(self.images, image_id) * len(self.categories)
                + np.searchsorted(self.categories, category_id))

    def known(self, image_id: np.ndarray, category_id: np.ndarray) -> np.ndarray:
        k = self.key(image_id, category_id)
        i = np.minimum(np.searchsorted(self.keys, k), max(len(self.keys) - 1, 0))
        return (self.keys[i] == k) if len(self.keys) else np.zeros(len(k), bool)


def _detections(cols: ResultColumns, pairs: PairIndex, iou_type: str, fixed: bool, max_dets: int,
                per_class: int) -> dict[str, Any]:
    """The detections evaluated, in the order of the capped list, with the fields faster-coco-eval
    reads (as ``_prepare_dets`` and ``_federated_filter`` give them on dicts)."""
    order = top_k_order(cols.category_id, cols.score, per_class) if fixed else cap_order(cols.image_id, cols.score, max_dets)
    img, cat = cols.image_id[order], cols.category_id[order]
    known = pairs.known(img, cat)  # the others are never evaluated: nothing below is needed for them
    has_bbox = cols.has_bbox[order]
    bbox = cols.bbox[order]
    use_bbox = bool(has_bbox[0]) if len(order) else True
    segm: list = []
    if iou_type == "segm":
        from faster_coco_eval.core import mask as mask_utils  # optional: faster_coco_eval, imported on use

        segm = [None] * len(order)
        todo = np.flatnonzero(known)
        for j in todo.tolist():
            seg = cols.segm[order[j]]
            if isinstance(seg["counts"], list):  # uncompressed RLE -> compressed
                seg = mask_utils.frPyObjects(seg, *seg["size"])
            segm[j] = seg
        if len(todo):
            boxed = todo if not use_bbox else todo[~has_bbox[todo]]  # as _prepare_dets: the masks' boxes
            if len(boxed):
                bbox[boxed] = np.asarray(mask_utils.toBbox([segm[j] for j in boxed.tolist()]), dtype=np.float64)
        if not use_bbox:
            area = np.zeros(len(order))
            if len(todo):
                area[todo] = np.asarray(mask_utils.area([segm[j] for j in todo.tolist()]), dtype=np.float64)
    if iou_type == "bbox" or use_bbox:
        area = bbox[:, 2] * bbox[:, 3]
    keep = np.flatnonzero(known & (area > 0))
    out = {"id": keep + 1, "image_id": img[keep], "category_id": cat[keep], "score": cols.score[order][keep],
           "area": area[keep], "bbox": bbox[keep]}
    if iou_type == "segm":
        out["segmentation"] = [segm[j] for j in keep.tolist()]
    return out


def _det_dicts(dets: Mapping, idx: np.ndarray, iou_type: str) -> list[dict]:
    cols = [dets[k][idx].tolist() for k in ("id", "image_id", "category_id", "score", "area", "bbox")]
    out = [{"id": i, "image_id": im, "category_id": c, "score": s, "area": a, "iscrowd": 0, "bbox": b}
           for i, im, c, s, a, b in zip(*cols)]
    if iou_type == "segm":
        for d, j in zip(out, idx.tolist()):
            d["segmentation"] = dets["segmentation"][j]
    return out


def _groups(ids: np.ndarray, cat_ids: np.ndarray) -> list[np.ndarray]:
    """Per category of ``cat_ids`` (sorted) the indices of ``ids`` equal to it, in input order."""
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.concatenate([cat_ids, [np.iinfo(np.int64).max]]))
    bounds[-1] = len(ids)
    return [order[bounds[k]:bounds[k + 1]] for k in range(len(cat_ids))]


def _runs(cat_ids: np.ndarray, gt_groups, det_groups, gt_img, det_img) -> list[list[int]]:
    """Groups of category indices (only those with ground truth), one faster-coco-eval run each.

    A run costs about RUN_COST (image, category) cells of its grid plus one cell per image of its
    images times its categories; categories are taken from the fewest images up, and one joins the
    current run while the cells that wastes (pairs without ground truth or detections of the
    category) cost less than the runs it saves.
    """
    sets = {k: set(gt_img[gt_groups[k]].tolist()) | set(det_img[det_groups[k]].tolist())
            for k in range(len(cat_ids)) if len(gt_groups[k])}  # no ground truth: -1, as in one run
    runs: list[list[int]] = []
    cur: list[int] = []
    images: set = set()
    need = ndet = 0
    for k in sorted(sets, key=lambda k: len(sets[k])):
        union = images | sets[k]
        waste = len(union) * (len(cur) + 1) - (need + len(sets[k]))
        if cur and (waste > RUN_COST * len(cur) or ndet + len(det_groups[k]) > RUN_DETECTIONS):
            runs.append(cur)
            cur, union, need, ndet = [], set(sets[k]), 0, 0
        cur.append(k)
        images, need, ndet = union, need + len(sets[k]), ndet + len(det_groups[k])
    if cur:
        runs.append(cur)
    return runs


def evaluate_federated(gt_prep: Mapping, cols: ResultColumns, pairs: PairIndex, iou_type: str, fixed: bool,
                       max_dets: int, per_class: int) -> tuple[dict[str, Any], int]:
    """LVIS summaries (:func:`~taildet.evaluation.eval_backend.summaries`, with ``_AR``, and
    ``APpool`` pooled over every run's categories: :mod:`taildet.evaluation.pooled`) of
    ``cols`` and the number of detections evaluated. ``max_dets``: the per-image cap, or with
    ``fixed`` the least per-(image, class) cap given to faster-coco-eval; ``per_class``: AP-fixed's
    detections per class."""
    from faster_coco_eval import COCOeval_faster  # optional: faster_coco_eval, imported on use

    dets = _detections(cols, pairs, iou_type, fixed, max_dets, per_class)
    cap = max_dets
    if fixed:  # large enough that faster-coco-eval's per-(image, class) cap never binds
        _, per_pair = np.unique(pairs.key(dets["image_id"], dets["category_id"]), return_counts=True)
        cap = max(max_dets, int(per_pair.max(initial=0)))
    anns = gt_prep["annotations"]
    cat_ids = np.array(sorted({c["id"] for c in gt_prep["categories"]}), dtype=np.int64)
    gt_cat = np.array([a["category_id"] for a in anns], dtype=np.int64)
    gt_img = np.array([a["image_id"] for a in anns], dtype=np.int64)
    gt_groups, det_groups = _groups(gt_cat, cat_ids), _groups(dets["category_id"], cat_ids)

    params = COCOeval_faster(None, None, iou_type, lvis_style=True).params
    T, R, A = len(params.iouThrs), len(params.recThrs), len(params.areaRngLbl)
    prec = np.full((T, R, len(cat_ids), A), -1.0)
    rec = np.full((T, len(cat_ids), A), -1.0)
    pooled = pooled_matches(gt_prep, dets["score"], dets["image_id"], dets["category_id"], pairs.key, params.iouThrs)
    images = {im["id"]: im for im in gt_prep["images"]}
    cats = {c["id"]: c for c in gt_prep["categories"]}
    for run in _runs(cat_ids, gt_groups, det_groups, gt_img, dets["image_id"]):
        gt_idx = np.sort(np.concatenate([gt_groups[k] for k in run]))
        det_idx = np.sort(np.concatenate([det_groups[k] for k in run]))
        img_ids = np.union1d(gt_img[gt_idx], dets["image_id"][det_idx]).tolist()
        run_gt = {"images": [images[i] for i in img_ids], "categories": [cats[int(cat_ids[k])] for k in run],
                  "annotations": [dict(anns[j]) for j in gt_idx.tolist()]}
        coco_gt, coco_dt = _coco_objects(run_gt, _det_dicts(dets, det_idx, iou_type))
        ev = _run(coco_gt, coco_dt, iou_type, lvis_style=True, max_dets=[cap])
        pooled.add_run(ev.ious, det_idx, pairs.key)
        where = np.searchsorted(cat_ids, np.asarray(ev.params.catIds, dtype=np.int64))
        prec[:, :, where, :] = np.asarray(ev.eval["precision"])[..., -1]
        rec[:, where, :] = np.asarray(ev.eval["recall"])[..., -1]
    params.catIds = cat_ids.tolist()
    freqs = {c["id"]: c["frequency"] for c in gt_prep["categories"]}
    groups = {g: [k for k, cid in enumerate(params.catIds) if freqs[cid] == g] for g in _FREQS}
    out = summaries(prec, rec, params, groups)
    out["APpool"] = pooled.ap(params.recThrs)
    return out, len(dets["score"])
