"""LVIS-v1-shaped annotation and result files at a chosen fraction of the real sizes (vectorised).

LVIS v1: train 100,170 images / 1,270,141 annotations, val 19,809 images / 244,707
annotations, 1,203 categories (405 frequent, 461 common, 337 rare by training image count), and
a submission of up to 300 detections per image. :func:`write_lvis_pair` writes

* ``train.json`` and ``val.json``: LVIS v1 instances files with the real numbers of images and
  annotations times ``fraction`` (categories stay 1,203). Each category's training image count
  follows a long-tail curve through (rank 1, 25000), (10, 10000), (50, 3000), (150, 700), (405, 101), (866, 11), (867, 10), (1203, 1) -- the r/c/f
  split of LVIS v1 at full size -- and is placed on that many distinct images; each (image,
  category) pair gets 1 + Poisson instances so the annotation total matches. Every image has
  ``neg_category_ids`` and ``not_exhaustive_category_ids``; every annotation a ``bbox``, an
  ``area`` and a one-part polygon of ``points`` points (an ellipse with radial jitter inside the
  box), written with two decimals as in the real files.
* ``results.json``: ``dets`` detections per val image (bbox, score): a jittered copy of most GT
  boxes with a high score, boxes of the image's negative categories and of random categories
  with lower scores -- so AP is far from 0 and 1 and the federated rules all apply.
* with ``segm=True`` also ``results_segm.json``: the same detections as RLE masks of their boxes
  (pycocotools), compressed counts as the official format has them.

Everything is written in streaming fashion, a chunk of records at a time, so the generator
itself needs little memory at full size. Deterministic for a given ``seed``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

TRAIN_IMAGES, TRAIN_ANNS = 100_170, 1_270_141
VAL_IMAGES, VAL_ANNS = 19_809, 244_707
NUM_CLASSES = 1203
# (rank, training image count) knots of the long-tail curve; log-linear between them.
_CURVE = ((1, 25000.0), (10, 10000.0), (50, 3000.0), (150, 700.0), (405, 101.0), (866, 11.0), (867, 10.0), (1203, 1.0))
_SIZES = np.array([(640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (640, 640)])


def category_image_counts(fraction: float = 1.0) -> np.ndarray:
    """int64 [1203]: training image count of each category (category id = index + 1), shuffled ranks."""
    rank = np.arange(1, NUM_CLASSES + 1, dtype=np.float64)
    knots_r = np.log([r for r, _ in _CURVE])
    knots_c = np.log([c for _, c in _CURVE])
    full = np.exp(np.interp(np.log(rank), knots_r, knots_c))
    counts = np.maximum(1, np.round(full * fraction)).astype(np.int64)
    perm = np.random.default_rng(1234).permutation(NUM_CLASSES)  # category ids are not sorted by count
    return counts[perm]


def frequency(full_counts: np.ndarray) -> np.ndarray:
    """'r' (<= 10 images), 'c' (11-100), 'f' (> 100) per category, as LVIS v1 defines them."""
    return np.where(full_counts <= 10, "r", np.where(full_counts <= 100, "c", "f"))


def _pairs(rng, counts: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(image index, category index) pairs: category c on counts[c] distinct random images, sorted by image."""
    counts = np.minimum(counts, n_images)
    img = np.concatenate([rng.choice(n_images, size=int(k), replace=False) for k in counts])
    cat = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((cat, img))
    return img[order], cat[order]


def _split(rng, fraction: float, n_full_images: int, n_full_anns: int, counts: np.ndarray):
    """Images (w, h), per-annotation (image index, category index), neg / not-exhaustive lists."""
    n_images = max(1, round(n_full_images * fraction))
    img, cat = _pairs(rng, counts, n_images)
    per_pair = n_full_anns * fraction / max(1, len(img))
    reps = 1 + rng.poisson(max(0.0, per_pair - 1.0), size=len(img))
    ann_img, ann_cat = np.repeat(img, reps), np.repeat(cat, reps)
    wh = _SIZES[rng.integers(0, len(_SIZES), size=n_images)]
    # Negative categories: 0-10 random categories per image, minus the image's positives.
    n_neg = rng.integers(0, 11, size=n_images)
    neg_img = np.repeat(np.arange(n_images), n_neg)
    neg_cat = rng.integers(0, NUM_CLASSES, size=len(neg_img))
    pos_key = set((img * NUM_CLASSES + cat).tolist())
    keep = np.array([k not in pos_key for k in (neg_img * NUM_CLASSES + neg_cat).tolist()], dtype=bool)
    neg_img, neg_cat = neg_img[keep], neg_cat[keep]
    # Not exhaustively annotated: 8% of the (image, category) pairs.
    nel = rng.random(len(img)) < 0.08
    return n_images, wh, ann_img, ann_cat, (neg_img, neg_cat), (img[nel], cat[nel])


def _boxes(rng, wh: np.ndarray, ann_img: np.ndarray) -> np.ndarray:
    """float64 [N, 4] xywh inside each annotation's image."""
    W = wh[ann_img, 0].astype(np.float64)
    H = wh[ann_img, 1].astype(np.float64)
    w = W * rng.uniform(0.03, 0.6, size=len(W))
    h = H * rng.uniform(0.03, 0.6, size=len(H))
    x = rng.uniform(0, 1, size=len(W)) * (W - w)
    y = rng.uniform(0, 1, size=len(H)) * (H - h)
    return np.round(np.stack([x, y, w, h], axis=1), 2)


def _polygons(rng, boxes: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
    """([N, 2*points] x0 y0 x1 y1 ..., [N] shoelace area) of jittered ellipses inside the boxes."""
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    r = rng.uniform(0.8, 1.0, size=(len(boxes), points))
    cx = boxes[:, :1] + boxes[:, 2:3] / 2
    cy = boxes[:, 1:2] + boxes[:, 3:4] / 2
    px = np.round(cx + r * np.cos(t) * boxes[:, 2:3] / 2, 2)
    py = np.round(cy + r * np.sin(t) * boxes[:, 3:4] / 2, 2)
    area = 0.5 * np.abs(np.sum(px * np.roll(py, -1, 1) - np.roll(px, -1, 1) * py, axis=1))
    return np.stack([px, py], axis=2).reshape(len(boxes), 2 * points), area


def _group(index: np.ndarray, values: np.ndarray, n: int) -> list[list[int]]:
    """values grouped by index (index sorted or not) into n lists of category ids."""
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(n + 1))
    v = (values[order] + 1).tolist()
    return [v[bounds[i]:bounds[i + 1]] for i in range(n)]


def write_instances(path: Path, rng, fraction: float, n_full_images: int, n_full_anns: int,
                    counts: np.ndarray, full_counts: np.ndarray, points: int, split: str,
                    image_id_offset: int = 0, chunk: int = 50_000) -> dict:
    """Write one LVIS v1 instances file; returns the ground truth kept for making results."""
    n_images, wh, ann_img, ann_cat, neg, nel = _split(rng, fraction, n_full_images, n_full_anns, counts)
    ids = np.arange(n_images) + 1 + image_id_offset
    negs = _group(neg[0], neg[1], n_images)
    nels = _group(nel[0], nel[1], n_images)
    freq = frequency(full_counts)
    boxes = _boxes(rng, wh, ann_img)
    with open(path, "w") as f:
        f.write('{"info": {"description": "taildet lvis_scale synthetic, fraction %g"}, "licenses": [], ' % fraction)
        cats = [{"id": c + 1, "name": f"category_{c + 1:04d}", "synset": f"category_{c + 1:04d}.n.01",
                 "synonyms": [f"category_{c + 1:04d}"], "def": "synthetic", "frequency": str(freq[c]),
                 "image_count": int(full_counts[c]), "instance_count": int(full_counts[c]) * 3}
                for c in range(NUM_CLASSES)]
        f.write('"categories": ' + json.dumps(cats) + ', "images": [')
        for i in range(n_images):
            im = {"id": int(ids[i]), "width": int(wh[i, 0]), "height": int(wh[i, 1]),
                  "file_name": f"{ids[i]:012d}.jpg",
                  "coco_url": f"http://images.cocodataset.org/{split}2017/{ids[i]:012d}.jpg",
                  "neg_category_ids": negs[i], "not_exhaustive_category_ids": nels[i]}
            f.write(("," if i else "") + json.dumps(im))
        f.write('], "annotations": [')
        tmpl = ('{"id": %d, "image_id": %d, "category_id": %d, "bbox": [%.2f, %.2f, %.2f, %.2f], '
                '"area": %.2f, "segmentation": [[' + ", ".join(["%.2f"] * (2 * points)) + ']]}')
        for s in range(0, len(ann_img), chunk):
            sl = slice(s, s + chunk)
            poly, area = _polygons(rng, boxes[sl], points)
            rows = np.concatenate([
                np.stack([np.arange(s, s + len(poly)) + 1 + image_id_offset * 20, ids[ann_img[sl]],
                          ann_cat[sl] + 1], axis=1).astype(np.float64),
                boxes[sl], area[:, None], poly], axis=1)
            f.write(("," if s else "") + ",".join(tmpl % tuple(r) for r in rows.tolist()))
        f.write("]}")
    return {"ids": ids, "wh": wh, "ann_img": ann_img, "ann_cat": ann_cat, "boxes": boxes, "negs": negs}


def write_results(path: Path, rng, gt: dict, dets: int, segm_path: Path | None = None,
                  chunk_images: int = 2000) -> int:
    """``dets`` detections per image (a jittered copy of 85% of the GT boxes, scores ~ U(0.2, 1);
    the image's negative categories and random categories, scores ~ U(0, 0.6)). Returns the count."""
    ids, wh, ann_img = gt["ids"], gt["wh"], gt["ann_img"]
    n_images = len(ids)
    bounds = np.searchsorted(ann_img, np.arange(n_images + 1))
    total = 0
    tmpl = '{"image_id": %d, "category_id": %d, "bbox": [%.2f, %.2f, %.2f, %.2f], "score": %.4f}'
    if segm_path is not None:
        from pycocotools import mask as mask_utils  # only for the optional segm results
        fs = open(segm_path, "w")
        fs.write("[")
    with open(path, "w") as f:
        f.write("[")
        first = True
        for s in range(0, n_images, chunk_images):
            recs = []
            for i in range(s, min(n_images, s + chunk_images)):
                a0, a1 = bounds[i], bounds[i + 1]
                keep = np.flatnonzero(rng.random(a1 - a0) < 0.85)[:dets] + a0
                tp_box = gt["boxes"][keep] * rng.uniform(0.9, 1.1, size=(len(keep), 4))
                n_rest = dets - len(keep)
                neg = np.array(gt["negs"][i], dtype=np.int64) - 1
                n_neg = min(len(neg) * 3, n_rest)
                cat_rest = np.concatenate([neg[rng.integers(0, max(1, len(neg)), size=n_neg)] if len(neg) else
                                           np.zeros(0, np.int64),
                                           rng.integers(0, NUM_CLASSES, size=n_rest - n_neg)])
                W, H = wh[i]
                bw = W * rng.uniform(0.03, 0.6, size=n_rest)
                bh = H * rng.uniform(0.03, 0.6, size=n_rest)
                rest_box = np.stack([rng.uniform(0, 1, n_rest) * (W - bw), rng.uniform(0, 1, n_rest) * (H - bh),
                                     bw, bh], axis=1)
                box = np.concatenate([tp_box, rest_box])
                box[:, 0] = np.minimum(box[:, 0], W - 1)
                box[:, 1] = np.minimum(box[:, 1], H - 1)
                box[:, 2] = np.clip(box[:, 2], 1, W - box[:, 0])
                box[:, 3] = np.clip(box[:, 3], 1, H - box[:, 1])
                cat = np.concatenate([gt["ann_cat"][keep], cat_rest]) + 1
                score = np.concatenate([rng.uniform(0.2, 1.0, len(keep)), rng.uniform(0.0, 0.6, n_rest)])
                recs.append(np.concatenate([np.stack([np.full(len(cat), ids[i]), cat], 1).astype(np.float64),
                                            box, score[:, None]], axis=1))
                if segm_path is not None:
                    rles = mask_utils.frPyObjects(box, int(H), int(W))
                    fs.write(("," if total else "") + ",".join(
                        json.dumps({"image_id": int(ids[i]), "category_id": int(c), "score": round(float(sc), 4),
                                    "segmentation": {"size": r["size"], "counts": r["counts"].decode()}})
                        for c, sc, r in zip(cat.tolist(), score.tolist(), rles)))
                total += len(cat)
            rows = np.concatenate(recs).tolist()
            f.write(("" if first else ",") + ",".join(tmpl % tuple(r) for r in rows))
            first = False
        f.write("]")
    if segm_path is not None:
        fs.write("]")
        fs.close()
    return total


def write_lvis_pair(out: str | os.PathLike, fraction: float = 1.0, points: int = 50, dets: int = 300,
                    segm: bool = False, seed: int = 0, progress=print) -> dict[str, Path]:
    """Write train.json, val.json, results.json (and results_segm.json) under ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    full = category_image_counts(1.0)
    counts = category_image_counts(fraction)
    val_counts = np.maximum(0, np.round(counts * VAL_IMAGES / TRAIN_IMAGES
                                        + rng.uniform(-0.5, 0.5, NUM_CLASSES))).astype(np.int64)
    paths = {"train": out / "train.json", "val": out / "val.json", "results": out / "results.json"}
    progress(f"writing {paths['train']} (fraction {fraction})")
    write_instances(paths["train"], rng, fraction, TRAIN_IMAGES, TRAIN_ANNS, counts, full, points, "train")
    progress(f"writing {paths['val']}")
    gt = write_instances(paths["val"], rng, fraction, VAL_IMAGES, VAL_ANNS, val_counts, full, points, "val",
                         image_id_offset=10_000_000)
    if segm:
        paths["results_segm"] = out / "results_segm.json"
    progress(f"writing {paths['results']}" + (" and results_segm.json" if segm else ""))
    write_results(paths["results"], rng, gt, dets, paths.get("results_segm"))
    return paths
