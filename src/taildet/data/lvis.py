"""LVIS / COCO instance annotations: reader, validation and the dataset object.

``load_lvis(path)`` reads an LVIS (v0.5 / v1) or COCO instances JSON, checks it, and returns an
:class:`LVISDataset` whose items are ``(image, target)`` pairs in the format torchvision detectors
take: ``image`` float32 ``[3, H, W]`` in ``[0, 1]``; ``target["boxes"]`` absolute ``xyxy``,
``target["labels"]`` contiguous ``0..C-1`` (LVIS category ids are mapped here, at the data
boundary; ``ds.cat_ids[label]`` maps back).

Validation policy (every error is a :class:`taildet.errors.DataError` naming the file, the item and
the problem):

* structural problems are always errors: unreadable file, invalid JSON, a missing top-level key,
  a missing per-item key, duplicate ids, an id that is not an integer within +-(2**53 - 1)
  (:data:`MAX_SAFE_ID`), an image without a positive width/height, an empty ``images`` or
  ``categories`` list, a category ``frequency`` that is not ``r``/``c``/``f``;
* per-annotation problems (unknown image id, unknown category id, malformed / non-finite bbox,
  non-positive box width or height, box outside the image beyond a 1 px tolerance, an ``area``
  that is not a finite number >= 0, malformed segmentation when masks are requested) raise by
  default; with ``skip_invalid=True`` the
  annotation is dropped, counted in ``ds.skipped[reason]`` and one warning summarises them.

Boxes that stick out of the image by at most 1 px (rounding in real LVIS/COCO) are clipped to the
image and counted in ``ds.clipped_boxes``.

Crowd annotations (``iscrowd=1``) are kept in the target with ``iscrowd=1``; the models decide what
to do with them. They count towards ``image_counts`` / ``instance_counts`` like any annotation.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from typing import Any, Callable, Iterable

import numpy as np
import torch
from PIL import Image

from taildet.errors import DataError

__all__ = [
    "BOX_TOLERANCE",
    "LVISDataset",
    "check_same_categories",
    "frequency_group",
    "image_path",
    "load_lvis",
]

#: Boxes may extend this many pixels beyond the image border before they count as invalid.
BOX_TOLERANCE = 1.0

_MAX_EXAMPLES = 5

#: Largest id magnitude accepted for images, categories and annotations: evaluation (faster-coco-eval)
#: carries ids as float64, which holds every integer only up to 2**53; larger ids of different
#: images collide there and the evaluator fails or mixes them up.
MAX_SAFE_ID = 2**53 - 1


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


def _read_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(path, "", f"cannot read annotation file: {e.strerror or e}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno} column {e.colno}", f"invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, "", f"not a UTF-8 JSON file: {e}") from None
    if not isinstance(data, dict):
        raise DataError(path, "top level", f"expected a JSON object, got {type(data).__name__}")
    return data


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


def _decode_mask(seg: Any, height: int, width: int, box_xyxy: np.ndarray) -> np.ndarray:
    """Decode one polygon list / RLE into a uint8 ``[H, W]`` mask.

    A polygon too thin to cover any pixel centre decodes to nothing in pycocotools; rather than
    return an empty mask for an object that exists, the pixel under the box centre is set.
    """
    from pycocotools import mask as mask_utils  # optional: pycocotools, imported on use

    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
        m = mask_utils.decode(rle)
        if not m.any():
            cx = int(min(max((box_xyxy[0] + box_xyxy[2]) / 2, 0), width - 1))
            cy = int(min(max((box_xyxy[1] + box_xyxy[3]) / 2, 0), height - 1))
            m[cy, cx] = 1
        return m.astype(np.uint8)
    if isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(np.uint8)


def _to_rgb8(img: Image.Image) -> np.ndarray:
    """An opened image as uint8 ``[H, W, 3]``.

    16-bit grey images (PNG ``I;16``; Pillow opens 16-bit colour PNGs as 8-bit RGB itself) are
    scaled to 8 bit (``v * 255 / 65535``, rounded): ``convert("RGB")`` would clip every value
    above 255 to white. 32-bit integer and float images have no defined range: a DataError.
    """
    if img.mode.startswith("I;16"):
        v = np.asarray(img).astype(np.uint32)
        grey = ((v * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise DataError("image", "", f"{kind} image (mode {img.mode}) has no defined pixel range; "
                        "save it as 8- or 16-bit")
    return np.array(img.convert("RGB"), dtype=np.uint8)


class LVISDataset(torch.utils.data.Dataset):
    """An LVIS/COCO instances file, checked and indexed. Build it with :func:`load_lvis`.

    Attributes (public API):
        path, image_root: the annotation file and the image directory.
        num_classes: C. Labels are contiguous ``0..C-1`` in category-id order.
        categories: category dicts in label order. cat_ids: label -> category id.
        cat_id_to_label: category id -> label. class_names: label -> name.
        frequency_groups: 'r'/'c'/'f' per label (the file's ``frequency`` field, else its
            ``image_count`` field, else computed from this file's annotations).
        image_counts, instance_counts: np.int64 [C], counted from this file's kept annotations.
        image_frequency: np.float64 [C] = image_counts / num_images (f_c).
        num_images, num_annotations: after skipping.
        images: image dicts sorted by id (``neg_category_ids`` / ``not_exhaustive_category_ids``
            untouched). image_ids: their ids.
        labels_per_image: np.int64 array of the unique labels in each image (dataset order).
        annotations_per_image: the kept annotation dicts per image (unmodified JSON objects).
        skipped: reason -> count of skipped annotations; skipped_examples: a few messages.
        clipped_boxes: number of boxes clipped to the image (they stuck out by <= 1 px).
    """

    def __init__(
        self,
        path: str,
        image_root: str,
        data: dict,
        *,
        transforms: Callable | None = None,
        with_masks: bool = False,
        skip_invalid: bool = False,
    ):
        self.path = str(path)
        self.image_root = str(image_root)
        self.transforms = transforms
        self.with_masks = bool(with_masks)
        self.skip_invalid = bool(skip_invalid)
        self._parse(data)

    # ------------------------------------------------------------------ parsing / validation
    def _parse(self, data: dict) -> None:
        path = self.path
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
        self.categories: list[dict] = sorted(cats_raw, key=lambda c: c["id"])
        self.cat_ids: list[int] = [c["id"] for c in self.categories]
        self.cat_id_to_label: dict[int, int] = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.class_names: list[str] = [str(c["name"]) for c in self.categories]
        self.num_classes: int = len(self.categories)

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
        self.images: list[dict] = sorted(imgs_raw, key=lambda im: im["id"])
        self.image_ids: list[int] = [im["id"] for im in self.images]
        self.num_images: int = len(self.images)
        index_of = {iid: i for i, iid in enumerate(self.image_ids)}

        # ---- annotations
        skip = _Skipper(path, self.skip_invalid)
        anns_per_image: list[list[dict]] = [[] for _ in self.images]
        boxes_per_image: list[list[list[float]]] = [[] for _ in self.images]
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
            if not _is_int(cid) or cid not in self.cat_id_to_label:
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
            im = self.images[idx]
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
            if self.with_masks:
                if "segmentation" not in a:
                    skip(item, "bad segmentation", "no 'segmentation' but masks were requested")
                    continue
                problem = _check_segmentation(a["segmentation"], int(H), int(W))
                if problem is not None:
                    skip(item, "bad segmentation", problem)
                    continue
            anns_per_image[idx].append(a)
            boxes_per_image[idx].append([cx1, cy1, cx2, cy2])

        self.annotations_per_image: list[list[dict]] = anns_per_image
        self._boxes: list[np.ndarray] = [
            np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes_per_image
        ]
        self._labels: list[np.ndarray] = [
            np.asarray([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
            for anns in anns_per_image
        ]
        self.labels_per_image: list[np.ndarray] = [np.unique(lab) for lab in self._labels]
        self.num_annotations: int = sum(len(a) for a in anns_per_image)
        self.clipped_boxes: int = clipped
        self.skipped: dict[str, int] = dict(skip.counts)
        self.skipped_examples: list[str] = list(skip.examples)

        C = self.num_classes
        self.instance_counts = np.bincount(
            np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64), minlength=C
        ).astype(np.int64)
        self.image_counts = np.bincount(
            np.concatenate(self.labels_per_image), minlength=C
        ).astype(np.int64)
        self.image_frequency = self.image_counts.astype(np.float64) / float(self.num_images)

        groups = []
        for label, c in enumerate(self.categories):
            if "frequency" in c:
                groups.append(c["frequency"])
            elif "image_count" in c:
                groups.append(frequency_group(int(c["image_count"])))
            else:
                groups.append(frequency_group(int(self.image_counts[label])))
        self.frequency_groups: list[str] = groups

        if self.skipped:
            total = sum(self.skipped.values())
            by_reason = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items()))
            warnings.warn(
                f"{path}: skipped {total} invalid annotation(s) ({by_reason}); "
                f"e.g. {self.skipped_examples[0]}",
                stacklevel=4,
            )

    # ------------------------------------------------------------------ helpers
    def image_path(self, i: int) -> str:
        """Path of the image at dataset index ``i``."""
        im = self.images[i]
        name = im.get("file_name")
        if name:
            return os.path.join(self.image_root, name)
        # LVIS v1 has no file_name: its coco_url ends in "<split>/<file>" (train2017 or val2017 --
        # LVIS v1 val mixes both). Prefer image_root/<split>/<file> (image_root = the COCO
        # directory), fall back to image_root/<file> (image_root = one split's directory).
        split, base = str(im["coco_url"]).rstrip("/").rsplit("/", 2)[-2:]
        nested = os.path.join(self.image_root, split, base)
        flat = os.path.join(self.image_root, base)
        return flat if (not os.path.exists(nested) and os.path.exists(flat)) else nested

    def label_to_category_id(self, labels: Iterable[int] | torch.Tensor | np.ndarray) -> list[int]:
        """Map contiguous labels back to the file's category ids (for writing results)."""
        if isinstance(labels, torch.Tensor):
            labels = labels.tolist()
        elif isinstance(labels, np.ndarray):
            labels = labels.tolist()
        out = []
        for lab in labels:
            if not (0 <= int(lab) < self.num_classes):
                raise DataError(self.path, f"label {lab}", f"outside 0..{self.num_classes - 1}")
            out.append(self.cat_ids[int(lab)])
        return out

    def group_counts(self) -> dict[str, int]:
        """Number of classes in each frequency group, ``{'r': .., 'c': .., 'f': ..}``."""
        cnt = Counter(self.frequency_groups)
        return {g: cnt.get(g, 0) for g in ("r", "c", "f")}

    def check_image_files(self, max_listed: int = 5) -> None:
        """Check that every image file exists (no decoding: one ``stat`` per image, fast enough to
        run before every training); DataError listing the first missing ones."""
        self.check_images(max_listed, decode=False)

    def check_images(self, max_listed: int = 5, decode: bool = True) -> None:
        """Check that every image file exists and decodes (every pixel: PIL's ``verify()`` alone
        passes a truncated JPEG); DataError listing the first bad ones."""
        bad: list[str] = []
        n_bad = 0
        for i in range(self.num_images):
            p = self.image_path(i)
            problem = None
            if not os.path.isfile(p):
                problem = "missing"
            elif decode:
                try:
                    with Image.open(p) as img:
                        img.verify()  # structure and checksums (PNG)
                    with Image.open(p) as img:  # verify() leaves the file unusable: open it again
                        img.load()  # decode every pixel: a truncated JPEG / PNG fails only here
                except Exception as e:  # noqa: BLE001 - any decoder failure means unreadable
                    problem = f"unreadable ({type(e).__name__}: {e})"
            if problem is not None:
                n_bad += 1
                if len(bad) < max_listed:
                    bad.append(f"{p} (image id {self.image_ids[i]}, {problem})")
        if n_bad:
            more = f" and {n_bad - len(bad)} more" if n_bad > len(bad) else ""
            raise DataError(
                self.path, f"image_root {self.image_root}",
                f"{n_bad} of {self.num_images} image files are missing or unreadable: "
                + "; ".join(bad) + more,
            )

    # ------------------------------------------------------------------ Dataset protocol
    def __len__(self) -> int:
        return self.num_images

    def _load_image(self, i: int) -> torch.Tensor:
        p = self.image_path(i)
        im = self.images[i]
        item = f"image id {im['id']}"
        if not os.path.isfile(p):
            raise DataError(p, item, f"image file not found (image_root {self.image_root}, annotations {self.path})")
        try:
            with Image.open(p) as img:
                arr = _to_rgb8(img)
        except DataError as e:
            raise DataError(p, item, e.problem) from None
        except Exception as e:  # noqa: BLE001
            raise DataError(p, item, f"cannot read image: {type(e).__name__}: {e}") from None
        h, w = arr.shape[:2]
        if (h, w) != (int(im["height"]), int(im["width"])):
            raise DataError(
                p, item,
                f"image is {w}x{h} (WxH) but {self.path} says {int(im['width'])}x{int(im['height'])}",
            )
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)

    def get_target(self, i: int) -> dict[str, Any]:
        """The target dict of image ``i`` without reading the image (no transforms)."""
        im = self.images[i]
        anns = self.annotations_per_image[i]
        H, W = int(im["height"]), int(im["width"])
        boxes = torch.from_numpy(self._boxes[i].copy())
        n = len(anns)
        area = torch.tensor(
            [float(a["area"]) if _is_number(a.get("area")) else float((b[2] - b[0]) * (b[3] - b[1]))
             for a, b in zip(anns, self._boxes[i])],
            dtype=torch.float32,
        ).reshape(n)
        target: dict[str, Any] = {
            "boxes": boxes,
            "labels": torch.from_numpy(self._labels[i].copy()),
            "image_id": int(im["id"]),
            "orig_size": torch.tensor([H, W], dtype=torch.int64),
            "size": torch.tensor([H, W], dtype=torch.int64),
            "area": area,
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64).reshape(n),
            "gt_index": torch.arange(n, dtype=torch.int64),
        }
        if self.with_masks:
            masks = np.zeros((n, H, W), dtype=np.uint8)
            for k, a in enumerate(anns):
                masks[k] = _decode_mask(a["segmentation"], H, W, self._boxes[i][k])
            target["masks"] = torch.from_numpy(masks)
        return target

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not -self.num_images <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.num_images} images")
        i = i % self.num_images
        image = self._load_image(i)
        target = self.get_target(i)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        g = self.group_counts()
        skipped = f", skipped={sum(self.skipped.values())}" if self.skipped else ""
        return (
            f"LVISDataset({self.path!r}, images={self.num_images}, "
            f"annotations={self.num_annotations}, classes={self.num_classes} "
            f"(r={g['r']}, c={g['c']}, f={g['f']}){skipped})"
        )


def image_path(ds: LVISDataset, i: int) -> str:
    """Path of the image at index ``i`` of ``ds``."""
    return ds.image_path(i)


def _default_image_root(path: str) -> str:
    json_dir = os.path.dirname(os.path.abspath(path))
    candidate = os.path.normpath(os.path.join(json_dir, "..", "images"))
    return candidate if os.path.isdir(candidate) else json_dir


def load_lvis(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    transforms: Callable | None = None,
    with_masks: bool = False,
    skip_invalid: bool = False,
    check_images: bool = False,
) -> LVISDataset:
    """Read and check an LVIS v0.5/v1 or COCO instances JSON; return an :class:`LVISDataset`.

    Args:
        path: the annotation JSON.
        image_root: image directory; default ``<json dir>/../images`` if it exists, else the
            json's directory. Image paths are ``image_root/file_name`` (``file_name`` may hold
            sub-directories), or for LVIS v1 ``image_root/<split>/<file>`` from ``coco_url`` (falling back
            to ``image_root/<file>`` when only that exists).
        transforms: ``callable(image, target) -> (image, target)`` applied in ``__getitem__``.
        with_masks: decode segmentations into ``target["masks"]`` (uint8 [N, H, W]).
        skip_invalid: drop (and count, and warn about) invalid annotations instead of raising.
        check_images: open every image file now; error listing the missing/unreadable ones.
    """
    path = os.fspath(path)
    data = _read_json(path)
    if image_root is None:
        root = _default_image_root(path)
    else:
        root = os.fspath(image_root)
        if not os.path.isdir(root):
            warnings.warn(f"{path}: image_root {root} is not a directory; reading images will fail", stacklevel=2)
    ds = LVISDataset(path, root, data, transforms=transforms, with_masks=with_masks, skip_invalid=skip_invalid)
    if check_images:
        ds.check_images()
    return ds


def check_same_categories(train_ds: LVISDataset, val_ds: LVISDataset) -> None:
    """Raise DataError unless both datasets have the same categories (ids and names, in order)."""
    files = f"{train_ds.path} vs {val_ds.path}"
    a = list(zip(train_ds.cat_ids, train_ds.class_names))
    b = list(zip(val_ds.cat_ids, val_ds.class_names))
    for label, (ca, cb) in enumerate(zip(a, b)):
        if ca != cb:
            raise DataError(
                files, f"label {label}",
                f"categories differ: category id {ca[0]} '{ca[1]}' in {train_ds.path} but "
                f"category id {cb[0]} '{cb[1]}' in {val_ds.path}",
            )
    if len(a) != len(b):
        longer, ds_long = (a, train_ds) if len(a) > len(b) else (b, val_ds)
        cid, name = longer[min(len(a), len(b))]
        raise DataError(
            files, f"category id {cid}",
            f"category count differs ({len(a)} in {train_ds.path}, {len(b)} in {val_ds.path}); "
            f"first extra: category id {cid} '{name}' only in {ds_long.path}",
        )
