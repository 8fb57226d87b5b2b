"""The embedded long-tail detection dataset: taildet's default data, generated in seconds.

``make_dataset(out_dir)`` writes a small LVIS v1-format dataset (two JSON files and PNG images) so
that every recipe runs without downloads, and so that the demo shows the long-tail problem on 2 CPU
cores: a tiny detector trained with random sampling scores far lower on the rare classes than on the
frequent ones, and repeat factor sampling narrows that gap.

Design (``describe_design()`` prints it with the per-class counts of a given seed)
---------------------------------------------------------------------------------
Classes
    48 classes = 8 shapes x 6 colours, named ``<colour>_<shape>`` (``"purple_star"``).
    Shapes: circle (32-gon), square, triangle, diamond, star (5 points), cross, semicircle, arrow.
    Colours: red, orange, yellow, green, blue, purple. Category ids are 1-based and shape-major:
    ``id = 1 + 6 * shape_index + colour_index`` (ids 1-6 are the six circles). The layout does not
    depend on the seed; only which class is frequent or rare does.
Long-tailed frequencies
    Every class gets a target number of training *images* from a piecewise log-linear (Zipf-like)
    curve: 10 frequent classes with 320 down to 105 images, 20 common classes with 95 down to 11
    and 18 rare classes with 10 down to 1. A seeded permutation decides which class takes which rank,
    redrawn until every shape and every colour has at least one frequent and one rare member, and
    every colour a common one, so a tail class always shares an attribute with a head class (a rare
    ``purple_star`` next to a frequent ``purple_triangle`` or ``blue_star``): the detector can learn
    the attributes from the head and has to tell the tail apart by their combination.
    With LVIS's thresholds on training image counts (rare 1-10, common 11-100, frequent > 100) the
    groups at ``scale=1`` are exactly 18 rare, 20 common and 10 frequent classes.
Images
    ``image_size`` (96) px square RGB PNGs with 1-4 objects (1-4 distinct classes; an object's class
    appears a second time in the same image with probability 0.15 while the image holds fewer than
    4 objects). Backgrounds are low-saturation grey with a random tint, a linear gradient and
    Gaussian noise (sigma 5), so no object colour occurs in them. Objects are flat-coloured polygons
    (per-object colour jitter of +-12 per channel) whose longer box side is 14-40 px at 96 px
    (at most 34 / 30 px when an image holds 3 / 4 objects; all sizes scale with ``image_size``),
    aspect jitter 0.85-1.15, rotation jitter +-12 degrees. Boxes may
    overlap slightly but shapes never share a pixel and keep a 1 px gap, so every object is fully
    visible and its mask is exactly its annotation.
Annotations (LVIS v1)
    ``segmentation`` is the shape's true outline polygon (a circle is a 32-gon) in COCO pixel
    coordinates, ``bbox`` its tight xywh box, ``area`` its polygon (shoelace) area. The pixels are
    painted from pycocotools' rasterisation of that very polygon (the rasteriser LVIS/COCO
    evaluation uses), so drawn pixels and decoded segmentation agree exactly. (PIL's ImageDraw fills
    polygon boundaries inclusively, about 6 % more pixels than the polygon area, IoU about 0.94 with
    the decoded mask, which is why it is not used for the shapes.)
    ``neg_category_ids``: 4-8 classes absent from the image, half of them (where possible)
    "confusable" classes sharing a shape or a colour with an object in the image, the rest random.
    They are verifiably absent because the generator annotates every instance it draws.
    ``not_exhaustive_category_ids`` is always empty for the same reason: every instance of every
    class present in an image is annotated.
    ``categories`` carry ``frequency``, ``image_count`` and ``instance_count`` computed from the
    TRAIN annotations; val.json repeats the same category list with the same statistics, as LVIS does.
Validation split
    Balanced-ish, so APr is measurable: each class appears in ``round(14 + 0.08 * train images)``
    val images (14-40) at ``scale=1``, about 350 val images in all; every class at least once at
    any scale.
Scale
    ``scale`` multiplies every class's train and val image counts (rounded, at least 1 each), so the
    numbers of images scale with it. The frequency *group* of a class is kept: ``frequency`` is
    LVIS's rule applied to the class's image count at scale 1 (roughly: LVIS thresholds multiplied
    by ``scale``, up to rounding), so ``scale=0.2`` still has rare, common and frequent classes for
    quick tests and ``scale=2`` does not turn rare classes into common ones. At ``scale=1`` the
    label equals LVIS's rule on the actual train image counts. Code that recomputes groups from
    ``image_count`` with LVIS's fixed thresholds will disagree at other scales (at 0.2 there are no
    classes with > 100 images): read the ``frequency`` field.
Larger vocabulary (``vocabulary="lvis"``; ``data.synthetic.vocabulary: lvis``)
    150 classes = 10 shapes (the 8 above, pentagon, hexagon) x 15 colours (the 6 above, pink,
    brown, cyan, lime, navy, magenta, teal, maroon, olive), ids ``1 + 15 * shape + colour``, whose
    rare / common / frequent shares follow LVIS v1 (337 / 461 / 405 of 1,203 -> 42 / 57 / 51 of
    150), with the same per-group image-count ranges and attribute constraints. At ``scale=1`` it
    holds about 4x the default's images; ``scale=0.25`` gives about the default's number of
    training images (more classes, fewer images each) with the groups kept. The default
    vocabulary's output and ``meta.json`` are unchanged by this option.

Determinism: everything derives from numpy Generators seeded by ``(seed, purpose[, image index])``,
no global RNG, so the same seed gives byte-identical JSON and identical PNG bytes whatever
``num_workers`` is. ``OUT_DIR/meta.json`` records (seed, scale, image_size, generator version,
and the vocabulary when it is not the default); a
directory already holding a complete dataset with the same record is reused as it is.

The vocabularies and the drawing of one image are in :mod:`taildet.data.synthetic_render`.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from taildet.data.synthetic_render import (COLOURS, SHAPES, VOCABULARIES, _DEFAULT_VOCAB, Vocabulary, _vocabulary,
                                           draw_image)
from taildet.data.synthetic_render import NUM_CLASSES as NUM_CLASSES, _RGB as _RGB  # re-exported
from taildet.errors import ConfigError, OutputError
from taildet.fileio import check_output_path

__all__ = [
    "COLOURS",
    "GENERATOR_VERSION",
    "LVIS_COMMON_MAX",
    "LVIS_RARE_MAX",
    "SHAPES",
    "VOCABULARIES",
    "Vocabulary",
    "describe_design",
    "design_counts",
    "draw_image",
    "frequency_group",
    "make_dataset",
]

#: Bump when the generated pixels or JSON change, so cached directories are regenerated.
GENERATOR_VERSION = 1


#: LVIS frequency thresholds on the number of training images that contain a class.
LVIS_RARE_MAX = 10
LVIS_COMMON_MAX = 100

# Train image counts per rank at scale 1: piecewise log-linear (Zipf-like) per group.
_GROUP_RANGES = {"f": (320, 105), "c": (95, 11), "r": (10, 1)}
# Val image counts: round(_VAL_BASE + _VAL_SLOPE * train_count), clipped to [_VAL_BASE, _VAL_MAX].
_VAL_BASE, _VAL_SLOPE, _VAL_MAX = 14, 0.08, 40
# Distinct classes per image (1-4) and the chance of a second instance of a class.
_CLASSES_PER_IMAGE_P = (0.2, 0.3, 0.3, 0.2)
_DUPLICATE_P = 0.15
_MAX_OBJECTS = 4
_NEG_RANGE = (4, 8)
_MIN_IMAGE_SIZE = 48
_SPLIT_CODES = {"train": 1, "val": 2}
_FILE_RE = re.compile(r"^\d{6,}\.png$")

#: ``info.description`` of the annotation files this generator writes (first key of the file).
_INFO_DESCRIPTION = "taildet synthetic long-tail detection dataset"


def frequency_group(image_count: int) -> str:
    """LVIS frequency group of a class that appears in ``image_count`` training images."""
    if image_count <= LVIS_RARE_MAX:
        return "r"
    if image_count <= LVIS_COMMON_MAX:
        return "c"
    return "f"


def _rank_counts(vocab: Vocabulary = _DEFAULT_VOCAB) -> list[tuple[int, str]]:
    """(train image count at scale 1, group) per rank, most frequent first."""
    out = []
    for g, n in vocab.group_sizes:
        hi, lo = _GROUP_RANGES[g]
        for v in np.geomspace(hi, lo, n):
            out.append((int(round(float(v))), g))
    return out


def _check_args(seed: Any, scale: Any, image_size: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or scale <= 0:
        raise ConfigError(f"scale: expected a positive finite number, got {scale!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or image_size < _MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size: expected an integer >= {_MIN_IMAGE_SIZE}, got {image_size!r}")


def design_counts(seed: int = 0, scale: float = 1.0, vocabulary: str = "default") -> list[dict[str, Any]]:
    """The per-class design of a seed: one dict per category id 1..48 (1..150 with the ``"lvis"``
    vocabulary), in id order.

    Keys: ``id``, ``name``, ``shape``, ``colour``, ``rank`` (0 = most frequent), ``frequency``
    (the LVIS group at scale 1, kept at every scale), ``train_images`` and ``val_images`` (how many
    images of each split contain the class at this ``scale``; the generator meets them exactly).
    """
    _check_args(seed, scale, 1 << 30)
    vocab = _vocabulary(vocabulary)
    n_classes = vocab.num_classes
    rng = np.random.default_rng([int(seed), 101])
    ranks = _rank_counts(vocab)
    groups = np.array([g for _, g in ranks])
    for _ in range(100_000):
        perm = rng.permutation(n_classes)  # perm[rank] = class index (0-based)
        grp = np.empty(n_classes, dtype="<U1")
        grp[perm] = groups
        grid = grp.reshape(len(vocab.shapes), len(vocab.colours))
        ok = all(("f" in row and "r" in row) for row in grid) and all(
            ("f" in col and "r" in col and "c" in col) for col in grid.T)
        if ok:
            break
    else:  # pragma: no cover - the acceptance rate is a few percent
        raise RuntimeError("could not draw a class permutation meeting the attribute constraints")
    names = vocab.class_names()
    rank_of = np.empty(n_classes, dtype=int)
    rank_of[perm] = np.arange(n_classes)
    out = []
    for k in range(n_classes):
        r = int(rank_of[k])
        n1, g = ranks[r]
        nval1 = min(_VAL_MAX, max(_VAL_BASE, int(round(_VAL_BASE + _VAL_SLOPE * n1))))
        s, c = vocab.shape_colour(k + 1)
        out.append({
            "id": k + 1,
            "name": names[k],
            "shape": vocab.shapes[s],
            "colour": vocab.colours[c],
            "rank": r,
            "frequency": g,
            "train_images": max(1, int(round(n1 * scale))),
            "val_images": max(1, int(round(nval1 * scale))),
        })
    return out


def describe_design(seed: int = 0, scale: float = 1.0, vocabulary: str = "default") -> str:
    """A human-readable account of the generator and of the class table of ``seed``."""
    vocab = _vocabulary(vocabulary)
    design = design_counts(seed, scale, vocab.name)
    lines = [
        f"taildet synthetic long-tail dataset (generator v{GENERATOR_VERSION}, seed {seed}, "
        f"scale {scale:g}" + ("" if vocab.name == "default" else f", vocabulary {vocab.name}") + ")",
        f"{vocab.num_classes} classes = {len(vocab.shapes)} shapes x {len(vocab.colours)} colours; "
        f"ids shape-major (id = 1 + {len(vocab.colours)} * shape + colour).",
        "Images: 1-4 objects, 14-40 px at 96 px, flat-coloured polygons on a noisy grey background.",
        "Train image counts per class: piecewise log-linear (Zipf-like) 320..105 (frequent), "
        "95..11 (common), 10..1 (rare) at scale 1; val is balanced-ish (14-40 images per class).",
    ]
    for g, label in (("f", "frequent"), ("c", "common"), ("r", "rare")):
        members = sorted((d for d in design if d["frequency"] == g), key=lambda d: d["rank"])
        lines.append(f"{label} ({len(members)} classes):")
        lines.append("  " + ", ".join(
            f"{d['name']}={d['train_images']}/{d['val_images']}" for d in members))
    lines.append("(name=train images/val images)")
    grid = {(d["shape"], d["colour"]): d["frequency"] for d in design}
    lines.append("group grid (rows shapes, columns " + " ".join(c[:3] for c in vocab.colours) + "):")
    for s in vocab.shapes:
        lines.append(f"  {s:<10} " + "   ".join(grid[(s, c)] for c in vocab.colours))
    return "\n".join(lines)


def _pack(counts: dict[int, int], rng: np.random.Generator) -> list[list[int]]:
    """Group class occurrences into images: each image holds 1-4 distinct classes (plus a chance
    of a second instance of a class); class k lands in exactly ``counts[k]`` images."""
    slots = np.repeat(np.array(sorted(counts), dtype=int),
                      [counts[k] for k in sorted(counts)])
    queue = [int(x) for x in rng.permutation(slots)]
    images: list[list[int]] = []
    probs = np.array(_CLASSES_PER_IMAGE_P)
    while queue:
        want = int(rng.choice(len(probs), p=probs)) + 1
        chosen: list[int] = []
        rest: list[int] = []
        i = 0
        while i < len(queue) and len(chosen) < want:
            k = queue[i]
            (rest if k in chosen else chosen).append(k)
            i += 1
        queue = rest + queue[i:]
        objects: list[int] = []
        for k in chosen:
            objects.append(k)
        for k in chosen:
            if len(objects) < _MAX_OBJECTS and rng.random() < _DUPLICATE_P:
                objects.append(k)
        images.append(sorted(objects))
    return images


def _neg_ids(present: set[int], rng: np.random.Generator, vocab: Vocabulary = _DEFAULT_VOCAB) -> list[int]:
    """4-8 absent classes: half confusable (sharing a shape or colour with an object), half random."""
    attrs = [vocab.shape_colour(k) for k in present]
    absent = [k for k in range(1, vocab.num_classes + 1) if k not in present]
    confusable = [k for k in absent
                  if any(vocab.shape_colour(k)[0] == s or vocab.shape_colour(k)[1] == c for s, c in attrs)]
    n = int(rng.integers(_NEG_RANGE[0], _NEG_RANGE[1] + 1))
    n_conf = min(n // 2, len(confusable))
    picked = [int(x) for x in rng.choice(confusable, n_conf, replace=False)] if n_conf else []
    others = [k for k in absent if k not in picked]
    picked += [int(x) for x in rng.choice(others, min(n - n_conf, len(others)), replace=False)]
    return sorted(picked)


def _render(job: tuple) -> tuple[list[int], list[tuple[int, list[float], list[float], float]]]:
    """Draw one image, write its PNG, return (neg_category_ids, [(cat, polygon, bbox, area)])."""
    seed, split_code, index, size, objects, path, vocabulary = job
    rng = np.random.default_rng([seed, 200 + split_code, index])
    vocab = _vocabulary(vocabulary)
    img, anns = draw_image(rng, size, objects, vocab.name)
    neg = _neg_ids(set(objects), rng, vocab)  # after the drawing: the same stream as before the split
    Image.fromarray(img, "RGB").save(path, format="PNG", optimize=False, compress_level=1)
    return neg, anns


def _default_workers(n_images: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    if n_images < 600:
        return 1
    return max(1, min(cpus, 4))


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _meta_record(seed: int, scale: float, image_size: int, vocabulary: str = "default") -> dict[str, Any]:
    rec = {"generator": "taildet.data.synthetic", "version": GENERATOR_VERSION,
           "seed": int(seed), "scale": float(scale), "image_size": int(image_size)}
    # the default vocabulary leaves the record (and so every cached directory) as it was
    return rec if vocabulary == "default" else {**rec, "vocabulary": vocabulary}


def _reusable(out: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    meta = _read_json(out / "meta.json")
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in record.items()):
        return None
    if meta.get("vocabulary", "default") != record.get("vocabulary", "default"):
        return None
    image_dir = out / "images"
    for split in ("train", "val"):
        data = _read_json(out / "annotations" / f"{split}.json")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            return None
        if meta.get(f"num_{split}_images") != len(data["images"]):
            return None
        for im in data["images"]:
            if not (image_dir / im["file_name"]).is_file():
                return None
    return meta


def _check_ours(path: Path) -> None:
    """OutputError unless ``path`` is missing or an annotation file this generator wrote (its
    ``info.description`` opens the file): regenerating would overwrite someone's dataset."""
    if not os.path.lexists(path):
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as e:
        raise OutputError(f"cannot regenerate {path}: {e.strerror or e}") from None
    if _INFO_DESCRIPTION.encode() not in head:
        raise OutputError(f"{path}: not written by taildet data synth; it would be overwritten (and the "
                          "images beside it deleted): choose an empty or new folder")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, separators=(",", ":"))
    os.replace(tmp, path)


def make_dataset(out_dir: str | os.PathLike, seed: int = 0, scale: float = 1.0, *,
                 image_size: int = 96, num_workers: int | None = None,
                 progress: bool = True, vocabulary: str = "default") -> dict[str, Any]:
    """Generate (or reuse) the embedded long-tail dataset under ``out_dir``.

    Writes ``out_dir/annotations/{train,val}.json`` (LVIS v1 format), PNGs under
    ``out_dir/images/{train,val}/`` (``file_name`` is relative to ``out_dir/images``, e.g.
    ``"train/000001.png"``) and ``out_dir/meta.json``. If ``out_dir`` already holds a complete
    dataset made with the same seed, scale, image size and generator version it is reused as is.
    The output depends only on (seed, scale, image_size), never on ``num_workers``.

    Args:
        out_dir: target directory (created if missing).
        seed: non-negative integer; same seed, same bytes.
        scale: multiplies every class's train and val image counts (groups r/c/f are kept).
        image_size: side of the square images in px (object sizes scale with it), >= 48.
        num_workers: processes for rendering; ``None`` picks 1 for small sets, else up to 4.
        progress: show tqdm progress bars.
        vocabulary: ``"default"`` (48 classes) or ``"lvis"`` (150 classes with LVIS v1's
            rare / common / frequent shares; see :data:`VOCABULARIES`).

    Returns:
        dict with ``train_json``, ``val_json``, ``image_dir`` (str paths), ``num_train_images``,
        ``num_val_images``, ``num_classes`` and ``reused`` (True when nothing was generated).
    """
    _check_args(seed, scale, image_size)
    vocab = _vocabulary(vocabulary)
    seed, scale, image_size = int(seed), float(scale), int(image_size)
    out = Path(out_dir)
    ann_dir, image_dir = out / "annotations", out / "images"
    record = _meta_record(seed, scale, image_size, vocab.name)

    def result(n_train: int, n_val: int, reused: bool) -> dict[str, Any]:
        return {"train_json": str(ann_dir / "train.json"), "val_json": str(ann_dir / "val.json"),
                "image_dir": str(image_dir), "num_train_images": n_train,
                "num_val_images": n_val, "num_classes": vocab.num_classes, "reused": reused}

    meta = _reusable(out, record)
    if meta is not None:
        return result(meta["num_train_images"], meta["num_val_images"], True)

    # Never overwrite a dataset this generator did not write (a folder with the same layout).
    for split in ("train", "val"):
        _check_ours(ann_dir / f"{split}.json")
    check_output_path(out, directory=True, what="dataset")
    # Regenerate: drop the old record first, so an interrupted run is never reused, and clear
    # only files this generator writes.
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    ann_dir.mkdir(exist_ok=True)
    for split in ("train", "val"):
        d = image_dir / split
        d.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(d):
            if entry.is_file() and _FILE_RE.match(entry.name):
                os.unlink(entry.path)

    t0 = time.perf_counter()
    design = design_counts(seed, scale, vocab.name)
    layouts = {
        split: _pack({d["id"]: d[f"{split}_images"] for d in design},
                     np.random.default_rng([seed, 102 + _SPLIT_CODES[split]]))
        for split in ("train", "val")
    }
    total = sum(len(v) for v in layouts.values())
    workers = _default_workers(total) if num_workers is None else max(1, int(num_workers))

    images: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    annotations: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    next_image_id, next_ann_id = 1, 1
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        for split in ("train", "val"):
            jobs, records = [], []
            for index, objects in enumerate(layouts[split]):
                image_id = next_image_id + index
                file_name = f"{split}/{image_id:06d}.png"
                jobs.append((seed, _SPLIT_CODES[split], index, image_size, objects,
                             str(image_dir / file_name), vocab.name))
                records.append({"id": image_id, "file_name": file_name, "width": image_size,
                                "height": image_size})
            next_image_id += len(jobs)
            it = (pool.map(_render, jobs, chunksize=32) if pool is not None else map(_render, jobs))
            for rec, (neg, anns) in tqdm(zip(records, it), total=len(jobs), disable=not progress,
                                         desc=f"synthetic {split}", unit="img", leave=False):
                rec["neg_category_ids"] = neg
                rec["not_exhaustive_category_ids"] = []
                images[split].append(rec)
                for k, flat, bbox, area in anns:
                    annotations[split].append({
                        "id": next_ann_id, "image_id": rec["id"], "category_id": k,
                        "bbox": bbox, "area": area, "segmentation": [flat], "iscrowd": 0})
                    next_ann_id += 1
    finally:
        if pool is not None:
            pool.shutdown()

    # Category statistics from the TRAIN annotations, repeated in val.json as LVIS does.
    img_sets: dict[int, set[int]] = {d["id"]: set() for d in design}
    inst: dict[int, int] = {d["id"]: 0 for d in design}
    for a in annotations["train"]:
        img_sets[a["category_id"]].add(a["image_id"])
        inst[a["category_id"]] += 1
    categories = []
    for d in design:
        categories.append({
            "id": d["id"], "name": d["name"], "synset": f"{d['name']}.n.01",
            "synonyms": [d["name"]],
            "def": f"a {d['colour']} {d['shape']} drawn by taildet's synthetic generator",
            "frequency": d["frequency"],
            "image_count": len(img_sets[d["id"]]), "instance_count": inst[d["id"]],
        })
    for split in ("train", "val"):
        info = {"description": _INFO_DESCRIPTION, "split": split,
                **{k: v for k, v in record.items() if k != "generator"},
                "exhaustive": "every instance is annotated; not_exhaustive_category_ids is empty"}
        _write_json(ann_dir / f"{split}.json", {
            "info": info, "licenses": [], "images": images[split],
            "annotations": annotations[split], "categories": categories})
    n_train, n_val = len(images["train"]), len(images["val"])
    _write_json(out / "meta.json", {**record, "num_train_images": n_train,
                                    "num_val_images": n_val, "num_classes": vocab.num_classes,
                                    "seconds": round(time.perf_counter() - t0, 2)})
    return result(n_train, n_val, False)
