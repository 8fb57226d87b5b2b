"""A frozen copy of the LVIS reader and of ``dataset_stats`` as they were before issue 13's compact
records (JSON loaded whole, per-annotation Python dicts): the reference that
tests/test_lvis_records.py compares the current implementation with, output for output."""

# ruff: noqa
from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from taildet.data.lvis import _decode_mask
from taildet.data.lvis_validate import (BOX_TOLERANCE, _MAX_EXAMPLES, _check_segmentation, _is_int, _is_number,
                                        federated_ids_problem, frequency_group, id_problem)
from taildet.errors import DataError

frequency_from_image_count = frequency_group
GROUPS = ("r", "c", "f")


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


class ReferenceLVIS:
    """The old LVISDataset's index and get_target (no images): ``ReferenceLVIS(path, data, ...)``."""

    def __init__(self, path, data, with_masks=False, skip_invalid=False):
        self.path = str(path)
        self.with_masks = bool(with_masks)
        self.skip_invalid = bool(skip_invalid)
        parse_lvis(self, data)

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



def _load(ann: str | os.PathLike | Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    if isinstance(ann, Mapping):
        return "<dict>", ann
    path = str(ann)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise DataError(path, "", "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "", "is a directory, not an annotation JSON file") from None
    except UnicodeDecodeError as exc:
        enc = " (it looks UTF-16 encoded: save it as UTF-8)" if exc.object[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DataError(path, "", f"not a UTF-8 JSON text file: byte {exc.start} cannot be decoded{enc}") from None
    except OSError as exc:
        raise DataError(path, "", f"cannot read the file: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(path, f"line {exc.lineno} column {exc.colno}", f"not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DataError(path, "", f"top level must be a JSON object, got {type(data).__name__}")
    return path, data


def dataset_stats(ann_path: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Statistics of a LVIS/COCO annotation file (a path, or an already loaded dict).

    Returns a dict with:
        ``file``, ``num_images``, ``num_annotations``, ``num_classes``,
        ``num_images_with_annotations``,
        ``groups``: ``{'r': n, 'c': n, 'f': n}`` -- number of classes per frequency group,
        ``group_image_counts`` / ``group_instance_counts``: annotated images / instances per group
            (an image with classes of two groups counts in both),
        ``frequency_source``: ``"field"`` (all categories carry ``frequency``), ``"image_count"``
            (none does) or ``"mixed"``,
        ``classes``: one dict per category in increasing id order with ``id``, ``name``,
            ``frequency``, ``image_count``, ``instance_count`` (counts from the file's annotations),
            and ``declared_image_count`` when the category carries LVIS's ``image_count`` field
            (as stored in the file; it need not match the annotations, e.g. a subset of a split),
        ``imbalance_ratio``: max / min non-zero ``image_count`` (``None`` when no class has an image).

    Raises:
        DataError: missing sections, duplicate ids, unknown ``category_id``/``image_id`` in an
            annotation, or an invalid ``frequency`` value -- naming the file and the item.
    """
    path, data = _load(ann_path)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(path, key, f"missing the '{key}' list")
        if not isinstance(data[key], list):
            raise DataError(path, key, f"'{key}' must be a list, got {type(data[key]).__name__}")
    images, anns, cats = data["images"], data["annotations"], data["categories"]

    image_index: dict[Any, int] = {}
    for i, img in enumerate(images):
        if not isinstance(img, Mapping) or "id" not in img:
            raise DataError(path, f"images[{i}]", "image has no 'id'")
        if not _is_int(img["id"]):
            raise DataError(path, f"images[{i}]", f"image id must be an integer, got {img['id']!r}")
        if img["id"] in image_index:
            raise DataError(path, f"images[{i}]", f"duplicate image id {img['id']!r}")
        image_index[img["id"]] = i

    cats_sorted = []
    cat_index: dict[Any, int] = {}
    for i, cat in enumerate(cats):
        if not isinstance(cat, Mapping) or "id" not in cat:
            raise DataError(path, f"categories[{i}]", "category has no 'id'")
        if not _is_int(cat["id"]):
            raise DataError(path, f"categories[{i}]", f"category id must be an integer, got {cat['id']!r}")
        if cat["id"] in cat_index:
            raise DataError(path, f"categories[{i}]", f"duplicate category id {cat['id']!r}")
        cat_index[cat["id"]] = -1
        cats_sorted.append(cat)
    cats_sorted.sort(key=lambda c: c["id"])
    for k, cat in enumerate(cats_sorted):
        cat_index[cat["id"]] = k
    num_classes = len(cats_sorted)

    ann_cat = np.empty(len(anns), dtype=np.int64)
    ann_img = np.empty(len(anns), dtype=np.int64)
    for i, a in enumerate(anns):
        item = f"annotation id {a.get('id', '?')}" if isinstance(a, Mapping) else f"annotations[{i}]"
        if not isinstance(a, Mapping):
            raise DataError(path, item, "annotation must be an object")
        try:
            ann_cat[i] = cat_index[a["category_id"]]
        except KeyError:
            raise DataError(path, item, f"category_id {a.get('category_id')!r} is not in 'categories'") from None
        try:
            ann_img[i] = image_index[a["image_id"]]
        except KeyError:
            raise DataError(path, item, f"image_id {a.get('image_id')!r} is not in 'images'") from None

    instance_count = np.bincount(ann_cat, minlength=num_classes).astype(np.int64)
    if len(anns):
        pairs = np.unique(ann_cat * max(len(images), 1) + ann_img)
        pair_cat, pair_img = pairs // max(len(images), 1), pairs % max(len(images), 1)
    else:
        pair_cat = pair_img = np.zeros(0, dtype=np.int64)
    image_count = np.bincount(pair_cat, minlength=num_classes).astype(np.int64)

    classes = []
    n_field = 0
    for k, cat in enumerate(cats_sorted):
        freq = cat.get("frequency")
        if freq is None:
            freq = frequency_from_image_count(int(image_count[k]))
        else:
            n_field += 1
            if freq not in GROUPS:
                raise DataError(path, f"category id {cat['id']}", f"frequency must be one of 'r', 'c', 'f', got {freq!r}")
        entry = {
            "id": cat["id"],
            "name": str(cat.get("name", cat["id"])),
            "frequency": freq,
            "image_count": int(image_count[k]),
            "instance_count": int(instance_count[k]),
        }
        if isinstance(cat.get("image_count"), int):
            # LVIS's stored field; it need not match this file's annotations.
            entry["declared_image_count"] = int(cat["image_count"])
        classes.append(entry)

    group_of = np.array([GROUPS.index(c["frequency"]) for c in classes], dtype=np.int64)
    groups = {g: int((group_of == j).sum()) for j, g in enumerate(GROUPS)}
    group_instances = {g: int(instance_count[group_of == j].sum()) for j, g in enumerate(GROUPS)}
    group_images = {}
    for j, g in enumerate(GROUPS):
        in_group = group_of[pair_cat] == j if pair_cat.size else np.zeros(0, dtype=bool)
        group_images[g] = int(np.unique(pair_img[in_group]).size)

    nonzero = image_count[image_count > 0]
    imbalance = float(nonzero.max() / nonzero.min()) if nonzero.size else None
    source = "field" if n_field == num_classes else ("image_count" if n_field == 0 else "mixed")
    return {
        "file": path,
        "num_images": len(images),
        "num_annotations": len(anns),
        "num_classes": num_classes,
        "num_images_with_annotations": int(np.unique(ann_img).size),
        "groups": groups,
        "group_image_counts": group_images,
        "group_instance_counts": group_instances,
        "frequency_source": source,
        "classes": classes,
        "imbalance_ratio": imbalance,
    }




def _read_json(path: str) -> dict:
    """The old whole-file reader of taildet.data.lvis."""
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


def reference_load(path, with_masks=False, skip_invalid=False) -> ReferenceLVIS:
    return ReferenceLVIS(path, _read_json(str(path)), with_masks=with_masks, skip_invalid=skip_invalid)
