"""LVIS / COCO ground truth for evaluation: reading and checking a GT JSON (:func:`load_gt`,
:func:`check_gt`), the frequency groups, and the records faster-coco-eval reads (:func:`_prepare_gt`)."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any, Mapping

from taildet.data.lvis_validate import _check_segmentation, federated_ids_problem, id_problem
from taildet.errors import DataError
from taildet.evaluation.results_io import _is_int, _is_real

__all__ = ["MAX_BOX_COORD", "check_gt", "frequency_from_image_count", "is_lvis", "load_gt"]

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
