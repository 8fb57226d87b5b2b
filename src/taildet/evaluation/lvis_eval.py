"""LVIS federated AP (and COCO AP) through faster-coco-eval.

:func:`evaluate_lvis` gives the official lvis-api's numbers (LVIS v1 / v0.5 protocol) on the same
inputs, 3x faster, by running faster-coco-eval's C++ evaluator in ``lvis_style`` mode after doing
the steps faster-coco-eval leaves out:

1. results are validated (:func:`taildet.evaluation.results_io.load_results`);
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

Undefined numbers are ``NaN`` (the lvis-api says -1): AP of a category without ground truth,
APr when no rare category has ground truth, APs when there is no small object, and so on.

Frequency groups come from each GT category's ``frequency`` ("r"/"c"/"f"); when it is missing it
is derived from the category's ``image_count`` (rare 0-10 images, common 11-100, frequent > 100),
and when that is missing too from the number of images of the GT JSON that hold the category
(only meaningful when the GT is the training set).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from typing import Any, Mapping

import numpy as np

from taildet.data.lvis_validate import _check_segmentation, federated_ids_problem, id_problem
from taildet.errors import DataError
from taildet.evaluation.results_io import _is_int, _is_real, cap_per_image, load_results, top_k_per_class

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

_NAN = float("nan")
_FREQS = ("r", "c", "f")


def frequency_from_image_count(image_count: int) -> str:
    """LVIS group of a class seen in ``image_count`` training images: "r" for 0-10 (0 is rare),
    "c" for 11-100, "f" for more than 100 (the same rule as ``taildet.data``)."""
    if image_count <= 10:
        return "r"
    if image_count <= 100:
        return "c"
    return "f"


# --------------------------------------------------------------------------------------- GT
#: Box coordinates beyond this magnitude are rejected when the image has no width / height.
MAX_BOX_COORD = float(2**24)


def _box_problem(box: Any, image: Mapping | None) -> str | None:
    """What is wrong with a GT ``[x, y, w, h]``: not 4 finite numbers, w or h < 0, or absurd
    for its image -- reaching farther outside it than the image's own width / height (e.g. a
    width of 1e308, which would make every detection of the class a false positive)."""
    if (not isinstance(box, list) or len(box) != 4 or not all(_is_real(v) and math.isfinite(v) for v in box)
            or box[2] < 0 or box[3] < 0):
        return f"bbox must be [x, y, w, h] of finite numbers with w, h >= 0, got {box!r}"
    x, y, w, h = (float(v) for v in box)
    W = image.get("width") if image is not None else None
    H = image.get("height") if image is not None else None
    if _is_real(W) and _is_real(H) and math.isfinite(W) and math.isfinite(H) and W > 0 and H > 0:
        if x < -W or y < -H or x + w > 2 * W or y + h > 2 * H:
            return (f"bbox {box!r} reaches far outside image id {image['id']} of size {W:g}x{H:g} (WxH): "
                    f"more than the image's own size beyond its border")
    elif max(abs(x), abs(y), abs(x + w), abs(y + h)) > MAX_BOX_COORD:
        return f"bbox {box!r} has coordinates beyond +-{MAX_BOX_COORD:g} (and the image has no width / height)"
    return None


def load_gt(gt: str | os.PathLike | Mapping, name: str | None = None) -> tuple[dict, str]:
    """Read a GT JSON (or take a GT dict) and check the keys evaluation needs.

    Returns ``(dataset, file_name)``; the dataset is the parsed dict (not copied). ``name`` is
    the file name errors give for a GT dict (default ``<GT dict>``).
    """
    if isinstance(gt, Mapping):
        data, file = gt, name or "<GT dict>"
    else:
        file = str(gt)
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except (IsADirectoryError, UnicodeDecodeError) as e:
            raise DataError(file, "", f"not a JSON text file ({type(e).__name__})") from None
        except FileNotFoundError:
            raise DataError(file, "", "GT file not found") from None
        except json.JSONDecodeError as e:
            raise DataError(file, "", f"not valid JSON ({e})") from None
    if not isinstance(data, Mapping):
        raise DataError(file, "", "GT must be a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(file, "", f"missing or non-list top-level key '{key}'")
    images_by_id: dict = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, Mapping) or "id" not in im:
            raise DataError(file, f"images[{i}]", "an image needs an 'id'")
        problem = id_problem(im["id"], "image")
        if problem is not None:
            raise DataError(file, f"images[{i}]", problem)
        if im["id"] in images_by_id:
            raise DataError(file, f"images[{i}]", f"duplicate image id {im['id']}")
        images_by_id[im["id"]] = im
    image_ids = images_by_id
    cat_ids: set = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, Mapping) or "id" not in c:
            raise DataError(file, f"categories[{i}]", "a category needs an 'id'")
        problem = id_problem(c["id"], "category")
        if problem is not None:
            raise DataError(file, f"categories[{i}]", problem)
        if c["id"] in cat_ids:
            raise DataError(file, f"categories[{i}]", f"duplicate category id {c['id']}")
        cat_ids.add(c["id"])
        if "frequency" in c and c["frequency"] not in _FREQS:
            raise DataError(file, f"categories[{i}] (id {c['id']})",
                            f"frequency must be 'r', 'c' or 'f', got {c['frequency']!r}")
        if c.get("frequency") not in _FREQS and c.get("image_count") is not None and not _is_int(c["image_count"]):
            raise DataError(file, f"categories[{i}] (id {c['id']})",
                            f"image_count must be an integer, got {c['image_count']!r}")
    for i, im in enumerate(data["images"]):
        problem = federated_ids_problem(im, cat_ids)
        if problem is not None:
            raise DataError(file, f"images[{i}] (id {im['id']})", problem)
    ann_ids: set = set()
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, Mapping):
            raise DataError(file, f"annotations[{i}]", "an annotation must be a dict")
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in a:
                raise DataError(file, f"annotations[{i}]", f"missing key '{key}'")
        where = f"annotations[{i}] (id {a['id']})"
        problem = id_problem(a["id"], "annotation")
        if problem is not None:
            raise DataError(file, f"annotations[{i}]", problem)
        if a["id"] in ann_ids:
            raise DataError(file, where, f"duplicate annotation id {a['id']}")
        ann_ids.add(a["id"])
        if not _is_int(a["image_id"]) or a["image_id"] not in image_ids:
            raise DataError(file, where, f"unknown image_id {a['image_id']!r}")
        if not _is_int(a["category_id"]) or a["category_id"] not in cat_ids:
            raise DataError(file, where, f"unknown category_id {a['category_id']!r}")
        problem = _box_problem(a["bbox"], images_by_id.get(a["image_id"]))
        if problem is not None:
            raise DataError(file, where, problem)
        if "area" in a and not (_is_real(a["area"]) and math.isfinite(a["area"]) and a["area"] >= 0):
            raise DataError(file, where, f"area must be a finite number >= 0, got {a['area']!r}")
    return data, file  # type: ignore[return-value]


def check_gt(gt: str | os.PathLike | Mapping, iou_types=("bbox",), name: str | None = None) -> None:
    """Every check the evaluation of ``gt`` with ``iou_types`` makes, without evaluating: run it
    before training or inference, so a bad validation file fails at start-up and not after hours
    (training may skip a bad annotation with ``data.skip_invalid``; evaluation never does)."""
    data, file = load_gt(gt, name=name)
    lvis = is_lvis(data)
    for iou_type in iou_types:
        _prepare_gt(data, lvis=lvis, iou_type=iou_type, file=file)


def is_lvis(gt: Mapping) -> bool:
    """True for an LVIS-format GT: categories carry ``frequency`` or images ``neg_category_ids``."""
    return (any("frequency" in c for c in gt.get("categories", []))
            or any("neg_category_ids" in im for im in gt.get("images", [])))


def _frequencies(gt: Mapping) -> dict[int, str]:
    """Category id -> r/c/f (``frequency``, else ``image_count``, else images in this GT)."""
    counted: dict[int, int] | None = None
    out = {}
    for c in gt["categories"]:
        cid = int(c["id"])
        if c.get("frequency") in _FREQS:
            out[cid] = c["frequency"]
        elif c.get("image_count") is not None:
            out[cid] = frequency_from_image_count(int(c["image_count"]))
        else:
            if counted is None:
                per_cat = defaultdict(set)
                for a in gt["annotations"]:
                    per_cat[int(a["category_id"])].add(a["image_id"])
                counted = {k: len(v) for k, v in per_cat.items()}
            out[cid] = frequency_from_image_count(counted.get(cid, 0))
    return out


def _ann_area(a: Mapping) -> float:
    if a.get("area") is not None:
        return float(a["area"])
    bb = a["bbox"]
    return float(bb[2]) * float(bb[3])


def _prepare_gt(gt: Mapping, lvis: bool, iou_type: str, file: str) -> dict:
    """Shallow copies of the GT records in the form faster-coco-eval needs (never mutates ``gt``)."""
    freqs = _frequencies(gt) if lvis else {}
    cats = []
    for c in gt["categories"]:
        c = dict(c)
        c["id"] = int(c["id"])
        if lvis:
            c["frequency"] = freqs[c["id"]]
        cats.append(c)
    images = []
    for im in gt["images"]:
        im = dict(im)
        im["id"] = int(im["id"])
        if lvis:
            im["neg_category_ids"] = list(im.get("neg_category_ids") or [])
            im["not_exhaustive_category_ids"] = list(im.get("not_exhaustive_category_ids") or [])
        images.append(im)
    if iou_type == "segm":
        for im in images:
            if "height" not in im or "width" not in im:
                raise DataError(file, f"image id {im['id']}", "needs 'height' and 'width' for segm")
            for key in ("height", "width"):
                v = im[key]
                if not (_is_real(v) and math.isfinite(v) and v > 0 and float(v).is_integer()):
                    raise DataError(file, f"image id {im['id']}", f"{key} must be a positive integer, got {v!r}")
    sizes = {im["id"]: (int(im["height"]), int(im["width"])) for im in images} if iou_type == "segm" else {}
    anns = []
    for i, a in enumerate(gt["annotations"]):
        if iou_type == "segm":
            where = f"annotations[{i}] (id {a['id']})"
            if "segmentation" not in a:
                raise DataError(file, where, "missing 'segmentation' (needed for iou_type='segm')")
            problem = _check_segmentation(a["segmentation"], *sizes[a["image_id"]])
            if problem is not None:
                raise DataError(file, where, problem)
        a = dict(a)
        a["area"] = _ann_area(a)
        if lvis:
            # The lvis-api evaluates only annotations with 0 < area < inf and has no crowd flag.
            if not (0 < a["area"] < math.inf):
                continue
            a["iscrowd"] = 0
        else:
            a["iscrowd"] = int(a.get("iscrowd", 0))
        anns.append(a)
    return {"images": images, "annotations": anns, "categories": cats}


# ----------------------------------------------------------------------------------- results
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
    """AP/AR numbers from the accumulated arrays, the way the lvis-api's ``_summarize`` reads them
    (mean over entries > -1), with NaN for 'undefined' instead of -1."""
    p = ev.params
    prec = np.asarray(ev.eval["precision"])[..., -1]  # [T, R, K, A] at the largest maxDets
    rec = np.asarray(ev.eval["recall"])[..., -1]  # [T, K, A]
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
    return out


def _all_recalls(ev) -> dict[int, float]:
    """AR at each maxDets value (COCO: AR@1, AR@10, AR@100)."""
    rec = np.asarray(ev.eval["recall"])
    a = ev.params.areaRngLbl.index("all")
    return {int(m): _mean_defined(rec[:, :, a, j]) for j, m in enumerate(ev.params.maxDets)}


# ------------------------------------------------------------------------------------ public
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
        dict with ``AP, AP50, AP75, APs, APm, APl, APr, APc, APf`` and ``AR@300`` (average
        recall under the per-image cap in use: ``max_dets``, or none when ``fixed``) as
        fractions in [0, 1], ``NaN`` when undefined; ``per_class_AP`` {category id: AP, NaN for
        classes without GT}; ``num_images`` (GT images), ``num_results`` (results given),
        ``num_detections`` (detections evaluated: after the cap, without zero-area ones and
        without those the federated rule never looks at), ``iou_type``, ``fixed``,
        ``max_dets`` (``None`` when fixed).
    """
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
    ar = s.pop("_AR")
    metrics = {k: s[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")}
    metrics["AR@300"] = ar
    metrics["per_class_AP"] = s["per_class_AP"]
    metrics.update(num_images=len(gt_prep["images"]), num_results=num_results,
                   num_detections=len(dets), iou_type=iou_type, fixed=bool(fixed), max_dets=None if fixed else int(max_dets))
    return metrics


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
