"""Dataset statistics of a LVIS/COCO annotation JSON: frequency groups, counts, long-tail plot.

Works from the JSON directly (``json`` + ``numpy``; the annotations streamed, a batch at a time,
so a full LVIS train file takes little memory), independent of the dataset reader, so it can
describe any LVIS v0.5 / v1 or COCO-format file::

    stats = dataset_stats("lvis_v1_train.json")
    print(format_stats(stats))
    plot_long_tail(stats, "long_tail.png")

Counts (``image_count``, ``instance_count``) are always computed from the file's annotations.
A category's frequency group is its ``frequency`` field when present (LVIS sets it from the
*training* set, so on a validation file it differs from the file's own counts), else it is
derived from the computed image count: rare 1-10 images, common 11-100, frequent > 100 (a class
with no image at all is counted as rare).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from taildet.data.json_stream import read_json_object
from taildet.data.lvis_validate import _is_int, frequency_group
from taildet.errors import DataError
from taildet.fileio import atomic_write

__all__ = ["dataset_stats", "format_stats", "plot_long_tail", "frequency_from_image_count", "GROUPS"]

GROUPS = ("r", "c", "f")
GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}
GROUP_COLORS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}


#: LVIS frequency group from a training image count: <= 10 'r', 11-100 'c', > 100 'f' (the one
#: definition, :func:`taildet.data.lvis_validate.frequency_group`).
frequency_from_image_count = frequency_group


def _load_whole(path: str) -> Mapping[str, Any]:
    """The file as ``json.load`` reads it (text mode, UTF-8), with this module's errors."""
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
    return data


def _load(ann: str | os.PathLike | Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """The path (or ``"<dict>"``) and the data, its annotations read as :class:`_AnnotationIds`
    a batch at a time (:mod:`taildet.data.json_stream`): LVIS train's 1.3 M annotation objects,
    with their polygons, never exist at once."""
    if isinstance(ann, Mapping):
        return "<dict>", ann
    path = str(ann)
    try:
        data = read_json_object(path, {"annotations": _AnnotationIds}, lambda: _load_whole(path),
                                translate_newlines=True)
    except FileNotFoundError:
        raise DataError(path, "", "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "", "is a directory, not an annotation JSON file") from None
    except OSError as exc:
        raise DataError(path, "", f"cannot read the file: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(path, f"line {exc.lineno} column {exc.colno}", f"not valid JSON: {exc.msg}") from None
    return path, data


_I64 = 2**63 - 1


def _id_row(a: Any) -> tuple | None:
    """(category_id, image_id, id, has id) of a plain annotation, None for any other."""
    if type(a) is not dict:
        return None
    cid, iid, aid = a.get("category_id"), a.get("image_id"), a.get("id", _NO_ID)
    if type(cid) is not int or type(iid) is not int or not (-_I64 <= cid <= _I64 and -_I64 <= iid <= _I64):
        return None
    if aid is _NO_ID:
        return (cid, iid, 0, 0)
    if type(aid) is not int or not -_I64 <= aid <= _I64:
        return None
    return (cid, iid, aid, 1)


_NO_ID = object()


class _AnnotationIds:
    """An annotations list as int64 rows (category_id, image_id, id, has id) for the plain ones;
    the others are kept as they are (``odd``: position -> object) for the exact checks."""

    wants_text = False

    def __init__(self) -> None:
        self._rows: list[np.ndarray] = []
        self.odd: dict[int, Any] = {}
        self.n = 0

    def add_batch(self, items: list, texts: list[str] | None = None) -> None:
        rows = [_id_row(a) for a in items]
        for j, r in enumerate(rows):
            if r is None:
                self.odd[self.n + j] = items[j]
                rows[j] = (0, 0, 0, 0)
        self._rows.append(np.array(rows, dtype=np.int64).reshape(-1, 4))
        self.n += len(items)

    def finish(self) -> _AnnotationIds:
        self.rows = np.concatenate(self._rows) if self._rows else np.zeros((0, 4), dtype=np.int64)
        self._rows = []
        return self

    @classmethod
    def of(cls, anns: list) -> _AnnotationIds:
        out = cls()
        for s in range(0, len(anns), 4096):
            out.add_batch(anns[s:s + 4096])
        return out.finish()


def _lookup(index: dict[Any, int], values: np.ndarray) -> np.ndarray:
    """``index[v]`` for each int64 ``v`` (``index``: int id -> position), -1 where absent."""
    keys = np.array([k for k in index if -_I64 <= k <= _I64], dtype=np.int64)
    if not keys.size:
        return np.full(len(values), -1, dtype=np.int64)
    pos = np.array([index[k] for k in keys.tolist()], dtype=np.int64)
    order = np.argsort(keys)
    keys, pos = keys[order], pos[order]
    at = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
    return np.where(keys[at] == values, pos[at], -1)


def _annotation_index(path: str, anns: _AnnotationIds, cat_index: dict, image_index: dict):
    """(category position, image position) per annotation; the first problem (in file order) raises."""
    rows = anns.rows
    ann_cat, ann_img = _lookup(cat_index, rows[:, 0]), _lookup(image_index, rows[:, 1])
    odd = np.zeros(len(rows), dtype=bool)
    odd[list(anns.odd)] = True
    for i in np.flatnonzero(odd | (ann_cat < 0) | (ann_img < 0)).tolist():
        if i not in anns.odd:  # a plain annotation with an unknown id
            cid, iid, aid, has_id = rows[i].tolist()
            item = f"annotation id {aid if has_id else '?'}"
            if ann_cat[i] < 0:
                raise DataError(path, item, f"category_id {cid!r} is not in 'categories'")
            raise DataError(path, item, f"image_id {iid!r} is not in 'images'")
        a = anns.odd[i]
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
    return ann_cat, ann_img


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
        if not isinstance(data[key], (list, _AnnotationIds) if key == "annotations" else list):
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

    if not isinstance(anns, _AnnotationIds):
        anns = _AnnotationIds.of(anns)
    n_anns = anns.n
    ann_cat, ann_img = _annotation_index(path, anns, cat_index, image_index)

    instance_count = np.bincount(ann_cat, minlength=num_classes).astype(np.int64)
    if n_anns:
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
        "num_annotations": n_anns,
        "num_classes": num_classes,
        "num_images_with_annotations": int(np.unique(ann_img).size),
        "groups": groups,
        "group_image_counts": group_images,
        "group_instance_counts": group_instances,
        "frequency_source": source,
        "classes": classes,
        "imbalance_ratio": imbalance,
    }


def format_stats(stats: Mapping[str, Any], examples: int = 5) -> str:
    """A readable text summary: totals, a per-group table, and head / tail classes."""
    lines = [
        f"Dataset: {stats.get('file', '?')}",
        f"  images: {stats['num_images']} ({stats.get('num_images_with_annotations', '?')} annotated)"
        f"   instances: {stats['num_annotations']}   classes: {stats['num_classes']}",
    ]
    ratio = stats.get("imbalance_ratio")
    lines.append(
        "  imbalance ratio (max/min non-zero image count): " + ("n/a" if ratio is None else f"{ratio:.1f}")
    )
    lines.append(f"  frequency groups from: {stats.get('frequency_source', '?')}")
    lines.append("")
    header = f"  {'group':<14}{'classes':>9}{'images':>10}{'instances':>12}"
    lines += [header, "  " + "-" * (len(header) - 2)]
    gi, gn = stats.get("group_image_counts", {}), stats.get("group_instance_counts", {})
    for g in GROUPS:
        lines.append(
            f"  {GROUP_NAMES[g] + ' (' + g + ')':<14}{stats['groups'][g]:>9}{gi.get(g, 0):>10}{gn.get(g, 0):>12}"
        )
    classes = sorted(stats["classes"], key=lambda c: (-c["image_count"], -c["instance_count"], str(c["id"])))
    if classes and examples > 0:
        def row(c: Mapping[str, Any]) -> str:
            return (f"    {str(c['id']):>6}  {c['name'][:28]:<28} {c['frequency']}"
                    f"  {c['image_count']:>7} img  {c['instance_count']:>8} inst")

        lines += ["", f"  head (top {min(examples, len(classes))} by image count):"]
        lines += [row(c) for c in classes[:examples]]
        present = [c for c in classes if c["image_count"] > 0]
        tail = present[-examples:][::-1]
        if tail:
            lines += [f"  tail (bottom {len(tail)} with at least one image):"]
            lines += [row(c) for c in tail]
        absent = len(classes) - len(present)
        if absent:
            lines.append(f"  {absent} classes have no image in this file")
    return "\n".join(lines)


def plot_long_tail(
    stats: Mapping[str, Any],
    out_png: str | os.PathLike,
    title: str | None = None,
    count: str = "image_count",
) -> str:
    """Bar chart of image count per class, sorted descending, coloured by frequency group.

    ``count`` picks the per-class number plotted: ``"image_count"`` (computed from the file, the
    default) or ``"declared_image_count"`` (LVIS's ``image_count`` field as stored in the
    categories, e.g. the full split's counts in a file holding a subset of it).

    Log y axis with dashed lines at 10 and 100 images (the r/c and c/f boundaries). Classes
    with no image are kept at the right end (no visible bar). Uses the Agg canvas directly, so the
    global matplotlib backend is left alone. Returns the written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional: matplotlib, imported on use
    from matplotlib.figure import Figure  # optional: matplotlib, imported on use
    from matplotlib.patches import Patch  # optional: matplotlib, imported on use

    if count not in ("image_count", "declared_image_count"):
        raise ValueError(f"count must be 'image_count' or 'declared_image_count', got {count!r}")
    missing = [c["id"] for c in stats["classes"] if count not in c]
    if missing:
        raise DataError(stats.get("file", "stats"), f"category id {missing[0]}", f"has no '{count}'")
    classes = sorted(stats["classes"], key=lambda c: (-c[count], str(c["id"])))
    counts = np.array([c[count] for c in classes], dtype=np.float64)
    colors = [GROUP_COLORS.get(c["frequency"], "#7f7f7f") for c in classes]

    fig = Figure(figsize=(10, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(classes))
    if len(classes):
        ax.bar(x, np.where(counts > 0, counts, np.nan), width=1.0, color=colors, linewidth=0)
    ax.set_yscale("log")
    top = max(float(counts.max()) if counts.size else 1.0, 100.0)
    ax.set_ylim(0.8, top * 1.5)
    ax.set_xlim(-0.5, max(len(classes), 1) - 0.5)
    for y in (10, 100):
        ax.axhline(y, color="0.3", linestyle="--", linewidth=0.8)
    ax.set_xlabel(f"classes sorted by {count.replace('_', ' ')}")
    ax.set_ylabel("images containing the class (log)")
    handles = [
        Patch(color=GROUP_COLORS[g], label=f"{GROUP_NAMES[g]} ({stats['groups'][g]})") for g in GROUPS
    ]
    ax.legend(handles=handles, loc="upper right", title="frequency group")
    name = Path(str(stats.get("file", "dataset"))).name
    ax.set_title(title or f"Long tail of {name}: {stats['num_classes']} classes, {stats['num_images']} images")
    fig.tight_layout()
    out = Path(out_png)
    atomic_write(out, lambda fh: fig.savefig(fh, format="png"))
    return str(out)
