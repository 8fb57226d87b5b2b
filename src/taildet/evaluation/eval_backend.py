"""faster-coco-eval on results as lists of dicts: the detection fields it reads, the COCO objects,
one evaluator run, and the summary numbers read from its accumulated arrays (the way the lvis-api's
``_summarize`` reads them)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from taildet.errors import DataError

_NAN = float("nan")
_FREQS = ("r", "c", "f")


def _result_area(r: Mapping, use_bbox: bool) -> float:
    if use_bbox:
        return r["bbox"][2] * r["bbox"][3]
    from faster_coco_eval.core import mask as mask_utils  # optional: faster_coco_eval, imported on use

    return float(mask_utils.area(r["segmentation"]))


def _prepare_dets(results: list[dict], iou_type: str, drop_empty: bool) -> list[dict]:
    """Give results the fields faster-coco-eval reads (id, area, iscrowd), as ``loadRes`` /
    ``LVISResults`` would: the area is the box area when the first result has a box (also for
    segm), else the mask area. ``drop_empty`` drops area <= 0 (the lvis-api's ``get_ann_ids``)."""
    if not results:
        return []
    use_bbox = "bbox" in results[0]
    if iou_type == "segm" and use_bbox and any("bbox" not in r for r in results):
        from faster_coco_eval.core import mask as mask_utils  # optional: faster_coco_eval, imported on use

        for r in results:
            if "bbox" not in r:
                r["bbox"] = [float(v) for v in mask_utils.toBbox(r["segmentation"])]
    if iou_type == "segm" and any(isinstance(r["segmentation"]["counts"], list) for r in results):
        from faster_coco_eval.core import mask as mask_utils  # optional: faster_coco_eval, imported on use

        for r in results:  # uncompressed RLE -> compressed
            seg = r["segmentation"]
            if isinstance(seg["counts"], list):
                r["segmentation"] = mask_utils.frPyObjects(seg, *seg["size"])
    out = []
    for i, r in enumerate(results):
        r["id"] = i + 1
        r["area"] = _result_area(r, use_bbox)
        r["iscrowd"] = 0
        if drop_empty and not r["area"] > 0:
            continue
        out.append(r)
    if iou_type == "segm" and not use_bbox:
        from faster_coco_eval.core import mask as mask_utils  # optional: faster_coco_eval, imported on use

        for r in out:
            r["bbox"] = [float(v) for v in mask_utils.toBbox(r["segmentation"])]
    return out


def _federated_filter(dets: list[dict], gt_prep: Mapping) -> list[dict]:
    """Drop detections of a class neither annotated on the image nor in its ``neg_category_ids``
    (they are never evaluated). faster-coco-eval drops them too, but dropping them here saves
    work and avoids its crash on segm results whose image keeps no detection and has no GT."""
    known: dict[int, set] = {im["id"]: set(im["neg_category_ids"]) for im in gt_prep["images"]}
    for a in gt_prep["annotations"]:
        known[a["image_id"]].add(a["category_id"])
    return [d for d in dets if d["category_id"] in known[d["image_id"]]]


def _check_rle_sizes(results: list[dict], gt_prep: Mapping, file: str) -> None:
    sizes = {im["id"]: (int(im["height"]), int(im["width"])) for im in gt_prep["images"]}
    for i, r in enumerate(results):
        h, w = sizes[r["image_id"]]
        if tuple(r["segmentation"]["size"]) != (h, w):
            raise DataError(file, f"results[{i}]", f"RLE size {list(r['segmentation']['size'])} != "
                            f"image {r['image_id']} size [{h}, {w}]")


def _coco_objects(gt_prep: dict, dets: list[dict]):
    from faster_coco_eval import COCO  # optional: faster_coco_eval, imported on use

    quiet = lambda *a, **k: None  # noqa: E731
    coco_gt = COCO(gt_prep, print_function=quiet)
    coco_dt = COCO(print_function=quiet)
    coco_dt.dataset = {"images": gt_prep["images"], "categories": gt_prep["categories"],
                       "annotations": dets}
    coco_dt.createIndex()
    return coco_gt, coco_dt


def _run(coco_gt, coco_dt, iou_type: str, lvis_style: bool, max_dets: list[int]):
    from faster_coco_eval import COCOeval_faster  # optional: faster_coco_eval, imported on use

    quiet = lambda *a, **k: None  # noqa: E731
    ev = COCOeval_faster(coco_gt, coco_dt, iou_type, lvis_style=lvis_style, print_function=quiet)
    ev.params.maxDets = list(max_dets)
    ev.evaluate()
    ev.accumulate()
    return ev


def _mean_defined(x: np.ndarray) -> float:
    x = x[x > -1]
    return float(np.mean(x)) if x.size else _NAN


def _summaries(ev, cat_groups: Mapping[str, list[int]] | None) -> dict[str, Any]:
    """AP/AR numbers of an evaluator run at its largest maxDets (:func:`summaries`)."""
    return summaries(np.asarray(ev.eval["precision"])[..., -1], np.asarray(ev.eval["recall"])[..., -1],
                     ev.params, cat_groups)


def summaries(prec: np.ndarray, rec: np.ndarray, p, cat_groups: Mapping[str, list[int]] | None) -> dict[str, Any]:
    """AP/AR numbers from accumulated arrays (precision [T, R, K, A], recall [T, K, A]; ``p`` gives
    ``iouThrs``, ``areaRngLbl`` and ``catIds``), the way the lvis-api's ``_summarize`` reads them
    (mean over entries > -1), with NaN for 'undefined' instead of -1."""
    t50 = int(np.argmin(np.abs(p.iouThrs - 0.5)))
    t75 = int(np.argmin(np.abs(p.iouThrs - 0.75)))
    area = {lbl: i for i, lbl in enumerate(p.areaRngLbl)}
    out: dict[str, Any] = {
        "AP": _mean_defined(prec[:, :, :, area["all"]]),
        "AP50": _mean_defined(prec[t50, :, :, area["all"]]),
        "AP75": _mean_defined(prec[t75, :, :, area["all"]]),
        "APs": _mean_defined(prec[:, :, :, area["small"]]),
        "APm": _mean_defined(prec[:, :, :, area["medium"]]),
        "APl": _mean_defined(prec[:, :, :, area["large"]]),
    }
    if cat_groups is not None:
        for g in _FREQS:
            idx = cat_groups[g]
            out["AP" + g] = _mean_defined(prec[:, :, idx, area["all"]]) if idx else _NAN
    out["_AR"] = _mean_defined(rec[:, :, area["all"]])
    out["per_class_AP"] = {int(cid): _mean_defined(prec[:, :, k, area["all"]])
                           for k, cid in enumerate(p.catIds)}
    out["per_class_AP50"] = {int(cid): _mean_defined(prec[t50, :, k, area["all"]])  # error analysis's AP
                             for k, cid in enumerate(p.catIds)}
    return out


def _all_recalls(ev) -> dict[int, float]:
    """AR at each maxDets value (COCO: AR@1, AR@10, AR@100)."""
    rec = np.asarray(ev.eval["recall"])
    a = ev.params.areaRngLbl.index("all")
    return {int(m): _mean_defined(rec[:, :, a, j]) for j, m in enumerate(ev.params.maxDets)}
