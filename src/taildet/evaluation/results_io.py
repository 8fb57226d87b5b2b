"""Reading, checking, writing and trimming detection results.

A *result* is one detection in LVIS/COCO results format::

    {"image_id": int, "category_id": int, "score": float,
     "bbox": [x, y, w, h]}                        # bbox results
    {"image_id": ..., "category_id": ..., "score": ...,
     "segmentation": {"size": [h, w], "counts": ...}}   # segm results (RLE), bbox optional

Category ids are the ORIGINAL dataset ids (not the contiguous 0..C-1 labels used inside the
models). Every check raises :class:`taildet.errors.DataError` naming the file and the index of the
bad result (``results[17]``).

The two trimming functions reproduce the official lvis-api exactly, including the order of
detections with equal scores (which matters for ties in the ranking):

* :func:`cap_per_image` is ``LVISResults.limit_dets_per_image``: results are grouped by image in
  order of first appearance, and an image with more than ``k`` results keeps its ``k``
  highest-scoring ones (stable sort, so ties keep their input order).
* :func:`top_k_per_class` is ``LVISResults.limit_dets_per_cat`` (the AP-fixed protocol): grouped by
  category in order of first appearance, each keeps its ``k`` highest-scoring results.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from taildet.data.lvis import rle_counts_problem
from taildet.errors import DataError
from taildet.fileio import atomic_write_text

__all__ = [
    "load_results",
    "save_results",
    "save_metrics",
    "cap_per_image",
    "top_k_per_class",
]

_LIST_NAME = "<results list>"


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _gt_ids(gt: Any) -> tuple[set[int], set[int]] | None:
    """(image ids, category ids) of a GT given as a dict, a path, or None."""
    if gt is None:
        return None
    if isinstance(gt, (str, os.PathLike)):
        with open(gt) as f:
            gt = json.load(f)
    if not isinstance(gt, Mapping):
        raise TypeError(f"gt must be a GT dict, a path or None, not {type(gt).__name__}")
    return ({int(im["id"]) for im in gt.get("images", [])},
            {int(c["id"]) for c in gt.get("categories", [])})


def _check_rle(seg: Any, file: str, item: str) -> None:
    if isinstance(seg, list):
        raise DataError(file, item, "segmentation must be an RLE dict {'size': [h, w], 'counts': ...}, "
                        "not a polygon list")
    if not isinstance(seg, Mapping) or "size" not in seg or "counts" not in seg:
        raise DataError(file, item, "segmentation must be an RLE dict with 'size' and 'counts'")
    size = seg["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(_is_int(v) and v >= 0 for v in size)):
        raise DataError(file, item, f"segmentation 'size' must be [height, width], got {size!r}")
    problem = rle_counts_problem(seg["counts"], int(size[0]), int(size[1]))
    if problem is not None:
        raise DataError(file, item, f"segmentation: {problem}")


def load_results(path_or_list: str | os.PathLike | list, gt: Any = None,
                 iou_type: str | None = None) -> list[dict]:
    """Load and validate detection results.

    Args:
        path_or_list: a results JSON file (a list of result dicts) or the list itself.
        gt: optional GT (LVIS/COCO dict or its JSON path): when given, every ``image_id`` must be
            one of its images and every ``category_id`` one of its categories.
        iou_type: ``"bbox"`` requires a ``bbox`` in every result, ``"segm"`` a ``segmentation``
            RLE; ``None`` requires one of them.

    Returns:
        A new list of new dicts (the input is never modified) with ``image_id`` and
        ``category_id`` as int, ``score`` as float, ``bbox`` as a list of 4 floats (when present)
        and ``segmentation`` unchanged (when present). Other keys are dropped.

    Raises:
        DataError: naming the file (or ``<results list>``) and ``results[i]`` for the first bad
            result: not a list, not a dict, a missing key, a non-integer id, an id unknown to
            ``gt``, a non-finite score or bbox value, a negative box width/height, a malformed RLE.
    """
    if isinstance(path_or_list, (str, os.PathLike)):
        file = str(path_or_list)
        data = read_json(file)
    else:
        file = _LIST_NAME
        data = path_or_list
    check_results_list(data, file, iou_type)
    ids = _gt_ids(gt)
    return [check_result(r, i, file, iou_type, ids) for i, r in enumerate(data)]


def read_json(file: str) -> Any:
    """The parsed JSON of a results file; DataError naming the file when it cannot be read."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise DataError(file, "", f"not a JSON text file ({type(e).__name__})") from None
    except FileNotFoundError:
        raise DataError(file, "", "results file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(file, "", f"not valid JSON ({e})") from None


def check_results_list(data: Any, file: str, iou_type: str | None) -> None:
    """DataError unless ``data`` is a list (or tuple); ValueError for an unknown ``iou_type``."""
    if not isinstance(data, (list, tuple)):
        raise DataError(file, "", f"results must be a JSON list of detections, got {type(data).__name__}")
    if iou_type not in (None, "bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox', 'segm' or None, not {iou_type!r}")


def check_result(r: Any, i: int, file: str, iou_type: str | None,
                 ids: tuple[set[int], set[int]] | None) -> dict:
    """Result ``i`` checked and normalised as :func:`load_results` returns it (DataError naming
    ``results[i]`` for the first thing wrong with it); ``ids``: the GT's (image ids, category ids)."""
    item = f"results[{i}]"
    if not isinstance(r, Mapping):
        raise DataError(file, item, f"a result must be a dict, got {type(r).__name__}")
    for key in ("image_id", "category_id", "score"):
        if key not in r:
            raise DataError(file, item, f"missing key '{key}'")
    need = {"bbox": ("bbox",), "segm": ("segmentation",), None: ()}[iou_type]
    for key in need:
        if key not in r:
            raise DataError(file, item, f"missing key '{key}' (needed for iou_type={iou_type!r})")
    if "bbox" not in r and "segmentation" not in r:
        raise DataError(file, item, "a result needs a 'bbox' or a 'segmentation'")
    img, cat, score = r["image_id"], r["category_id"], r["score"]
    if not _is_int(img):
        raise DataError(file, item, f"image_id must be an integer, got {img!r}")
    if not _is_int(cat):
        raise DataError(file, item, f"category_id must be an integer, got {cat!r}")
    if not _is_real(score) or not math.isfinite(score):
        raise DataError(file, item, f"score must be a finite number, got {score!r}")
    img, cat = int(img), int(cat)
    if ids is not None:
        if img not in ids[0]:
            raise DataError(file, item, f"unknown image_id {img} (not an image of the GT)")
        if cat not in ids[1]:
            raise DataError(file, item, f"unknown category_id {cat} (not a category of the GT; "
                            "results use the original dataset category ids)")
    new = {"image_id": img, "category_id": cat, "score": float(score)}
    if "bbox" in r and (iou_type != "segm" or r["bbox"] is not None):
        bb = r["bbox"]
        if (not isinstance(bb, (list, tuple)) or len(bb) != 4
                or not all(_is_real(v) for v in bb)):
            raise DataError(file, item, f"bbox must be [x, y, w, h] (4 numbers), got {bb!r}")
        bb = [float(v) for v in bb]
        if not all(math.isfinite(v) for v in bb):
            raise DataError(file, item, f"bbox has a non-finite value: {bb!r}")
        if bb[2] < 0 or bb[3] < 0:
            raise DataError(file, item, f"bbox width and height must be >= 0 (xywh), got {bb!r}")
        new["bbox"] = bb
    if "segmentation" in r and iou_type != "bbox":
        _check_rle(r["segmentation"], file, item)
        new["segmentation"] = r["segmentation"]
    return new


_atomic_write_text = atomic_write_text  # kept for taildet.evaluation.report


def _jsonable(x: Any) -> Any:
    """Plain-JSON version of x: NaN/inf -> None, numpy scalars/arrays -> Python, keys -> str."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy scalar or array
        return _jsonable(x.tolist())
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if _is_int(x):
        return int(x)
    if _is_real(x):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, bytes):
        return x.decode("ascii")
    if isinstance(x, os.PathLike):
        return str(x)
    return x


def save_results(results: Iterable[Mapping], path: str | os.PathLike) -> Path:
    """Write results as a JSON list, atomically (temp file in the same folder + ``os.replace``).

    RLE ``counts`` given as bytes (as pycocotools returns them) are written as strings.
    """
    return _atomic_write_text(json.dumps(_jsonable(list(results)), allow_nan=False), path)


def save_metrics(metrics: Mapping, path: str | os.PathLike) -> Path:
    """Write a metrics dict as indented JSON, atomically; NaN (undefined) is written as ``null``
    and integer keys (``per_class_AP``'s category ids) as strings."""
    return _atomic_write_text(json.dumps(_jsonable(metrics), indent=2, allow_nan=False) + "\n", path)


def cap_per_image(results: list[Mapping], k: int) -> list:
    """Keep each image's ``k`` highest-scoring results (LVIS's per-image cap, official order).

    Results come out grouped by image, images in order of first appearance; an image with at most
    ``k`` results keeps them in input order, a larger one is sorted by score (stable) and cut.
    ``k < 0`` means no cap: a copy of the list, unchanged (the lvis-api skips the step).
    """
    if k < 0:
        return list(results)
    by_img: dict[Any, list] = defaultdict(list)
    for r in results:
        by_img[r["image_id"]].append(r)
    out = []
    for anns in by_img.values():
        if len(anns) > k:
            anns = sorted(anns, key=lambda r: r["score"], reverse=True)[:k]
        out.extend(anns)
    return out


def top_k_per_class(results: list[Mapping], k: int) -> list:
    """Keep each category's ``k`` highest-scoring results over the whole dataset (AP-fixed).

    Results come out grouped by category (order of first appearance), each group sorted by score
    (stable), as the lvis-api's ``limit_dets_per_cat`` does.
    """
    by_cat: dict[Any, list] = defaultdict(list)
    for r in results:
        by_cat[r["category_id"]].append(r)
    out = []
    for anns in by_cat.values():
        out.extend(sorted(anns, key=lambda r: r["score"], reverse=True)[:max(k, 0)])
    return out
