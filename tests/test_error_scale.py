"""The error analysis at scale (taildet.evaluation.error_types, error_ap): the vectorised TIDE typing
equals a plain per-detection loop (the analysis as first written, kept here as the reference, with
error_analysis._error_type, the one-detection rule tested by hand in test_error_analysis.py), and the
AP50-only evaluation of chosen classes equals the evaluator's per-class AP50."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from taildet.evaluation.error_analysis import _error_type
from taildet.evaluation.error_ap import per_class_ap50
from taildet.evaluation.error_types import FG_IOU, classify, first_max, pair_keys
from taildet.evaluation.federated import PairIndex, _detections, evaluate_federated
from taildet.evaluation.lvis_gt import _prepare_gt
from taildet.evaluation.result_columns import read_result_columns


def _classify_ref(img, cat, score, gt_img, gt_cat, iou_fn, not_exhaustive):
    """The per-detection loop: per image, detections by score, greedy matching, then the types."""
    n = len(score)
    kind, target, gt_used = np.full(n, "", dtype=object), np.full(n, -1, np.int64), np.zeros(len(gt_cat), bool)
    gts_of, dets_of = defaultdict(list), defaultdict(list)
    for j, im in enumerate(gt_img.tolist()):
        gts_of[im].append(j)
    for i, im in enumerate(img.tolist()):
        dets_of[im].append(i)
    for im, didx in dets_of.items():
        didx = np.array(didx, dtype=np.int64)
        didx = didx[np.argsort(-score[didx], kind="stable")]
        gidx = np.array(gts_of.get(im, []), dtype=np.int64)
        ious = iou_fn(didx, gidx) if len(gidx) else np.zeros((len(didx), 0))
        same = cat[didx][:, None] == gt_cat[gidx][None, :]
        used = np.zeros(len(gidx), bool)
        for r, i in enumerate(didx.tolist()):
            cand = np.where(same[r] & ~used & (ious[r] >= FG_IOU), ious[r], -1.0)
            if len(cand) and cand.max() >= FG_IOU:
                j = int(np.argmax(cand))
                used[j] = True
                kind[i], target[i] = "TP", gidx[j]
        gt_used[gidx] = used
        for r, i in enumerate(didx.tolist()):
            if kind[i] == "TP":
                continue
            if (im, int(cat[i])) in not_exhaustive:
                kind[i] = "ignored"
                continue
            kind[i], t = _error_type(ious[r], same[r], used)
            target[i] = gidx[t] if t >= 0 else -1
    return kind, target, gt_used


def _box_iou(a, b):
    """IoU [n, m] of xywh boxes (boxes on a grid of 0.5 so that many IoUs tie or hit 0.1 / 0.5)."""
    x1, y1 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2])
    y2 = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return inter / (a[:, None, 2] * a[:, None, 3] + b[None, :, 2] * b[None, :, 3] - inter)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk", [1, 50, 10 ** 6])
def test_vectorised_types_equal_the_per_detection_loop(seed, chunk):
    rng = np.random.default_rng(seed)
    n_img, n_cls, m, n = 6, 4, 40, 300
    gt_img, gt_cat = rng.integers(1, n_img + 1, m), rng.integers(1, n_cls + 1, m)
    gt_box = np.c_[rng.integers(0, 8, (m, 2)) * 5.0, rng.integers(2, 5, (m, 2)) * 5.0]
    src = rng.integers(0, m, n)  # detections near a GT, some of another class, some anywhere
    img = np.where(rng.uniform(size=n) < 0.9, gt_img[src], rng.integers(1, n_img + 2, n))
    cat = np.where(rng.uniform(size=n) < 0.6, gt_cat[src], rng.integers(1, n_cls + 1, n))
    box = gt_box[src] + np.c_[rng.integers(-4, 5, (n, 2)) * 2.5, rng.integers(-1, 2, (n, 2)) * 2.5]
    box[:, 2:] = np.maximum(box[:, 2:], 2.5)
    score = rng.integers(0, 20, n) / 20.0  # many ties
    ne = {(int(i), int(c)) for i, c in zip(rng.integers(1, n_img + 1, 3), rng.integers(1, n_cls + 1, 3))}
    ne_img, ne_cat = np.array([i for i, _ in ne]), np.array([c for _, c in ne])

    def ious(di, gi):
        return _box_iou(box[di], gt_box[gi])

    want = _classify_ref(img, cat, score, gt_img, gt_cat, ious, ne)
    got = classify(img, cat, score, gt_img, gt_cat, ious, pair_keys(ne_img, ne_cat), chunk_pairs=chunk)
    kinds = set(want[0].tolist())
    assert {"TP", "Loc", "Cls", "Both", "Dupe", "Bkg", "ignored"} <= kinds  # every branch is exercised
    assert got[0].tolist() == want[0].tolist()
    assert got[1].tolist() == want[1].tolist()
    assert got[2].tolist() == want[2].tolist()


def test_first_max_takes_the_first_position_on_ties():
    values = np.array([0.2, 0.5, 0.5, -1.0, 0.3, 0.3, 0.1])
    mx, at = first_max(values, np.array([0, 3, 6]), np.array([10, 11, 12, 13, 14, 15, 16]))
    assert mx.tolist() == [0.5, 0.3, 0.1] and at.tolist() == [11, 14, 16]


def test_ap50_of_chosen_classes_equals_the_evaluators():
    """per_class_ap50 (IoU 0.5 only, only the classes asked for) == evaluate_federated's per_class_AP50,
    on random boxes with a verified negative, a not-exhaustive class and a class without GT."""
    rng = np.random.default_rng(3)
    images = [{"id": i, "width": 100, "height": 100, "neg_category_ids": [3] if i == 1 else [],
               "not_exhaustive_category_ids": [2] if i == 2 else []} for i in (1, 2, 3)]
    cats = [{"id": c, "name": f"c{c}", "frequency": f} for c, f in ((1, "f"), (2, "c"), (3, "r"), (4, "r"))]
    anns = []
    for k in range(15):
        x, y = rng.integers(0, 60, 2).tolist()
        anns.append({"id": k + 1, "image_id": k % 3 + 1, "category_id": k % 2 + 1, "bbox": [x, y, 20, 20],
                     "area": 400, "segmentation": [[x, y, x + 20, y, x + 20, y + 20, x, y + 20]]})
    dets = []
    for _ in range(80):
        a = anns[rng.integers(len(anns))]
        dx, dy = rng.integers(-9, 10, 2).tolist()
        c = a["category_id"] if rng.uniform() < 0.7 else int(rng.integers(1, 4))
        dets.append({"image_id": a["image_id"], "category_id": c, "score": float(rng.uniform()),
                     "bbox": [a["bbox"][0] + dx, a["bbox"][1] + dy, 20, 20]})
    gt = {"images": images, "categories": cats, "annotations": anns}
    pairs = PairIndex(gt)
    prep = _prepare_gt(gt, lvis=True, iou_type="bbox", file="gt")
    cols = read_result_columns(dets, pairs, "bbox")
    want = evaluate_federated(prep, cols, pairs, "bbox", False, 300, 10_000)[0]["per_class_AP50"]
    got = per_class_ap50(prep, cols, pairs, "bbox")
    assert set(got) == set(want) == {1, 2, 3, 4}
    assert 0 < want[1] < 1 and 0 < want[2] < 1 and np.isnan(want[4])
    for c in want:
        assert got[c] == want[c] or (np.isnan(got[c]) and np.isnan(want[c]))
    assert per_class_ap50(prep, cols, pairs, "bbox", [2]) == {2: want[2]}
    d = _detections(cols, pairs, "bbox", False, 300, 10_000)
    assert len(d["score"]) < len(dets)  # the federated filter dropped class-3 detections off image 1
