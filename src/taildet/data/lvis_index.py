"""Index a checked LVIS / COCO instances file into compact arrays: :func:`parse_lvis`.

The annotations arrive as :class:`PackedAnnotations` -- from :class:`AnnotationPacker`, which the
streaming reader (:mod:`taildet.data.json_stream`) feeds a batch of annotation objects at a time,
or from :func:`pack_annotations` over a list. Each annotation becomes one serialized record (the
exact JSON object, for ``annotations_per_image`` and the masks) and one row of numbers (ids, box,
area, iscrowd; polygon extents when masks are requested), so the Python objects of a batch are
freed before the next batch is parsed.

The checks are those of :func:`taildet.data.lvis_validate.check_annotation`, which defines them:
the rows of plain, valid annotations (the bulk) are checked with numpy, every other row is
decoded and goes through ``check_annotation`` itself, in file order, so the errors, skip reasons,
counts and examples are exactly that function's.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from taildet.data.lvis_validate import (BOX_TOLERANCE, MAX_SAFE_ID, AnnotationContext, _Skipper, check_annotation,
                                        check_images, check_sections, frequency_group, index_categories)
from taildet.data.records import (GroupedRecordView, RaggedArrayView, RecordStore, RecordStoreBuilder, RecordView,
                                  offsets_from_counts)

if TYPE_CHECKING:  # the dataset class imports this module
    from taildet.data.lvis import LVISDataset

__all__ = ["AnnotationPacker", "PackedAnnotations", "pack_annotations", "parse_lvis"]

# Columns of an annotation row: a plain valid-looking annotation (OK), an id that is an integer
# within +-MAX_SAFE_ID (ID_OK: then it counts for duplicates), the values (float64: exact for ids
# within that range and for the JSON numbers themselves), has an area, iscrowd.
OK, ID_OK, ID, IMG, CAT, BX, BY, BW, BH, AREA, HAS_AREA, CROWD = range(12)
_NCOL = 12
_BAD = (0.0,) * _NCOL
_NUM = (int, float)
_NUMSET = frozenset(_NUM)
_M = MAX_SAFE_ID
_MISSING = object()
# Columns of a segmentation row (with masks): a plain polygon list with finite coordinates, and
# the extent of all its polygons.
_SEG_BAD = (0.0, 0.0, 0.0, 0.0, 0.0)


def _row(a: Any) -> tuple:
    """The row of one annotation; OK = 0 sends it to ``check_annotation``."""
    try:
        aid, iid, cid = a["id"], a["image_id"], a["category_id"]
        x, y, w, h = a["bbox"]
    except (KeyError, TypeError, ValueError):  # not a dict, a key missing, a bbox not of 4 values
        return _bad_row(a)
    if (type(aid) is not int or type(iid) is not int or type(cid) is not int or type(x) not in _NUM
            or type(y) not in _NUM or type(w) not in _NUM or type(h) not in _NUM or type(a["bbox"]) is not list
            or not (-_M <= aid <= _M and -_M <= iid <= _M and -_M <= cid <= _M)):
        return _bad_row(a)
    area = a.get("area", _MISSING)
    has_area = 1
    if area is _MISSING:
        area, has_area = 0, 0
    elif type(area) not in _NUM:
        return _bad_row(a)
    crowd = a.get("iscrowd", 0)
    if type(crowd) is not int or not (crowd == 0 or crowd == 1):
        return _bad_row(a)
    return (1, 1, aid, iid, cid, x, y, w, h, area, has_area, crowd)


def _bad_row(a: Any) -> tuple:
    aid = a.get("id") if type(a) is dict else None
    if type(aid) is int and -_M <= aid <= _M:  # a valid id still counts for duplicates
        return (0, 1, aid) + _BAD[3:]
    return _BAD


def _rows(items: list) -> np.ndarray:
    rows = [_row(a) for a in items]
    try:
        return np.array(rows, dtype=np.float64).reshape(-1, _NCOL)
    except OverflowError:  # an integer beyond float64 somewhere: that row goes to the exact checks
        out = np.zeros((len(rows), _NCOL))
        for i, r in enumerate(rows):
            try:
                out[i] = r
            except OverflowError:
                out[i] = _bad_row(items[i])
        return out


def _seg_row(a: Any) -> tuple:
    seg = a.get("segmentation") if type(a) is dict else None
    if type(seg) is not list or not seg:
        return _SEG_BAD
    x0 = y0 = math.inf
    x1 = y1 = -math.inf
    try:
        for poly in seg:
            if type(poly) is not list or len(poly) < 6 or len(poly) % 2 or not _NUMSET.issuperset(map(type, poly)):
                return _SEG_BAD
            if not math.isfinite(sum(poly)):  # a NaN / inf coordinate (or an overflowing sum: checked exactly)
                return _SEG_BAD
            xs, ys = poly[0::2], poly[1::2]
            x0, y0, x1, y1 = min(x0, min(xs)), min(y0, min(ys)), max(x1, max(xs)), max(y1, max(ys))
        return (1.0, float(x0), float(y0), float(x1), float(y1))
    except OverflowError:
        return _SEG_BAD


class PackedAnnotations:
    """An annotations list as records (:class:`RecordStore`) and rows (float64 ``[N, 12]``; with
    masks also ``seg_rows`` ``[N, 5]``)."""

    def __init__(self, records: RecordStore, rows: np.ndarray, seg_rows: np.ndarray | None):
        self.records, self.rows, self.seg_rows = records, rows, seg_rows

    def __len__(self) -> int:
        return len(self.records)


class AnnotationPacker:
    """Streaming consumer of an annotations array (``add_batch`` / ``finish``): the records are the
    elements' JSON texts when the reader gives them, else the objects serialized."""

    wants_text = True

    def __init__(self, with_masks: bool):
        self.with_masks = bool(with_masks)
        self._records = RecordStoreBuilder()
        self._rows: list[np.ndarray] = []
        self._seg: list[np.ndarray] = []

    def add_batch(self, items: list, texts: list[str] | None = None) -> None:
        if texts is None:
            self._records.extend(items)
        else:
            self._records.extend_texts(texts)
        self._rows.append(_rows(items))
        if self.with_masks:
            self._seg.append(np.array([_seg_row(a) for a in items], dtype=np.float64).reshape(-1, 5))

    def finish(self) -> PackedAnnotations:
        rows = np.concatenate(self._rows) if self._rows else np.zeros((0, _NCOL))
        seg = (np.concatenate(self._seg) if self._seg else np.zeros((0, 5))) if self.with_masks else None
        self._rows, self._seg = [], []
        return PackedAnnotations(self._records.finish(), rows, seg)


def pack_annotations(items: list, with_masks: bool, batch: int = 4096) -> PackedAnnotations:
    packer = AnnotationPacker(with_masks)
    for s in range(0, len(items), batch):
        packer.add_batch(items[s:s + batch])
    return packer.finish()


def _lookup(sorted_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Position of each value in ``sorted_ids``, -1 where absent."""
    if not len(sorted_ids):
        return np.full(len(values), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == values, pos, -1).astype(np.int64)


def _first_with_same_id(rows: np.ndarray) -> np.ndarray:
    """Per row, the first row with the same (valid) id; the row itself when its id is not valid."""
    first = np.arange(len(rows), dtype=np.int64)
    valid = np.flatnonzero(rows[:, ID_OK] == 1.0)
    if valid.size:
        _, pos, inv = np.unique(rows[valid, ID].astype(np.int64), return_index=True, return_inverse=True)
        first[valid] = valid[pos][inv.reshape(-1)]
    return first


def _index_annotations(ds: LVISDataset, packed: PackedAnnotations, ctx: AnnotationContext):
    """Check every annotation; returns the kept ones per image (order, offsets) and their arrays."""
    rows = packed.rows
    n = len(rows)
    first = _first_with_same_id(rows)
    img = _lookup(ctx.image_ids, rows[:, IMG].astype(np.int64))
    lab = _lookup(np.asarray(ds.cat_ids, dtype=np.int64), rows[:, CAT].astype(np.int64))
    at = np.maximum(img, 0)
    W, H = ctx.widths[at], ctx.heights[at]
    x1, y1, w, h = (rows[:, c] for c in (BX, BY, BW, BH))
    with np.errstate(invalid="ignore", over="ignore"):
        x2, y2 = x1 + w, y1 + h
        tol = BOX_TOLERANCE
        # Python's min(max(v, 0.0), W), -0.0 included
        cx1, cy1, cx2, cy2 = (np.where(lim < c, lim, c) for c, lim in
                              ((np.where(0.0 > v, 0.0, v), lim) for v, lim in ((x1, W), (y1, H), (x2, W), (y2, H))))
        area, has_area = rows[:, AREA], rows[:, HAS_AREA] == 1.0
        ok = ((rows[:, OK] == 1.0) & (first == np.arange(n)) & (img >= 0) & (lab >= 0)
              & np.isfinite(rows[:, BX:BH + 1]).all(axis=1) & (w > 0) & (h > 0)
              & (x1 >= -tol) & (y1 >= -tol) & (x2 <= W + tol) & (y2 <= H + tol) & (cx2 > cx1) & (cy2 > cy1)
              & (~has_area | (np.isfinite(area) & (area >= 0))))
        if ds.with_masks:
            seg = packed.seg_rows
            ok &= (seg[:, 0] == 1.0) & (seg[:, 1] >= -1) & (seg[:, 2] >= -1) & (seg[:, 3] <= W + 1) & (seg[:, 4] <= H + 1)
        clipped = ok & ((cx1 != x1) | (cy1 != y1) | (cx2 != x2) | (cy2 != y2))
    boxes = np.stack([cx1, cy1, cx2, cy2], axis=1)
    crowd = rows[:, CROWD].astype(np.int64)
    area, has_area = area.copy(), has_area.copy()
    n_clipped = int(np.count_nonzero(clipped))
    del x2, y2, cx1, cy1, cx2, cy2, W, H, clipped

    for k in np.flatnonzero(~ok).tolist():  # in file order: the first error raises, as it would alone
        res, was_clipped = check_annotation(ctx, k, packed.records.get(k), int(first[k]))
        n_clipped += bool(was_clipped)
        if res is not None:
            img[k], lab[k], boxes[k], a, crowd[k] = res
            ok[k], has_area[k], area[k] = True, a is not None, 0.0 if a is None else a

    kept = np.flatnonzero(ok)
    order = kept[np.argsort(img[kept], kind="stable")]
    offsets = offsets_from_counts(np.bincount(img[kept], minlength=ds.num_images))
    boxes32 = boxes[order].astype(np.float32)
    computed = (boxes32[:, 2] - boxes32[:, 0]) * (boxes32[:, 3] - boxes32[:, 1])
    area32 = np.where(has_area[order], area[order].astype(np.float32), computed).astype(np.float32)
    return order, offsets, boxes32, lab[order], area32, crowd[order], n_clipped


def parse_lvis(ds: LVISDataset, data: dict) -> None:
    """Check ``data`` (an LVIS / COCO instances JSON object read from ``ds.path``; its
    ``annotations`` a list or :class:`PackedAnnotations`) and set the index attributes of ``ds``
    (categories, images, per-image boxes and labels, counts, frequency groups, skipped / clipped
    annotations); the policy is the module docstring's of :mod:`taildet.data.lvis`."""
    path = ds.path
    check_sections(path, data, (list, PackedAnnotations))
    seen_cat = index_categories(ds, data["categories"])
    images = check_images(path, data["images"], seen_cat)
    ds.images = RecordView(RecordStore.from_objects(images))
    ds.image_ids = [im["id"] for im in images]
    ds.num_images = len(images)
    skip = _Skipper(path, ds.skip_invalid)
    ctx = AnnotationContext(ds, skip, np.asarray(ds.image_ids, dtype=np.int64),
                            np.array([float(im["width"]) for im in images]),
                            np.array([float(im["height"]) for im in images]))
    del images

    packed = data["annotations"]
    if not isinstance(packed, PackedAnnotations):
        packed = pack_annotations(packed, ds.with_masks)
    elif ds.with_masks and packed.seg_rows is None:
        packed.seg_rows = np.array([_seg_row(packed.records.get(k)) for k in range(len(packed))]).reshape(-1, 5)
    order, offsets, boxes, labels, area, crowd, n_clipped = _index_annotations(ds, packed, ctx)
    ds._ann_records, ds._ann_order, ds._ann_offsets = packed.records, order, offsets
    ds._ann_boxes, ds._ann_labels, ds._ann_area, ds._ann_iscrowd = boxes, labels, area, crowd
    ds.annotations_per_image = GroupedRecordView(packed.records, order, offsets)

    C, N = ds.num_classes, ds.num_images
    image_of = np.repeat(np.arange(N, dtype=np.int64), np.diff(offsets))
    pairs = np.unique(image_of * C + labels)  # (image, label) pairs, by image then label
    ds.labels_per_image = RaggedArrayView(pairs % C, offsets_from_counts(np.bincount(pairs // C, minlength=N)))
    ds.num_annotations = len(order)
    ds.clipped_boxes = n_clipped
    ds.skipped = dict(skip.counts)
    ds.skipped_examples = list(skip.examples)

    ds.instance_counts = np.bincount(labels, minlength=C).astype(np.int64)
    ds.image_counts = np.bincount(pairs % C, minlength=C).astype(np.int64)
    ds.image_frequency = ds.image_counts.astype(np.float64) / float(ds.num_images)

    groups = []
    for label, c in enumerate(ds.categories):
        if "frequency" in c:
            groups.append(c["frequency"])
        elif "image_count" in c:
            groups.append(frequency_group(int(c["image_count"])))
        else:
            groups.append(frequency_group(int(ds.image_counts[label])))
    ds.frequency_groups = groups

    if ds.skipped:
        total = sum(ds.skipped.values())
        by_reason = ", ".join(f"{r}: {n}" for r, n in sorted(ds.skipped.items()))
        warnings.warn(
            f"{path}: skipped {total} invalid annotation(s) ({by_reason}); "
            f"e.g. {ds.skipped_examples[0]}",
            stacklevel=4,
        )
