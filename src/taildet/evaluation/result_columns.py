"""Detection results as numpy columns, read and checked a piece at a time.

:func:`read_result_columns` gives what :func:`taildet.evaluation.results_io.load_results` gives --
the same values and the same errors, naming the file and ``results[i]`` -- as columns
(:class:`ResultColumns`) instead of a dict per detection: image and category ids (int64), scores
(float64), boxes (float64 [N, 4]) and, for segm, the RLEs. A results file is read a piece at a time
(:mod:`taildet.evaluation.results_json`); each piece is checked with numpy, and only a piece where
that finds something wrong (or something unusual, e.g. a tuple) goes through ``load_results``'s
own per-result check, which names the first bad result. An error found in a piece is raised once
the whole file has been read, so that a syntax error further on wins as it does with ``json.load``.

For segm, the RLE of a detection that the federated protocol never evaluates (its class neither
annotated on its image nor in the image's ``neg_category_ids``; ``keep_segm``) is checked and then
dropped (``None``): at LVIS size that is most of the memory of a results file.

:func:`cap_order` and :func:`top_k_order` are ``cap_per_image`` and ``top_k_per_class`` as index
arrays (the same order, ties included).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Mapping

import numpy as np

from taildet.errors import DataError
from taildet.evaluation.results_io import _LIST_NAME, check_result, check_results_list, read_json
from taildet.evaluation.results_json import NotStreamable, iter_json_list, read_flat_bbox

__all__ = ["GtIds", "ResultColumns", "cap_order", "read_result_columns", "top_k_order"]

_BATCH = 50_000
_RLE_ALPHABET = re.compile(r"[0-o]*")


class GtIds:
    """The GT's image and category ids, for checking results against them."""

    def __init__(self, gt: Mapping):
        self.sets = ({int(im["id"]) for im in gt.get("images", [])}, {int(c["id"]) for c in gt.get("categories", [])})
        self.images = np.array(sorted(self.sets[0]), dtype=np.int64)
        self.categories = np.array(sorted(self.sets[1]), dtype=np.int64)

    @staticmethod
    def _has(sorted_ids: np.ndarray, x: np.ndarray) -> np.ndarray:
        i = np.minimum(np.searchsorted(sorted_ids, x), max(len(sorted_ids) - 1, 0))
        return (sorted_ids[i] == x) if len(sorted_ids) else np.zeros(len(x), bool)

    def has_ids(self, image_id: np.ndarray, category_id: np.ndarray) -> bool:
        return bool(self._has(self.images, image_id).all() and self._has(self.categories, category_id).all())


@dataclass
class ResultColumns:
    """Results as columns, in input order. ``bbox`` rows of results without a box are NaN
    (``has_bbox`` False; segm only). ``segm``: per result its RLE dict, or None where dropped."""

    image_id: np.ndarray
    category_id: np.ndarray
    score: np.ndarray
    bbox: np.ndarray
    has_bbox: np.ndarray
    segm: list | None = None
    rle_size: np.ndarray | None = None  # int64 [N, 2]: each RLE's [height, width] (segm)

    def __len__(self) -> int:
        return len(self.score)


def _types(values) -> set:
    return set(map(type, values))


def _numbers(values: list, n: int) -> np.ndarray | None:
    """float64 [n] of plain ints / floats (as ``float(v)`` converts them), or None."""
    if not _types(values) <= {float, int}:
        return None
    try:
        return np.array(values, dtype=np.float64).reshape(n)
    except OverflowError:
        return None


def _fast_batch(recs: list, iou_type: str, gt: GtIds) -> dict | None:
    """Columns of a batch of plain result dicts, or None when any check fails (or anything is
    unusual): the per-result check then finds and names the problem."""
    n = len(recs)
    if _types(recs) != {dict}:
        return None
    try:
        img, cat, score = ([r[k] for r in recs] for k in ("image_id", "category_id", "score"))
        main = "bbox" if iou_type == "bbox" else "segmentation"
        need = [r[main] for r in recs]
    except KeyError:
        return None
    if _types(img) != {int} or _types(cat) != {int}:
        return None
    score = _numbers(score, n)
    try:
        img, cat = np.array(img, dtype=np.int64), np.array(cat, dtype=np.int64)
    except OverflowError:
        return None
    if score is None or not np.isfinite(score).all() or not gt.has_ids(img, cat):
        return None
    boxes = need if iou_type == "bbox" else [r.get("bbox") for r in recs]
    has = np.array([b is not None for b in boxes], dtype=bool)
    given = [b for b in boxes if b is not None] if iou_type == "segm" else boxes
    if not _types(given) <= {list} or (given and set(map(len, given)) != {4}):
        return None
    flat = _numbers(list(chain.from_iterable(given)), 4 * len(given))
    if flat is None:
        return None
    flat = flat.reshape(-1, 4)
    if not np.isfinite(flat).all() or (flat[:, 2:] < 0).any():
        return None
    bbox = np.full((n, 4), np.nan)
    bbox[has] = flat
    out = {"image_id": img, "category_id": cat, "score": score, "bbox": bbox, "has_bbox": has}
    if iou_type == "segm":
        if _types(need) != {dict}:
            return None
        try:
            sizes, counts = [s["size"] for s in need], [s["counts"] for s in need]
        except KeyError:
            return None
        if _types(sizes) != {list} or set(map(len, sizes)) != {2} or _types(counts) != {str}:
            return None
        if _types(chain.from_iterable(sizes)) != {int} or min(map(len, counts)) == 0:
            return None
        if not _RLE_ALPHABET.fullmatch("".join(counts)):
            return None
        size = np.array(sizes, dtype=np.int64)
        if (size < 0).any():
            return None
        out["segm"], out["rle_size"] = need, size
    return out


def _slow_batch(recs: list, start: int, file: str, iou_type: str, gt: GtIds) -> dict:
    """Columns of a batch through the per-result check (raises for the first bad result)."""
    rows = [check_result(r, start + j, file, iou_type, gt.sets) for j, r in enumerate(recs)]
    n = len(rows)
    has = np.array(["bbox" in r for r in rows], dtype=bool)
    bbox = np.full((n, 4), np.nan)
    if has.any():
        bbox[has] = np.array([r["bbox"] for r in rows if "bbox" in r], dtype=np.float64)
    out = {"image_id": np.array([r["image_id"] for r in rows], dtype=np.int64),
           "category_id": np.array([r["category_id"] for r in rows], dtype=np.int64),
           "score": np.array([r["score"] for r in rows], dtype=np.float64).reshape(n), "bbox": bbox, "has_bbox": has}
    if iou_type == "segm":
        out["segm"] = [r["segmentation"] for r in rows]
        out["rle_size"] = np.array([[int(v) for v in s["size"]] for s in out["segm"]], dtype=np.int64).reshape(n, 2)
    return out


def _batch(recs: list, start: int, file: str, iou_type: str, gt: GtIds,
           keep_segm: Callable[[np.ndarray, np.ndarray], np.ndarray] | None) -> dict:
    cols = _fast_batch(recs, iou_type, gt)
    if cols is None:
        cols = _slow_batch(recs, start, file, iou_type, gt)
    if iou_type == "segm" and keep_segm is not None:
        keep = keep_segm(cols["image_id"], cols["category_id"])
        cols["segm"] = [s if k else None for s, k in zip(cols["segm"], keep.tolist())]
    return cols


def _join(parts: list[dict], iou_type: str) -> ResultColumns:
    if not parts:
        parts = [{"image_id": np.zeros(0, np.int64), "category_id": np.zeros(0, np.int64),
                  "score": np.zeros(0), "bbox": np.zeros((0, 4)), "has_bbox": np.zeros(0, bool),
                  "segm": [], "rle_size": np.zeros((0, 2), np.int64)}]
    cols = ResultColumns(**{k: np.concatenate([p[k] for p in parts])
                            for k in ("image_id", "category_id", "score", "bbox", "has_bbox")})
    if iou_type == "segm":
        cols.segm = list(chain.from_iterable(p["segm"] for p in parts))
        cols.rle_size = np.concatenate([p["rle_size"] for p in parts])
    return cols


def _from_list(data: Any, file: str, iou_type: str, gt: GtIds, keep_segm) -> ResultColumns:
    check_results_list(data, file, iou_type)
    return _join([_batch(list(data[s:s + _BATCH]), s, file, iou_type, gt, keep_segm)
                  for s in range(0, len(data), _BATCH)], iou_type)


def _flat_columns(file: str, gt: GtIds) -> ResultColumns | None:
    """The fast reader's columns when the file is flat bbox records that all pass the checks."""
    try:
        with open(file, "rb") as f:
            cols = read_flat_bbox(f)
    except OSError:
        return None
    if cols is None:
        return None
    box = cols["bbox"]
    if (not np.isfinite(cols["score"]).all() or not np.isfinite(box).all() or (box[:, 2:] < 0).any()
            or not gt.has_ids(cols["image_id"], cols["category_id"])):
        return None
    return ResultColumns(cols["image_id"], cols["category_id"], cols["score"], box, np.ones(len(box), bool))


def _streamed(file: str, iou_type: str, gt: GtIds, keep_segm) -> ResultColumns:
    parts: list[dict] = []
    first_error: DataError | None = None
    start = 0
    with open(file, "rb") as f:
        for recs in iter_json_list(f, batch=_BATCH):
            if first_error is None:
                try:
                    parts.append(_batch(recs, start, file, iou_type, gt, keep_segm))
                except DataError as e:  # raised once the file is read: a syntax error further on wins
                    first_error, parts = e, []
            start += len(recs)
    if first_error is not None:
        raise first_error
    return _join(parts, iou_type)


def read_result_columns(results: str | os.PathLike | list, gt: GtIds, iou_type: str,
                        keep_segm: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
                        ) -> ResultColumns:
    """Results (a JSON file or a list of dicts) as checked columns, with the errors of
    :func:`~taildet.evaluation.results_io.load_results` (``iou_type`` "bbox" or "segm").

    ``keep_segm(image_id, category_id) -> bool mask``: which RLEs to keep (segm; default all).
    """
    if not isinstance(results, (str, os.PathLike)):
        return _from_list(results, _LIST_NAME, iou_type, gt, keep_segm)
    file = str(results)
    if iou_type == "bbox":
        cols = _flat_columns(file, gt)
        if cols is not None:
            return cols
    try:
        return _streamed(file, iou_type, gt, keep_segm)
    except (NotStreamable, OSError):
        # read it whole: the error message (or, for a file this reader cannot stream, the results)
        return _from_list(read_json(file), file, iou_type, gt, keep_segm)


# ------------------------------------------------------------------------------ trimming
def _first_seen_groups(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per element its group (groups numbered in order of first appearance) and group sizes."""
    _, first, inverse, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)], counts[np.argsort(rank)]


def _grouped(key: np.ndarray, score: np.ndarray, k: int, sort_all: bool) -> np.ndarray:
    n = len(key)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    group, sizes = _first_seen_groups(key)
    sort = np.ones(n, bool) if sort_all else (sizes[group] > k)
    order = np.lexsort((np.arange(n), np.where(sort, -score, 0.0), group))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    position = np.arange(n) - starts[group[order]]
    return order[position < k]


def cap_order(image_id: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Indices of :func:`~taildet.evaluation.results_io.cap_per_image`'s output, in its order."""
    if k < 0:
        return np.arange(len(score))
    return _grouped(image_id, score, k, sort_all=False)


def top_k_order(category_id: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Indices of :func:`~taildet.evaluation.results_io.top_k_per_class`'s output, in its order."""
    return _grouped(category_id, score, max(k, 0), sort_all=True)
