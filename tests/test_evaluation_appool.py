"""APpool (taildet.evaluation.pooled): pooled AP over every category's detections ranked together
(Dave et al. 2021). Hand-made fixtures whose IoUs are exactly 1 or 0, so the precision / recall
curve is the same at every IoU threshold and is written out below; a plain transcription of the
reference's per-pair matching and pooled accumulation on the LVIS sample; the grouped path
against one run."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pytest

from taildet.evaluation import evaluate_lvis
from taildet.evaluation.eval_backend import _federated_filter, _prepare_dets
from taildet.evaluation.lvis_eval import _evaluate_lvis_dicts
from taildet.evaluation.lvis_gt import _prepare_gt
from taildet.evaluation.pooled import match_bits
from taildet.evaluation.results_io import cap_per_image, load_results, top_k_per_class
from helpers import LVIS_VAL_100
from test_evaluation import _ann, _cat, _det, _gt, _img, perturbed_results

REC = [i / 100 for i in range(101)]

A, B, C, D = (10, 10, 50, 50), (100, 100, 40, 40), (20, 20, 60, 60), (120, 30, 50, 70)
EMPTY = (0, 150, 30, 30)  # overlaps no GT box


def interp101(recall: list[float], precision: list[float]) -> float:
    """The 101-point interpolated AP of one PR curve, spelled out: precision made monotone (the
    maximum at or after each point), then at each recall threshold r the precision of the first
    point with recall >= r (0 when none), averaged over the 101 thresholds."""
    env = list(precision)
    for i in range(len(env) - 2, -1, -1):
        env[i] = max(env[i], env[i + 1])
    total = 0.0
    for r in np.linspace(0.0, 1.0, 101):  # the recall thresholds as the evaluators build them
        hit = [p for rc, p in zip(recall, env) if rc >= r]
        total += hit[0] if hit else 0.0
    return total / 101


def _fixture(nel2=()):
    """Two images, three categories, four GT boxes: category 1 on images 1 and 2, category 2 on
    image 1 (and verified absent on image 2: neg), category 3 on image 2."""
    return _gt([_img(1), _img(2, neg=[2], nel=nel2)], [_cat(1), _cat(2), _cat(3)],
               [_ann(1, 1, 1, A), _ann(2, 1, 2, B), _ann(3, 2, 1, C), _ann(4, 2, 3, D)])


def _dets(s2_fp=0.8, s2_tp=0.7):
    return [_det(1, 1, A, 0.9),          # TP (category 1)
            _det(2, 2, EMPTY, s2_fp),    # FP (category 2 verified absent on image 2)
            _det(1, 2, B, s2_tp),        # TP (category 2)
            _det(2, 1, C, 0.6),          # TP (category 1)
            _det(2, 3, EMPTY, 0.5),      # FP (category 3)
            _det(2, 3, D, 0.4)]          # TP (category 3)


def _curve(flags: list[bool], num_gt: int) -> tuple[list[float], list[float]]:
    tp = fp = 0
    rc, pr = [], []
    for f in flags:
        tp, fp = tp + f, fp + (not f)
        rc.append(tp / num_gt)
        pr.append(tp / (tp + fp))
    return rc, pr


def test_pooled_ap_equals_the_hand_computed_curve():
    m = evaluate_lvis(_fixture(), _dets())
    # ranked together: TP .9, FP .8, TP .7, TP .6, FP .5, TP .4; 4 GT in all
    rc, pr = [0.25, 0.25, 0.5, 0.75, 0.75, 1.0], [1, 1 / 2, 2 / 3, 3 / 4, 3 / 5, 4 / 6]
    got_rc, got_pr = _curve([True, False, True, True, False, True], 4)
    assert got_rc == pytest.approx(rc) and got_pr == pytest.approx(pr)
    # monotone: 1, .75, .75, .75, 2/3, 2/3 -> 26 thresholds at 1, 50 at .75, 25 at 2/3
    expected = (26 * 1 + 50 * 0.75 + 25 * (2 / 3)) / 101
    assert interp101(rc, pr) == pytest.approx(expected, rel=1e-12)
    assert m["APpool"] == pytest.approx(expected, rel=1e-12)
    # per category: 1 ranks its 2 TPs first (AP 1); 2 and 3 rank a FP above their one TP (AP .5)
    assert m["per_class_AP"] == pytest.approx({1: 1.0, 2: 0.5, 3: 0.5})
    assert m["AP"] == pytest.approx(2 / 3)


def test_same_per_category_ap_other_cross_category_order_changes_appool():
    """Category 2's two detections moved below every other: within category 2 the order (FP
    first) is the same, so every per-category AP is unchanged; the pooled ranking is not."""
    before = evaluate_lvis(_fixture(), _dets())
    after = evaluate_lvis(_fixture(), _dets(s2_fp=0.35, s2_tp=0.3))
    assert after["per_class_AP"] == before["per_class_AP"] and after["AP"] == before["AP"]
    # TP .9, TP .6, FP .5, TP .4, FP .35, TP .3
    rc, pr = _curve([True, True, False, True, False, True], 4)
    assert rc == pytest.approx([0.25, 0.5, 0.5, 0.75, 0.75, 1.0])
    assert pr == pytest.approx([1, 1, 2 / 3, 3 / 4, 3 / 5, 4 / 6])
    expected = (51 * 1 + 25 * 0.75 + 25 * (2 / 3)) / 101
    assert interp101(rc, pr) == pytest.approx(expected, rel=1e-12)
    assert after["APpool"] == pytest.approx(expected, rel=1e-12)
    assert after["APpool"] > before["APpool"]


def test_federated_rules_apply_to_the_pool():
    base = evaluate_lvis(_fixture(), _dets())["APpool"]
    # category 3 is neither annotated on image 1 nor verified absent there: never evaluated
    unverified = _dets() + [_det(1, 3, EMPTY, 0.95)]
    assert evaluate_lvis(_fixture(), unverified)["APpool"] == pytest.approx(base, rel=1e-12)
    # an unmatched detection of category 1 on image 2 ranked first: a FP ...
    extra = _dets() + [_det(2, 1, EMPTY, 0.95)]
    rc, pr = _curve([False, True, False, True, True, False, True], 4)
    fp_first = interp101(rc, pr)
    assert evaluate_lvis(_fixture(), extra)["APpool"] == pytest.approx(fp_first, rel=1e-12)
    assert fp_first < base
    # ... ignored when category 1 is not exhaustively annotated on image 2
    assert evaluate_lvis(_fixture(nel2=[1]), extra)["APpool"] == pytest.approx(base, rel=1e-12)


def test_iou_thresholds_a_box_matching_at_half_of_them():
    """A TP of category 3 whose IoU with its GT is 0.72 (box 50 x 70 cut to 36 x 70): matched at
    0.50..0.70 (5 thresholds), a FP at 0.75..0.95."""
    dets = _dets()
    dets[5] = _det(2, 3, (120, 30, 36, 70), 0.4)
    m = evaluate_lvis(_fixture(), dets)
    hi = interp101(*_curve([True, False, True, True, False, False], 4))
    assert m["APpool"] == pytest.approx((5 * evaluate_lvis(_fixture(), _dets())["APpool"] + 5 * hi) / 10, rel=1e-12)


def test_appool_in_every_mode_and_nan_without_ground_truth():
    gt = _fixture()
    for iou_type in ("bbox", "segm"):
        for fixed in (False, True):
            dets = _dets()
            if iou_type == "segm":
                from faster_coco_eval.core import mask as mu

                for d in dets:
                    x, y, w, h = d.pop("bbox")
                    rle = mu.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], 200, 200)[0]
                    d["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            m = evaluate_lvis(gt, dets, iou_type=iou_type, fixed=fixed)
            assert m["APpool"] == pytest.approx((26 + 50 * 0.75 + 25 * (2 / 3)) / 101, rel=1e-9), (iou_type, fixed)
    empty = _gt([_img(1, neg=[1])], [_cat(1)], [])
    assert math.isnan(evaluate_lvis(empty, [_det(1, 1, A, 0.5)])["APpool"])
    assert evaluate_lvis(gt, [])["APpool"] == 0.0


def test_match_bits_greedy_rule():
    """Row 0 takes the best GT (col 1, IoU .9, thresholds .50-.90: bits 0-8); row 1 then gets
    col 0 (IoU .6: .50-.60, bits 0-2) and at .95 the GT row 0 left (IoU .95, bit 9). On a tie
    the later GT is taken (row 0 of the second pair takes col 1, so row 1 finds nothing). Pairs
    without a GT match nothing."""
    thr = np.linspace(0.5, 0.95, 10)
    m = np.array([[0.8, 0.9], [0.6, 0.95]])
    tie = np.array([[0.7, 0.7], [0.0, 0.7]])
    bits = match_bits([m, tie, np.zeros((2, 3)), np.array([[0.55, 0.0, 0.0, 0.0, 0.0]])], thr)
    assert bits[0].tolist() == [0b0111111111, 0b1000000000 | 0b0000000111]
    assert bits[1].tolist() == [0b0000011111, 0] and bits[2].tolist() == [0, 0]
    assert bits[3].tolist() == [0b11]


# ------------------------------------------------------------------ transcription of the reference
def _transcription(gt: dict, dets: list[dict]) -> float:
    """The reference's per-(image, category) matching and pooled accumulation, written plainly
    (bbox IoU from pycocotools; detections already capped and filtered)."""
    from pycocotools import mask as mu

    thr = np.linspace(0.5, 0.95, 10)
    gts, dts = defaultdict(list), defaultdict(list)
    for a in gt["annotations"]:
        gts[a["image_id"], a["category_id"]].append(a)
    for d in dets:
        dts[d["image_id"], d["category_id"]].append(d)
    nel = {im["id"]: set(im["not_exhaustive_category_ids"]) for im in gt["images"]}
    scores, matched, ignored = [], [], []
    for img in sorted(nel):
        for cat in sorted(c["id"] for c in gt["categories"]):
            g, d = gts.get((img, cat), []), sorted(dts.get((img, cat), []), key=lambda x: -x["score"])
            if not d:
                continue
            ious = mu.iou([x["bbox"] for x in d], [x["bbox"] for x in g], [0] * len(g)) if g else None
            dt_m = np.zeros((len(thr), len(d)), bool)
            for ti, t in enumerate(thr):
                taken = [False] * len(g)
                for di in range(len(d)):
                    best, m = min(t, 1 - 1e-10), -1
                    for gi in range(len(g)):
                        if taken[gi] or ious[di, gi] < best:
                            continue
                        best, m = ious[di, gi], gi
                    if m >= 0:
                        dt_m[ti, di], taken[m] = True, True
            scores += [x["score"] for x in d]
            matched.append(dt_m)
            ignored.append(~dt_m & (cat in nel[img]))
    order = np.argsort(-np.array(scores), kind="mergesort")
    dt_m, dt_ig = np.concatenate(matched, 1)[:, order], np.concatenate(ignored, 1)[:, order]
    num_gt = len(gt["annotations"])
    total = 0.0
    for t in range(len(thr)):
        tp = np.cumsum(dt_m[t] & ~dt_ig[t])
        fp = np.cumsum(~dt_m[t] & ~dt_ig[t])
        rc = (tp / num_gt).tolist()
        pr = (tp / (tp + fp + np.spacing(1))).tolist()
        total += interp101(rc, pr)
    return total / len(thr)


@pytest.mark.parametrize("fixed", [False, True])
def test_appool_equals_the_transcription_on_the_lvis_sample(fixed):
    gt = json.loads(LVIS_VAL_100.read_text())
    res = perturbed_results(gt, seed=1)
    dets = load_results([dict(r) for r in res], gt=gt, iou_type="bbox")
    dets = top_k_per_class(dets, 10_000) if fixed else cap_per_image(dets, 300)
    prep = _prepare_gt(gt, lvis=True, iou_type="bbox", file="sample")
    dets = _federated_filter(_prepare_dets(dets, "bbox", drop_empty=True), prep)
    expected = _transcription(prep, dets)
    assert 0.0 < expected < 1.0
    assert evaluate_lvis(LVIS_VAL_100, res, fixed=fixed)["APpool"] == pytest.approx(expected, abs=1e-12)


def test_grouped_runs_give_the_appool_of_one_run(monkeypatch):
    """One faster-coco-eval run per category (RUN_COST 0, one detection per run at most) and the
    default grouping both give the one-run path's APpool (and AP) to the bit."""
    import taildet.evaluation.federated as fed

    gt = json.loads(LVIS_VAL_100.read_text())
    res = perturbed_results(gt, seed=3, n_extra=(2, 12), big_images=1)
    one = _evaluate_lvis_dicts(LVIS_VAL_100, [dict(r) for r in res])
    default = evaluate_lvis(LVIS_VAL_100, res)
    runs = []
    real = fed._run
    monkeypatch.setattr(fed, "_run", lambda *a, **k: runs.append(1) or real(*a, **k))
    monkeypatch.setattr(fed, "RUN_COST", 0)
    monkeypatch.setattr(fed, "RUN_DETECTIONS", 1)
    split = evaluate_lvis(LVIS_VAL_100, res)
    assert len(runs) > 50  # many groups
    assert default["APpool"] == one["APpool"] == split["APpool"]
    assert split["AP"] == one["AP"]


# ------------------------------------------------------------------ reports: eval-results, compare
def test_eval_results_prints_appool(tmp_path):
    from taildet.evaluation.report import eval_results_main

    lines: list[str] = []
    m = eval_results_main(_fixture(), _dets(), out=tmp_path / "out", print_fn=lines.append)
    header, _, row = lines[0].splitlines()[:3]
    cols = [c.strip() for c in header.strip("|").split("|")]
    vals = [c.strip() for c in row.strip("|").split("|")]
    assert cols[-1] == "APpool" and vals[-1] == f"{100 * m['APpool']:.1f}" == "79.4"  # (26 + 50 * .75 + 25 * 2 / 3) / 101
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["APpool"] == pytest.approx(m["APpool"])


def test_compare_rows_and_report_table_carry_appool():
    """A run's APpool (evaluate_lvis) reaches its compare row in percent, the summary's statistics
    and the recipe table's APpool column; a row without it (a summary written before APpool) is
    read with n = 0 and shown as '-'."""
    from taildet import evidence
    from taildet.compare import RECIPES, summarize
    from taildet.compare.summary import _run_row
    from taildet.results_docs import format_recipe_table

    before = evaluate_lvis(_fixture(), _dets())
    after = evaluate_lvis(_fixture(), _dets(s2_fp=0.35, s2_tp=0.3))
    rows = {"seed0/faster_ce": (before, 1.0), "seed0/faster_ce+logn": (after, 1.0)}
    runs = {n: {"seed0": _run_row(f"seed0/{n}", rows)} for n in ("faster_ce", "faster_ce+logn")}
    assert runs["faster_ce+logn"]["seed0"]["APpool"] == round(100 * after["APpool"], 2)
    old = dict(runs["faster_ce"]["seed0"])
    del old["APpool"]
    runs["faster_ce_rfs"] = {"seed0": old}
    specs = {n: RECIPES[n] for n in runs}
    classes = {"1": {"group": "f"}, "2": {"group": "f"}, "3": {"group": "f"}}
    s = summarize(runs, specs, classes, resamples=50)
    assert "APpool" in evidence.METRICS
    assert s["recipes"]["faster_ce+logn"]["stats"]["APpool"]["mean"] == pytest.approx(100 * after["APpool"], abs=0.01)
    assert s["recipes"]["faster_ce_rfs"]["stats"]["APpool"]["n"] == 0
    paired = {(p["recipe"], p["metric"]): p for p in s["paired"]}
    assert paired["faster_ce+logn", "APpool"]["mean"] == pytest.approx(100 * (after["APpool"] - before["APpool"]),
                                                                       abs=0.02)
    table = format_recipe_table(s, metrics=evidence.METRICS).splitlines()
    assert table[0].rstrip().endswith("| APpool |")
    cells = {ln.split("|")[1].strip(): ln.split("|")[-2].strip() for ln in table[2:]}
    assert cells == {"faster_ce": f"{round(100 * before['APpool'], 2):.1f}",
                     "faster_ce+logn": f"{round(100 * after['APpool'], 2):.1f}", "faster_ce_rfs": "-"}


def test_compare_reuse_fills_appool_of_runs_evaluated_before_it(tmp_path):
    """A finished compare run whose metrics.json predates APpool gets it from its results file (the
    evaluator's value), in memory; a run that has it is returned as written, without evaluating."""
    from taildet.compare.runner import _reusable

    gt = {"images": [{"id": 1, "width": 100, "height": 100, "neg_category_ids": [], "not_exhaustive_category_ids": []}],
          "categories": [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "r"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100},
                          {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 10, 10], "area": 100}]}
    dets = [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8},
            {"image_id": 1, "category_id": 2, "bbox": [50, 50, 10, 10], "score": 0.7}]
    val = tmp_path / "val.json"
    val.write_text(json.dumps(gt))
    run = tmp_path / "seed0" / "row"
    run.mkdir(parents=True)
    (run / "results_bbox.json").write_text(json.dumps(dets))
    (run / "metrics.json").write_text(json.dumps({"bbox": {"AP": 0.5, "APr": 0.25}}))
    before = (run / "metrics.json").read_text()
    m = _reusable(run, "posthoc", val)
    expected = evaluate_lvis(val, run / "results_bbox.json")["APpool"]
    assert m == {"AP": 0.5, "APr": 0.25, "APpool": expected} and 0 < expected < 1
    assert (run / "metrics.json").read_text() == before
    (run / "metrics.json").write_text(json.dumps({"bbox": {"AP": 0.5, "APpool": 0.125}}))
    assert _reusable(run, "posthoc", tmp_path / "no_such_gt.json") == {"AP": 0.5, "APpool": 0.125}
    assert _reusable(run, "train", val) is None  # a trained row needs its model_final.pth
