"""taildet.evaluation: LVIS federated AP, AP-fixed, COCO AP, results validation and I/O.

Hand-built fixtures have APs known by construction. 101-point interpolation: one of two GT found
by a single detection (precision 1 up to recall 0.5) gives AP = 51/101 (recall thresholds
0.00..0.50), at every IoU threshold.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random

import numpy as np
import pytest

from taildet.errors import DataError
from taildet.evaluation import (
    cap_per_image,
    evaluate_coco,
    evaluate_lvis,
    load_results,
    save_metrics,
    save_results,
    top_k_per_class,
)
from helpers import LVIS_VAL_100

SAMPLE = LVIS_VAL_100
HALF = 51 / 101


# ------------------------------------------------------------------------------ fixtures
def _img(i, neg=(), nel=(), w=200, h=200):
    return {"id": i, "width": w, "height": h, "neg_category_ids": list(neg),
            "not_exhaustive_category_ids": list(nel)}


def _cat(i, freq="f", **kw):
    c = {"id": i, "name": f"class{i}", "frequency": freq}
    c.update(kw)
    return c


def _ann(aid, img, cat, box):
    x, y, w, h = box
    return {"id": aid, "image_id": img, "category_id": cat, "bbox": list(box), "area": w * h,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


def _det(img, cat, box, score):
    return {"image_id": img, "category_id": cat, "bbox": list(box), "score": score}


def _gt(images, cats, anns):
    return {"images": images, "categories": cats, "annotations": anns}


@pytest.fixture
def fed_gt():
    """Class 1 (A) on image 1; class 2 (B) on images 1 and 2; class 3 (D) on image 2."""
    return _gt([_img(1), _img(2)], [_cat(1), _cat(2), _cat(3)],
               [_ann(1, 1, 1, (10, 10, 50, 50)), _ann(2, 1, 2, (100, 100, 40, 40)),
                _ann(3, 2, 2, (20, 20, 60, 60)), _ann(4, 2, 3, (120, 30, 50, 70))])


def _perfect(gt, score=0.9):
    return [_det(a["image_id"], a["category_id"], a["bbox"], score) for a in gt["annotations"]]


# --------------------------------------------------------------------- known-by-construction
def test_perfect_detections_give_ap_1(fed_gt):
    m = evaluate_lvis(fed_gt, _perfect(fed_gt))
    for k in ("AP", "AP50", "AP75", "APf", "AR@300"):
        assert m[k] == pytest.approx(1.0)
    assert m["per_class_AP"] == {1: pytest.approx(1.0), 2: pytest.approx(1.0), 3: pytest.approx(1.0)}
    assert m["num_images"] == 2 and m["num_detections"] == 4
    assert m["iou_type"] == "bbox" and m["fixed"] is False


def test_one_of_two_found_gives_51_over_101():
    gt = _gt([_img(1)], [_cat(1)], [_ann(1, 1, 1, (0, 0, 50, 50)), _ann(2, 1, 1, (100, 100, 50, 50))])
    m = evaluate_lvis(gt, [_det(1, 1, (0, 0, 50, 50), 1.0)])
    assert m["AP"] == pytest.approx(HALF, abs=1e-12)
    assert m["AP50"] == pytest.approx(HALF, abs=1e-12)
    assert m["AR@300"] == pytest.approx(0.5)


def test_fp_ranked_first_in_negative_class_halves_its_ap(fed_gt):
    fed_gt["images"][0]["neg_category_ids"] = [3]  # class 3 known absent from image 1
    dets = _perfect(fed_gt) + [_det(1, 3, (150, 150, 30, 30), 0.99)]
    m = evaluate_lvis(fed_gt, dets)
    # class 3: FP then TP -> precision 1/2 at recall 1 -> AP 0.5
    assert m["per_class_AP"][3] == pytest.approx(0.5, abs=1e-12)
    assert m["AP"] == pytest.approx((1 + 1 + 0.5) / 3, abs=1e-12)


def test_fp_of_unverified_class_is_ignored(fed_gt):
    # class 3 is neither annotated on image 1 nor in its neg_category_ids
    dets = _perfect(fed_gt) + [_det(1, 3, (150, 150, 30, 30), 0.99)]
    m = evaluate_lvis(fed_gt, dets)
    assert m["AP"] == pytest.approx(1.0)
    assert m["num_detections"] == 4  # the unverifiable one is never evaluated


def test_fp_of_not_exhaustive_class_is_ignored(fed_gt):
    extra = _det(1, 2, (150, 10, 40, 40), 0.99)  # class 2 IS annotated on image 1, unmatched det
    dets = _perfect(fed_gt) + [extra]
    control = evaluate_lvis(fed_gt, dets)
    assert control["per_class_AP"][2] < 1.0  # counts as a FP when annotation is exhaustive
    fed_gt["images"][0]["not_exhaustive_category_ids"] = [2]
    m = evaluate_lvis(fed_gt, dets)
    assert m["per_class_AP"][2] == pytest.approx(1.0)
    assert m["AP"] == pytest.approx(1.0)


def test_per_image_cap_of_300_is_applied_and_ap_fixed_lifts_it():
    gt = _gt([_img(1, w=1000, h=1000)], [_cat(1), _cat(2)],
             [_ann(1, 1, 1, (10, 10, 50, 50)), _ann(2, 1, 2, (500, 500, 50, 50))])
    dets = [_det(1, 2, (600 + i % 20 * 10, 10 + i // 20 * 10, 8, 8), 0.9) for i in range(299)]
    dets += [_det(1, 2, (500, 500, 50, 50), 0.95), _det(1, 1, (10, 10, 50, 50), 0.5)]
    m = evaluate_lvis(gt, dets)
    assert m["num_detections"] == 300
    assert m["per_class_AP"][1] == 0.0  # its only detection is the 301st of the image
    assert m["per_class_AP"][2] == pytest.approx(1.0)
    fixed = evaluate_lvis(gt, dets, fixed=True)
    assert fixed["per_class_AP"][1] == pytest.approx(1.0)
    assert fixed["AP"] == pytest.approx(1.0) and fixed["AP"] > m["AP"]
    assert fixed["fixed"] is True and fixed["max_dets"] is None and fixed["num_detections"] == 301
    assert evaluate_lvis(gt, dets, max_dets=301)["AP"] == pytest.approx(1.0)


def test_ap_fixed_keeps_10000_per_class():
    # 10,001 detections of class 1 over 101 images: the lowest-scoring one (the only TP of
    # image 101) is cut by the per-class limit.
    imgs = [_img(i) for i in range(1, 102)]
    anns = [_ann(i, i, 1, (10, 10, 50, 50)) for i in range(1, 102)]
    gt = _gt(imgs, [_cat(1)], anns)
    dets = []
    for i in range(1, 101):
        dets.append(_det(i, 1, (10, 10, 50, 50), 0.9))
        dets += [_det(i, 1, (100 + j % 9 * 10, 100 + j // 9 * 10, 5, 5), 0.5) for j in range(99)]
    dets.append(_det(101, 1, (10, 10, 50, 50), 0.01))
    m = evaluate_lvis(gt, dets, fixed=True)
    assert m["num_detections"] == 10_000
    assert m["AR@300"] == pytest.approx(100 / 101)


def test_frequency_groups_apr_apc_apf():
    cats = [_cat(1, "r"), _cat(2, "c"), _cat(3, "f")]
    anns = [_ann(1, 1, 1, (0, 0, 40, 40)), _ann(2, 1, 2, (50, 50, 40, 40)),
            _ann(3, 1, 2, (100, 100, 40, 40)), _ann(4, 1, 3, (150, 150, 40, 40))]
    dets = [_det(1, 1, (0, 0, 40, 40), 0.9), _det(1, 2, (50, 50, 40, 40), 0.9)]
    m = evaluate_lvis(_gt([_img(1)], cats, anns), dets)
    assert m["APr"] == pytest.approx(1.0)
    assert m["APc"] == pytest.approx(HALF, abs=1e-12)
    assert m["APf"] == 0.0
    assert m["AP"] == pytest.approx((1 + HALF) / 3, abs=1e-12)
    # same groups derived from image_count when 'frequency' is missing (r <= 10 < c <= 100 < f)
    cats2 = [{"id": 1, "name": "a", "image_count": 3}, {"id": 2, "name": "b", "image_count": 50},
             {"id": 3, "name": "c", "image_count": 500}]
    m2 = evaluate_lvis(_gt([_img(1)], cats2, anns), dets)
    for k in ("AP", "APr", "APc", "APf"):
        assert m2[k] == pytest.approx(m[k], abs=1e-12)


def test_undefined_numbers_are_nan(fed_gt):
    fed_gt["categories"].append(_cat(4, "r"))  # no GT anywhere
    m = evaluate_lvis(fed_gt, _perfect(fed_gt))
    assert math.isnan(m["per_class_AP"][4])
    assert math.isnan(m["APr"])  # no rare class has GT
    assert math.isnan(m["APs"])  # no small object
    assert m["AP"] == pytest.approx(1.0)


def test_zero_area_detection_is_not_evaluated(fed_gt):
    dets = _perfect(fed_gt) + [_det(1, 2, (150, 10, 0, 40), 0.99)]
    m = evaluate_lvis(fed_gt, dets)
    assert m["AP"] == pytest.approx(1.0) and m["num_detections"] == 4


def test_segm_perfect_masks_give_ap_1(fed_gt):
    from faster_coco_eval.core import mask as mask_utils

    dets = []
    for a in fed_gt["annotations"]:
        rle = mask_utils.frPyObjects(a["segmentation"], 200, 200)[0]
        rle["counts"] = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                     "segmentation": rle, "score": 0.8})
    m = evaluate_lvis(fed_gt, dets, iou_type="segm")
    assert m["AP"] == pytest.approx(1.0) and m["iou_type"] == "segm"
    # a bbox-only result is rejected for segm
    with pytest.raises(DataError, match=r"results\[0\].*segmentation"):
        evaluate_lvis(fed_gt, _perfect(fed_gt), iou_type="segm")


def test_input_results_are_not_modified(fed_gt):
    dets = _perfect(fed_gt)
    before = copy.deepcopy(dets)
    gt_before = copy.deepcopy(fed_gt)
    evaluate_lvis(fed_gt, dets)
    assert dets == before and fed_gt == gt_before


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad, match", [
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}, "missing key 'score'"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": float("nan")}, "finite"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, float("inf"), 1], "score": 0.5}, "non-finite"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1], "score": 0.5}, ">= 0"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 0.5}, "4 numbers"),
    ({"image_id": 1, "category_id": 99, "bbox": [0, 0, 1, 1], "score": 0.5}, "unknown category_id 99"),
    ({"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}, "unknown image_id 7"),
    ({"image_id": "1", "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}, "image_id must be an integer"),
    ("oops", "must be a dict"),
])
def test_bad_result_names_its_index(fed_gt, bad, match):
    dets = _perfect(fed_gt)
    dets.insert(2, bad)
    with pytest.raises(DataError, match=match) as e:
        evaluate_lvis(fed_gt, dets)
    assert e.value.item == "results[2]" and e.value.file == "<results list>"


def test_results_file_errors_name_the_file(tmp_path, fed_gt):
    p = tmp_path / "res.json"
    p.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="JSON list") as e:
        load_results(p)
    assert e.value.file == str(p)
    dets = _perfect(fed_gt)
    del dets[3]["category_id"]
    p.write_text(json.dumps(dets))
    with pytest.raises(DataError) as e:
        load_results(p, gt=fed_gt)
    assert str(p) in str(e.value) and "results[3]" in str(e.value)


# ---------------------------------------------------------------------------------- I/O
def test_save_results_roundtrip_atomic(tmp_path, fed_gt):
    dets = _perfect(fed_gt)
    out = save_results(dets, tmp_path / "sub" / "res.json")
    assert load_results(out, gt=fed_gt) == dets
    assert sorted(os.listdir(tmp_path / "sub")) == ["res.json"]  # no temp file left behind
    assert evaluate_lvis(fed_gt, out)["AP"] == pytest.approx(1.0)


def test_save_metrics_writes_nan_as_null(tmp_path):
    m = {"AP": float("nan"), "AP50": np.float64(0.25), "per_class_AP": {3: float("nan"), 5: 0.5},
         "fixed": False, "max_dets": None}
    data = json.loads((save_metrics(m, tmp_path / "m.json")).read_text())
    assert data == {"AP": None, "AP50": 0.25, "per_class_AP": {"3": None, "5": 0.5},
                    "fixed": False, "max_dets": None}


def test_cap_per_image_and_top_k_per_class_follow_lvis_api_order():
    r = [{"image_id": i % 2, "category_id": i % 3, "score": s, "k": i}
         for i, s in enumerate([0.1, 0.5, 0.5, 0.9, 0.5, 0.2])]
    capped = cap_per_image(r, 2)
    # image 0 (first seen) -> items 0,2,4 scores .1,.5,.5 -> stable top-2 = 2,4; image 1 -> 3,1
    assert [x["k"] for x in capped] == [2, 4, 3, 1]
    assert [x["k"] for x in cap_per_image(r, 10)] == [0, 2, 4, 1, 3, 5]
    assert cap_per_image(r, -1) == r
    top = top_k_per_class(r, 1)
    assert [x["k"] for x in top] == [3, 1, 2]  # categories 0, 1, 2 in first-seen order


# ------------------------------------------------------------------------------- COCO
def test_evaluate_coco_matches_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = random.Random(3)
    imgs = [{"id": i, "width": 300, "height": 300} for i in range(1, 6)]
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 5, 9)]
    anns, dets = [], []
    for i in range(1, 6):
        for _ in range(4):
            w, h = rng.uniform(5, 120), rng.uniform(5, 120)
            box = [rng.uniform(0, 300 - w), rng.uniform(0, 300 - h), w, h]
            a = _ann(len(anns) + 1, i, rng.choice((1, 5, 9)), box)
            a["iscrowd"] = int(rng.random() < 0.1)
            anns.append(a)
            j = [v + rng.gauss(0, 4) for v in box]
            dets.append(_det(i, a["category_id"], [j[0], j[1], abs(j[2]), abs(j[3])], rng.random()))
        for _ in range(10):
            dets.append(_det(i, rng.choice((1, 5, 9)), [rng.uniform(0, 200), rng.uniform(0, 200), 40, 40],
                             rng.random()))
    gt = {"images": imgs, "categories": cats, "annotations": anns}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    m = evaluate_coco(tmp_path / "gt.json", dets)
    cg = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(cg, cg.loadRes(copy.deepcopy(dets)), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    ref = dict(zip(["AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100"], ev.stats))
    for k, v in ref.items():
        assert (math.isnan(m[k]) and v == -1) or m[k] == pytest.approx(v, abs=1e-12), k
    assert set(m["per_class_AP"]) == {1, 5, 9}


# ------------------------------------------------------------------- real LVIS v0.5 sample
def perturbed_results(gt, seed=0, segm=False, n_extra=(5, 60), big_images=3):
    """Detections made from the GT: 80 % of GT boxes jittered (10 % with a wrong class), plus
    random boxes of annotated, negative, not-exhaustive and arbitrary classes (2 % with zero
    width), three images above 300 detections, scores rounded to 2 decimals (many ties)."""
    from pycocotools import mask as mu

    rng = random.Random(seed)
    imgs = {im["id"]: im for im in gt["images"]}
    cats = [c["id"] for c in gt["categories"]]
    by_img = {}
    for a in gt["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    res = []

    def add(img, cat, box, score):
        im = imgs[img]
        x, y, w, h = box
        r = {"image_id": img, "category_id": cat, "score": round(score, 2)}
        if segm:
            rle = mu.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], im["height"], im["width"])[0]
            rle["counts"] = rle["counts"].decode()
            r["segmentation"] = rle
        else:
            r["bbox"] = [x, y, w, h]
        res.append(r)

    big = set(rng.sample(sorted(imgs), big_images))
    for img, im in imgs.items():
        W, H = im["width"], im["height"]
        pos = sorted({a["category_id"] for a in by_img.get(img, [])})
        for a in by_img.get(img, []):
            if rng.random() < 0.8:
                x, y, w, h = a["bbox"]
                j = 0.15
                box = [x + rng.gauss(0, j) * w, y + rng.gauss(0, j) * h,
                       w * (1 + rng.gauss(0, j)), h * (1 + rng.gauss(0, j))]
                box[2] = max(box[2], 0.0)
                box[3] = max(box[3], 0.0)
                if segm:
                    box[0] = max(box[0], 0)
                    box[1] = max(box[1], 0)
                add(img, a["category_id"] if rng.random() < 0.9 else rng.choice(cats), box, rng.random())
        n = rng.randint(*n_extra) + (350 if img in big else 0)
        pools = [pos, im.get("neg_category_ids", []), im.get("not_exhaustive_category_ids", []), cats]
        for _ in range(n):
            pool = [p for p in pools if p]
            cat = rng.choice(rng.choice(pool))
            w = rng.uniform(1, W / 2)
            h = rng.uniform(1, H / 2)
            if rng.random() < 0.02:
                w = 0.0
            add(img, cat, [rng.uniform(0, W - w), rng.uniform(0, H - h), w, h], rng.random() * 0.9)
    return res


# Official lvis-api 0.5.3 numbers on perturbed_results(sample, seed) (measured once in a
# throwaway venv; the project does not depend on lvis-api).
LVIS_API_REF = {
    ("bbox", False, 0): {"AP": 0.10993155106077403, "APr": 0.15, "APc": 0.13969125090164694,
                         "APf": 0.1040645105314318, "AP50": 0.3116389270362096},
    ("bbox", True, 0): {"AP": 0.11014015211273818, "APr": 0.15, "APc": 0.13969125090164694,
                        "APf": 0.10431378222874746, "AP50": 0.312413490621684},
    ("segm", False, 2): {"AP": 0.03223044851130267, "APr": 0.0, "APc": 0.0367034989213207,
                         "APf": 0.031589183959169084, "AP50": 0.1180479040457466},
}


@pytest.fixture(scope="module")
def sample_gt():
    return json.loads(SAMPLE.read_text())


def test_sample_perfect_gt_gives_ap_1(sample_gt):
    dets = [_det(a["image_id"], a["category_id"], a["bbox"], 1.0) for a in sample_gt["annotations"]]
    m = evaluate_lvis(SAMPLE, dets)
    assert m["AP"] == pytest.approx(1.0)
    with_gt = {a["category_id"] for a in sample_gt["annotations"]}
    assert {c for c, v in m["per_class_AP"].items() if not math.isnan(v)} == with_gt
    assert all(v == pytest.approx(1.0) for c, v in m["per_class_AP"].items() if c in with_gt)
    assert m["num_images"] == 100


@pytest.mark.parametrize("iou_type, fixed, seed", list(LVIS_API_REF))
def test_sample_perturbed_matches_official_lvis_api(sample_gt, iou_type, fixed, seed):
    dets = perturbed_results(sample_gt, seed=seed, segm=iou_type == "segm")
    m = evaluate_lvis(SAMPLE, dets, iou_type=iou_type, fixed=fixed)
    assert 0 < m["AP"] < 1
    for k, v in LVIS_API_REF[iou_type, fixed, seed].items():
        assert m[k] == pytest.approx(v, abs=1e-12), k
