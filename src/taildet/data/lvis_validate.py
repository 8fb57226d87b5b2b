"""Validation of LVIS / COCO instance annotations: the id, RLE and segmentation checks (shared with
the evaluation's results reader), the frequency groups, and :func:`parse_lvis`, which checks a whole
instances JSON and indexes it into an :class:`~taildet.data.lvis.LVISDataset`. The policy (what is
an error, what ``skip_invalid`` drops) is in :mod:`taildet.data.lvis`'s docstring."""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from taildet.errors import DataError

if TYPE_CHECKING:  # the dataset class imports this module
    from taildet.data.lvis import LVISDataset

__all__ = ["BOX_TOLERANCE", "MAX_SAFE_ID", "federated_ids_problem", "frequency_group", "id_problem", "parse_lvis",
           "rle_counts_problem"]


#: Largest id magnitude accepted for images, categories and annotations: evaluation (faster-coco-eval)
#: carries ids as float64, which holds every integer only up to 2**53; larger ids of different
#: images collide there and the evaluator fails or mixes them up.
MAX_SAFE_ID = 2**53 - 1

#: Boxes may extend this many pixels beyond the image border before they count as invalid.
BOX_TOLERANCE = 1.0

_MAX_EXAMPLES = 5


def id_problem(value: Any, what: str) -> str | None:
    """What is wrong with ``value`` as an ``what`` id (an integer within +-MAX_SAFE_ID), or None."""
    if not (isinstance(value, int) and not isinstance(value, bool)):
        return f"{what} id must be an integer, got {value!r}"
    if abs(value) > MAX_SAFE_ID:
        return (f"{what} id {value} is outside the supported range +-{MAX_SAFE_ID} (2**53 - 1: evaluation "
                "stores ids as 64-bit floats, which cannot tell larger ones apart); renumber the ids")
    return None


def frequency_group(image_count: int) -> str:
    """LVIS frequency group of a class seen in ``image_count`` training images.

    rare: 0-10 images (0 counts as rare), common: 11-100, frequent: more than 100.
    """
    if image_count <= 10:
        return "r"
    if image_count <= 100:
        return "c"
    return "f"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _Skipper:
    """Raises or records per-annotation problems, according to ``skip_invalid``."""

    def __init__(self, path: str, skip_invalid: bool):
        self.path = path
        self.skip_invalid = skip_invalid
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def __call__(self, item: str, reason: str, detail: str) -> None:
        if not self.skip_invalid:
            raise DataError(self.path, item, f"{reason}: {detail}")
        self.counts[reason] += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{item}: {reason}: {detail}")


def federated_ids_problem(image: dict, category_ids: Any) -> str | None:
    """What is wrong with an LVIS image's ``neg_category_ids`` / ``not_exhaustive_category_ids``
    (each must be a list of ids in ``category_ids``), or None."""
    for key in ("neg_category_ids", "not_exhaustive_category_ids"):
        if key not in image:
            continue
        ids = image[key]
        if not isinstance(ids, list) or not all(_is_int(v) for v in ids):
            return f"{key} must be a list of category ids, got {ids!r}"
        unknown = [v for v in ids if v not in category_ids]
        if unknown:
            return f"{key} has unknown category ids {unknown[:5]}"
    return None


#: Characters of a compressed (COCO) RLE string: 6-bit groups stored as chr(48 + value).
_RLE_CHARS = re.compile(r"^[0-o]*$")


def rle_counts_problem(counts: Any, height: int, width: int) -> str | None:
    """What is wrong with an RLE's ``counts`` for an ``height x width`` mask, or None.

    A list must hold non-negative integers summing to ``height * width``; a compressed string
    must be non-empty and use only the characters of COCO's encoding (pycocotools would read
    other bytes as garbage counts, or loop on them).
    """
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError:
            return "RLE 'counts' is not an ASCII string"
    if isinstance(counts, list):
        if not all(_is_int(v) and v >= 0 for v in counts):
            return "RLE 'counts' list must hold non-negative integers"
        if sum(counts) != height * width:
            return f"RLE 'counts' sum to {sum(counts)} pixels, the mask has {height}x{width} = {height * width}"
        return None
    if isinstance(counts, str):
        if not counts:
            return "RLE 'counts' is an empty string"
        if not _RLE_CHARS.match(counts):
            return "RLE 'counts' string has characters outside the compressed-RLE alphabet ('0'..'o')"
        return None
    return "RLE 'counts' must be a list or a string"


def _check_segmentation(seg: Any, height: int, width: int) -> str | None:
    """Return a problem description, or None when ``seg`` is a usable polygon list or RLE."""
    if isinstance(seg, list):
        if not seg:
            return "segmentation is an empty polygon list"
        for k, poly in enumerate(seg):
            if not isinstance(poly, list):
                return f"polygon {k} is not a list of coordinates"
            if len(poly) < 6 or len(poly) % 2:
                return f"polygon {k} has {len(poly)} coordinates; need an even number >= 6 (3 points)"
            if not all(_is_number(v) and math.isfinite(v) for v in poly):
                return f"polygon {k} has non-numeric or non-finite coordinates"
            xs, ys = poly[0::2], poly[1::2]
            if min(xs) < -1 or min(ys) < -1 or max(xs) > width + 1 or max(ys) > height + 1:
                return (f"polygon {k} extends beyond the {width}x{height} image (x {min(xs):g}..{max(xs):g}, "
                        f"y {min(ys):g}..{max(ys):g})")
        return None
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            return "RLE segmentation needs 'counts' and 'size'"
        size = seg["size"]
        if not (isinstance(size, list) and len(size) == 2 and list(size) == [height, width]):
            return f"RLE size {size} differs from the image size [{height}, {width}]"
        return rle_counts_problem(seg["counts"], height, width)
    return f"segmentation must be a polygon list or an RLE dict, got {type(seg).__name__}"



def parse_lvis(ds: LVISDataset, data: dict) -> None:
    """Check ``data`` (an LVIS / COCO instances JSON object read from ``ds.path``) and set the
    index attributes of ``ds`` (categories, images, per-image boxes and labels, counts, frequency
    groups, skipped / clipped annotations); the policy is the module docstring's of
    :mod:`taildet.data.lvis`."""
    path = ds.path
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(path, "top level", f"missing required key '{key}'")
        if not isinstance(data[key], list):
            raise DataError(path, key, f"expected a list, got {type(data[key]).__name__}")

    # ---- categories
    cats_raw = data["categories"]
    if not cats_raw:
        raise DataError(path, "categories", "no categories: the dataset is empty")
    seen_cat: dict[int, int] = {}
    for k, c in enumerate(cats_raw):
        item = f"categories[{k}]"
        if not isinstance(c, dict):
            raise DataError(path, item, f"expected an object, got {type(c).__name__}")
        for key in ("id", "name"):
            if key not in c:
                raise DataError(path, item, f"missing required key '{key}'")
        problem = id_problem(c["id"], "category")
        if problem is not None:
            raise DataError(path, item, problem)
        if c["id"] in seen_cat:
            raise DataError(
                path, f"category id {c['id']}",
                f"duplicate category id (categories[{seen_cat[c['id']]}] and categories[{k}])",
            )
        seen_cat[c["id"]] = k
        if "frequency" in c and c["frequency"] not in ("r", "c", "f"):
            raise DataError(
                path, f"category id {c['id']}",
                f"frequency must be 'r', 'c' or 'f', got {c['frequency']!r}",
            )
        if "image_count" in c and not (_is_int(c["image_count"]) and c["image_count"] >= 0):
            raise DataError(
                path, f"category id {c['id']}",
                f"image_count must be a non-negative integer, got {c['image_count']!r}",
            )
    ds.categories: list[dict] = sorted(cats_raw, key=lambda c: c["id"])
    ds.cat_ids: list[int] = [c["id"] for c in ds.categories]
    ds.cat_id_to_label: dict[int, int] = {cid: i for i, cid in enumerate(ds.cat_ids)}
    ds.class_names: list[str] = [str(c["name"]) for c in ds.categories]
    ds.num_classes: int = len(ds.categories)

    # ---- images
    imgs_raw = data["images"]
    if not imgs_raw:
        raise DataError(path, "images", "no images: the dataset is empty")
    seen_img: dict[int, int] = {}
    for k, im in enumerate(imgs_raw):
        item = f"images[{k}]"
        if not isinstance(im, dict):
            raise DataError(path, item, f"expected an object, got {type(im).__name__}")
        for key in ("id", "width", "height"):
            if key not in im:
                raise DataError(path, item, f"missing required key '{key}'")
        problem = id_problem(im["id"], "image")
        if problem is not None:
            raise DataError(path, item, problem)
        if im["id"] in seen_img:
            raise DataError(
                path, f"image id {im['id']}",
                f"duplicate image id (images[{seen_img[im['id']]}] and images[{k}])",
            )
        seen_img[im["id"]] = k
        for key in ("width", "height"):
            v = im[key]
            if not (_is_number(v) and math.isfinite(v) and v > 0 and float(v).is_integer()):
                raise DataError(
                    path, f"image id {im['id']}", f"{key} must be a positive integer, got {v!r}"
                )
        if "file_name" not in im and "coco_url" not in im:
            raise DataError(
                path, f"image id {im['id']}", "has neither 'file_name' nor 'coco_url'"
            )
        for key in ("file_name", "coco_url"):
            if key in im and not isinstance(im[key], str):
                raise DataError(path, f"image id {im['id']}", f"{key} must be a string, got {im[key]!r}")
        problem = federated_ids_problem(im, seen_cat)
        if problem is not None:
            raise DataError(path, f"image id {im['id']}", problem)
    ds.images: list[dict] = sorted(imgs_raw, key=lambda im: im["id"])
    ds.image_ids: list[int] = [im["id"] for im in ds.images]
    ds.num_images: int = len(ds.images)
    index_of = {iid: i for i, iid in enumerate(ds.image_ids)}

    # ---- annotations
    skip = _Skipper(path, ds.skip_invalid)
    anns_per_image: list[list[dict]] = [[] for _ in ds.images]
    boxes_per_image: list[list[list[float]]] = [[] for _ in ds.images]
    seen_ann: dict[Any, int] = {}
    clipped = 0
    tol = BOX_TOLERANCE
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise DataError(path, f"annotations[{k}]", f"expected an object, got {type(a).__name__}")
        if "id" not in a:
            raise DataError(path, f"annotations[{k}]", "missing required key 'id'")
        aid = a["id"]
        problem = id_problem(aid, "annotation")
        if problem is not None:
            raise DataError(path, f"annotations[{k}]", problem)
        item = f"annotation id {aid}"
        for key in ("image_id", "category_id", "bbox"):
            if key not in a:
                raise DataError(path, item, f"missing required key '{key}'")
        if aid in seen_ann:
            raise DataError(
                path, item, f"duplicate annotation id (annotations[{seen_ann[aid]}] and annotations[{k}])"
            )
        seen_ann[aid] = k

        idx = index_of.get(a["image_id"]) if _is_int(a["image_id"]) else None
        if idx is None:
            skip(item, "unknown image id", f"image_id {a['image_id']!r} is not in 'images'")
            continue
        cid = a["category_id"]
        if not _is_int(cid) or cid not in ds.cat_id_to_label:
            skip(item, "unknown category id", f"category_id {cid!r} is not in 'categories'")
            continue
        bbox = a["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            skip(item, "malformed bbox", f"bbox must be a list of 4 numbers [x, y, w, h], got {bbox!r}")
            continue
        if not all(math.isfinite(v) for v in bbox):
            skip(item, "non-finite bbox", f"bbox {bbox} has NaN or infinite values")
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            skip(item, "non-positive box size", f"bbox {bbox} has width {w:g} and height {h:g}")
            continue
        im = ds.images[idx]
        W, H = float(im["width"]), float(im["height"])
        x1, y1, x2, y2 = x, y, x + w, y + h
        if x1 < -tol or y1 < -tol or x2 > W + tol or y2 > H + tol:
            skip(
                item, "box outside image",
                f"bbox {bbox} (xyxy [{x1:g}, {y1:g}, {x2:g}, {y2:g}]) extends more than "
                f"{tol:g} px beyond image id {im['id']} of size {W:g}x{H:g} (WxH)",
            )
            continue
        cx1, cy1 = min(max(x1, 0.0), W), min(max(y1, 0.0), H)
        cx2, cy2 = min(max(x2, 0.0), W), min(max(y2, 0.0), H)
        if cx2 <= cx1 or cy2 <= cy1:
            skip(
                item, "box outside image",
                f"bbox {bbox} has no area inside image id {im['id']} of size {W:g}x{H:g} (WxH)",
            )
            continue
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            clipped += 1
        if "area" in a and not (_is_number(a["area"]) and math.isfinite(a["area"]) and a["area"] >= 0):
            skip(item, "bad area", f"area must be a finite number >= 0, got {a['area']!r}")
            continue
        if "iscrowd" in a and a["iscrowd"] not in (0, 1):
            skip(item, "bad iscrowd", f"iscrowd must be 0 or 1, got {a['iscrowd']!r}")
            continue
        if ds.with_masks:
            if "segmentation" not in a:
                skip(item, "bad segmentation", "no 'segmentation' but masks were requested")
                continue
            problem = _check_segmentation(a["segmentation"], int(H), int(W))
            if problem is not None:
                skip(item, "bad segmentation", problem)
                continue
        anns_per_image[idx].append(a)
        boxes_per_image[idx].append([cx1, cy1, cx2, cy2])

    ds.annotations_per_image: list[list[dict]] = anns_per_image
    ds._boxes: list[np.ndarray] = [
        np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes_per_image
    ]
    ds._labels: list[np.ndarray] = [
        np.asarray([ds.cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        for anns in anns_per_image
    ]
    ds.labels_per_image: list[np.ndarray] = [np.unique(lab) for lab in ds._labels]
    ds.num_annotations: int = sum(len(a) for a in anns_per_image)
    ds.clipped_boxes: int = clipped
    ds.skipped: dict[str, int] = dict(skip.counts)
    ds.skipped_examples: list[str] = list(skip.examples)

    C = ds.num_classes
    ds.instance_counts = np.bincount(
        np.concatenate(ds._labels) if ds._labels else np.zeros(0, np.int64), minlength=C
    ).astype(np.int64)
    ds.image_counts = np.bincount(
        np.concatenate(ds.labels_per_image), minlength=C
    ).astype(np.int64)
    ds.image_frequency = ds.image_counts.astype(np.float64) / float(ds.num_images)

    groups = []
    for label, c in enumerate(ds.categories):
        if "frequency" in c:
            groups.append(c["frequency"])
        elif "image_count" in c:
            groups.append(frequency_group(int(c["image_count"])))
        else:
            groups.append(frequency_group(int(ds.image_counts[label])))
    ds.frequency_groups: list[str] = groups

    if ds.skipped:
        total = sum(ds.skipped.values())
        by_reason = ", ".join(f"{r}: {n}" for r, n in sorted(ds.skipped.items()))
        warnings.warn(
            f"{path}: skipped {total} invalid annotation(s) ({by_reason}); "
            f"e.g. {ds.skipped_examples[0]}",
            stacklevel=4,
        )
