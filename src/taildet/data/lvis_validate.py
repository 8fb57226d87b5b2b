"""Validation of LVIS / COCO instance annotations: the id, RLE and segmentation checks (shared with
the evaluation's results reader), the frequency groups, and the checks of an instances file's
sections -- categories, images, and one annotation at a time (:func:`check_annotation`, the
definition of what is kept, skipped or an error). :func:`taildet.data.lvis_index.parse_lvis` runs
them over a whole file. The policy (what is an error, what ``skip_invalid`` drops) is in
:mod:`taildet.data.lvis`'s docstring."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from taildet.errors import DataError

if TYPE_CHECKING:  # the dataset class imports this module
    from taildet.data.lvis import LVISDataset

__all__ = ["BOX_TOLERANCE", "MAX_SAFE_ID", "federated_ids_problem", "frequency_group", "id_problem", "rle_counts_problem"]


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



def check_sections(path: str, data: dict, annotation_types: tuple = (list,)) -> None:
    """The three lists an instances file needs (``annotations`` may also be one of
    ``annotation_types``: the reader's packed form)."""
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(path, "top level", f"missing required key '{key}'")
        types = annotation_types if key == "annotations" else (list,)
        if not isinstance(data[key], types):
            raise DataError(path, key, f"expected a list, got {type(data[key]).__name__}")


def index_categories(ds: LVISDataset, cats_raw: list) -> dict[int, int]:
    """Check the categories and set ``ds.categories`` / ``cat_ids`` / ``cat_id_to_label`` /
    ``class_names`` / ``num_classes``; returns category id -> position in the file."""
    path = ds.path
    if not cats_raw:
        raise DataError(path, "categories", "no categories: the dataset is empty")
    seen_cat: dict[int, int] = {}
    for k, c in enumerate(cats_raw):
        _check_entry(path, "categories", "category", k, c, ("id", "name"), seen_cat)
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
    return seen_cat


def _check_entry(path: str, section: str, kind: str, k: int, entry: Any, keys: tuple[str, ...],
                 seen: dict[int, int]) -> None:
    """``section[k]`` (a category or image dict): an object with ``keys``, a valid id not seen
    before; records its position in ``seen``."""
    item = f"{section}[{k}]"
    if not isinstance(entry, dict):
        raise DataError(path, item, f"expected an object, got {type(entry).__name__}")
    for key in keys:
        if key not in entry:
            raise DataError(path, item, f"missing required key '{key}'")
    problem = id_problem(entry["id"], kind)
    if problem is not None:
        raise DataError(path, item, problem)
    if entry["id"] in seen:
        raise DataError(path, f"{kind} id {entry['id']}",
                        f"duplicate {kind} id ({section}[{seen[entry['id']]}] and {section}[{k}])")
    seen[entry["id"]] = k


def check_images(path: str, imgs_raw: list, seen_cat: dict) -> list[dict]:
    """Check the image dicts; returns them sorted by id."""
    if not imgs_raw:
        raise DataError(path, "images", "no images: the dataset is empty")
    seen_img: dict[int, int] = {}
    for k, im in enumerate(imgs_raw):
        _check_entry(path, "images", "image", k, im, ("id", "width", "height"), seen_img)
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
    return sorted(imgs_raw, key=lambda im: im["id"])


class AnnotationContext:
    """What :func:`check_annotation` needs to know besides the annotation: the file, the skip
    policy, the images (sorted ids, float widths / heights) and the categories."""

    def __init__(self, ds: LVISDataset, skip: _Skipper, image_ids: np.ndarray, widths: np.ndarray,
                 heights: np.ndarray):
        self.path, self.skip, self.with_masks = ds.path, skip, ds.with_masks
        self.cat_id_to_label = ds.cat_id_to_label
        self.image_ids, self.widths, self.heights = image_ids, widths, heights

    def image_index(self, image_id: Any) -> int | None:
        """Position of ``image_id`` among the sorted images, or None."""
        if not _is_int(image_id) or abs(image_id) > MAX_SAFE_ID:
            return None
        i = int(np.searchsorted(self.image_ids, image_id))
        return i if i < len(self.image_ids) and int(self.image_ids[i]) == image_id else None


def check_annotation(ctx: AnnotationContext, k: int, a: Any, first_index: int):
    """Check ``annotations[k]`` = ``a``, in the policy's order; ``first_index``: the position of
    the first annotation with ``a``'s id (any earlier one makes ``a`` a duplicate).

    Structural problems raise; the others go to ``ctx.skip`` (which raises unless skipping) and
    give ``(None, clipped)``. A kept annotation gives ``((image index, label, [x1, y1, x2, y2]
    clipped to the image, area or None, iscrowd), clipped)``. ``clipped``: the box stuck out by
    at most the tolerance (counted even when a later check skips the annotation).
    """
    path, skip = ctx.path, ctx.skip
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
    if first_index != k:
        raise DataError(path, item, f"duplicate annotation id (annotations[{first_index}] and annotations[{k}])")

    idx = ctx.image_index(a["image_id"])
    if idx is None:
        skip(item, "unknown image id", f"image_id {a['image_id']!r} is not in 'images'")
        return None, False
    cid = a["category_id"]
    if not _is_int(cid) or cid not in ctx.cat_id_to_label:
        skip(item, "unknown category id", f"category_id {cid!r} is not in 'categories'")
        return None, False
    bbox = a["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        skip(item, "malformed bbox", f"bbox must be a list of 4 numbers [x, y, w, h], got {bbox!r}")
        return None, False
    if not all(math.isfinite(v) for v in bbox):
        skip(item, "non-finite bbox", f"bbox {bbox} has NaN or infinite values")
        return None, False
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        skip(item, "non-positive box size", f"bbox {bbox} has width {w:g} and height {h:g}")
        return None, False
    image_id = int(ctx.image_ids[idx])
    W, H = float(ctx.widths[idx]), float(ctx.heights[idx])
    x1, y1, x2, y2 = x, y, x + w, y + h
    tol = BOX_TOLERANCE
    if x1 < -tol or y1 < -tol or x2 > W + tol or y2 > H + tol:
        skip(
            item, "box outside image",
            f"bbox {bbox} (xyxy [{x1:g}, {y1:g}, {x2:g}, {y2:g}]) extends more than "
            f"{tol:g} px beyond image id {image_id} of size {W:g}x{H:g} (WxH)",
        )
        return None, False
    cx1, cy1 = min(max(x1, 0.0), W), min(max(y1, 0.0), H)
    cx2, cy2 = min(max(x2, 0.0), W), min(max(y2, 0.0), H)
    if cx2 <= cx1 or cy2 <= cy1:
        skip(item, "box outside image", f"bbox {bbox} has no area inside image id {image_id} of size {W:g}x{H:g} (WxH)")
        return None, False
    clipped = (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
    if "area" in a and not (_is_number(a["area"]) and math.isfinite(a["area"]) and a["area"] >= 0):
        skip(item, "bad area", f"area must be a finite number >= 0, got {a['area']!r}")
        return None, clipped
    if "iscrowd" in a and a["iscrowd"] not in (0, 1):
        skip(item, "bad iscrowd", f"iscrowd must be 0 or 1, got {a['iscrowd']!r}")
        return None, clipped
    if ctx.with_masks:
        if "segmentation" not in a:
            skip(item, "bad segmentation", "no 'segmentation' but masks were requested")
            return None, clipped
        problem = _check_segmentation(a["segmentation"], int(H), int(W))
        if problem is not None:
            skip(item, "bad segmentation", problem)
            return None, clipped
    area = float(a["area"]) if _is_number(a.get("area")) else None
    return (idx, ctx.cat_id_to_label[cid], (cx1, cy1, cx2, cy2), area, int(a.get("iscrowd", 0))), clipped
