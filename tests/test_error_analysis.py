"""taildet.evaluation.error_analysis (``taildet errors``): TIDE error types under the LVIS federated
rules, dAP50 per type and frequency group, confusion shares, pair costs, the CLI, compare's report.

Fixtures are one or two 100 x 100 images with 10 x 10 boxes, so every IoU is exact: a box
(x, y, 10, h) inside a GT (x, y, 10, 10) has IoU h / 10. APs are 101-point interpolated at IoU 0.5:
with n GT, a ranked list whose precision envelope is p1 up to recall r1 and p2 up to recall 1
has AP = (p1 * (#thresholds <= r1) + p2 * (#thresholds in (r1, 1])) / 101; recall 0.5 covers the
51 thresholds 0.00 .. 0.50, the other 50 lie in (0.5, 1].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from taildet.analysis.error_report import ERROR_FILES, compare_error_section, compare_error_sections, format_error_tables
from taildet.cli import main
from taildet.evaluation import evaluate_lvis
from taildet.evaluation.error_analysis import _error_type, error_breakdown


def _img(i, neg=(), nel=()):
    return {"id": i, "width": 100, "height": 100, "neg_category_ids": list(neg),
            "not_exhaustive_category_ids": list(nel)}


def _cat(i, freq):
    return {"id": i, "name": f"class{i}", "frequency": freq}


def _ann(aid, img, cat, box):
    x, y, w, h = box
    return {"id": aid, "image_id": img, "category_id": cat, "bbox": list(box), "area": w * h,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


def _det(img, cat, box, score):
    return {"image_id": img, "category_id": cat, "bbox": list(box), "score": score}


# Class 1 frequent, 2 rare, 3 common; one image.
G1, G2, G3, G4, G5, G6 = (0, 0, 10, 10), (50, 50, 10, 10), (20, 60, 10, 10), (30, 30, 10, 10), \
    (70, 70, 10, 10), (70, 20, 10, 10)
MAIN_GT = {"images": [_img(1)], "categories": [_cat(1, "f"), _cat(2, "r"), _cat(3, "c")],
           "annotations": [_ann(1, 1, 1, G1), _ann(2, 1, 2, G2), _ann(3, 1, 1, G3), _ann(4, 1, 2, G4),
                           _ann(5, 1, 3, G5), _ann(6, 1, 3, G6)]}
MAIN_DETS = [
    _det(1, 3, G5, 0.95),            # i: TP (g5)
    _det(1, 1, G1, 0.90),            # a: TP (g1)
    _det(1, 1, (20, 60, 10, 4), 0.80),  # b: Loc, IoU 0.4 with g3 -- which j matches: its fix removes it
    _det(1, 1, G2, 0.70),            # c: Cls on g2 (class 2, unmatched): its fix makes it a class-2 TP
    _det(1, 2, (80, 0, 10, 10), 0.65),  # d1: Bkg
    _det(1, 2, (0, 80, 10, 10), 0.60),  # d2: Bkg
    _det(1, 1, G1, 0.50),            # e: Dupe of a
    _det(1, 2, (0, 0, 10, 3), 0.40),   # f: Both, IoU 0.3 with g1 (class 1) only
    _det(1, 2, G4, 0.30),            # h: TP (g4)
    _det(1, 1, G3, 0.20),            # j: TP (g3)
]
# Before: class 1 (2 GT) ranks a T, b F, c F, e F, j T: precision 1 to recall .5, 2/5 to 1;
# class 2 (2 GT) d1 F, d2 F, f F, h T: 1/4 to recall .5; class 3 (2 GT, g6 missed) i T: 1 to .5.
AP1, AP2, AP3 = (51 + 50 * 2 / 5) / 101, (51 / 4) / 101, 51 / 101


@pytest.fixture(scope="module")
def main_report():
    return error_breakdown(MAIN_GT, MAIN_DETS, top_pairs=5)


def test_each_error_type_is_assigned_as_counted_by_hand(main_report):
    c = main_report["counts"]
    assert {e: c[e]["all"] for e in c} == {"Cls": 1, "Loc": 1, "Both": 1, "Dupe": 1, "Bkg": 2, "Missed": 1}
    # detection errors by the predicted class's group, Missed (g6, class 3) by the GT's
    assert (c["Cls"]["f"], c["Loc"]["f"], c["Dupe"]["f"], c["Both"]["r"], c["Bkg"]["r"], c["Missed"]["c"]) == \
        (1, 1, 1, 1, 2, 1)
    assert main_report["num_detections"] == 10 and main_report["num_true_positives"] == 4
    assert main_report["num_ignored"] == 0 and main_report["num_gt"] == 6


def test_ap50_before_is_the_evaluators(main_report):
    ap = main_report["AP50"]
    assert ap["f"] == pytest.approx(AP1) and ap["r"] == pytest.approx(AP2) and ap["c"] == pytest.approx(AP3)
    assert ap["all"] == pytest.approx((AP1 + AP2 + AP3) / 3)
    assert ap["all"] == pytest.approx(evaluate_lvis(MAIN_GT, MAIN_DETS)["AP50"])


def test_each_dap_equals_the_hand_computed_fix(main_report):
    d = main_report["dAP50"]
    # Cls: c becomes a class-2 TP at 0.70 -> class 2: c T, d1 F, d2 F, f F, h T = 1 to .5, 2/5 to 1;
    #      class 1 without c: a T, b F, e F, j T = 1 to .5, 2/4 to 1.
    cls1, cls2 = (51 + 50 / 2) / 101, (51 + 50 * 2 / 5) / 101
    assert d["Cls"]["f"] == pytest.approx(cls1 - AP1) and d["Cls"]["r"] == pytest.approx(cls2 - AP2)
    assert d["Cls"]["c"] == pytest.approx(0.0)
    assert d["Cls"]["all"] == pytest.approx((cls1 - AP1 + cls2 - AP2) / 3)
    # Loc: b points at g3, which j matched: b is removed -> class 1: a, c, e, j = 2/4 at recall 1
    assert d["Loc"]["f"] == pytest.approx((51 + 25) / 101 - AP1) and d["Loc"]["r"] == pytest.approx(0.0)
    # Dupe: e removed -> a, b, c, j = the same 2/4
    assert d["Dupe"]["f"] == pytest.approx((51 + 25) / 101 - AP1)
    # Bkg: d1, d2 removed -> class 2: f F, h T = 1/2 to recall .5; Both: f removed -> d1, d2, h = 1/3
    assert d["Bkg"]["r"] == pytest.approx(51 / 2 / 101 - AP2)
    assert d["Both"]["r"] == pytest.approx(51 / 3 / 101 - AP2)
    assert d["Both"]["all"] == pytest.approx((51 / 3 / 101 - AP2) / 3)
    # Missed: g6 leaves the GT -> class 3: i T with 1 GT = AP 1
    assert d["Missed"]["c"] == pytest.approx(1 - AP3) and d["Missed"]["all"] == pytest.approx((1 - AP3) / 3)


def test_confusion_shares_and_pair_costs(main_report):
    conf = main_report["confusions"]
    rare = {r["id"]: r for r in conf["per_class"]}[2]
    # class 2's false positives: d1, d2 (Bkg), f (Both on class 1, frequent)
    assert rare["false_positives"] == 3 and rare["with"] == {"r": 0, "c": 0, "f": 1}
    assert rare["share"]["f"] == pytest.approx(1 / 3) and rare["share"]["r"] == 0
    assert conf["by_group"]["f"]["false_positives"] == 3 and conf["by_group"]["f"]["with"]["r"] == 1
    # pair (1 <- 2): removing c lifts class 1 to 2/4 at recall 1; (2 <- 1): removing f, class 2 to 1/3
    (p1, p2) = main_report["pairs"]
    assert (p1["predicted"], p1["true"], p1["count"]) == (1, 2, 1)
    assert p1["gain"] == pytest.approx((51 + 25) / 101 - AP1) and p1["cost"] == pytest.approx(p1["gain"] / 3)
    assert (p2["predicted"], p2["true"]) == (2, 1) and p2["cost"] == pytest.approx((51 / 3 / 101 - AP2) / 3)
    assert p1["cost"] > p2["cost"]
    table = format_error_tables(main_report)
    assert "| class2 (2) | 3 | 33.3 | 0.0 | 0.0 |" in table
    assert f"| Missed | 1 | {100 * (1 - AP3) / 3:.2f} |" in table


def test_segm_gives_the_same_breakdown():
    from faster_coco_eval.core import mask as mask_utils

    dets = []
    for d in MAIN_DETS:
        x, y, w, h = d["bbox"]
        rle = mask_utils.merge(mask_utils.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], 100, 100))
        rle["counts"] = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
        dets.append({"image_id": 1, "category_id": d["category_id"], "segmentation": rle, "score": d["score"]})
    segm = error_breakdown(MAIN_GT, dets, iou_type="segm")
    box = error_breakdown(MAIN_GT, MAIN_DETS)
    assert segm["counts"] == box["counts"]
    for e in box["dAP50"]:
        assert segm["dAP50"][e] == pytest.approx(box["dAP50"][e])


def test_federated_rules():
    """Image 1: class 2 verified negative, class 3 unverified; image 2: class 1 not exhaustive."""
    gt = {"images": [_img(1, neg=[2]), _img(2, nel=[1])], "categories": [_cat(1, "f"), _cat(2, "r"), _cat(3, "c")],
          "annotations": [_ann(1, 1, 1, G1), _ann(2, 2, 1, G1)]}
    dets = [_det(1, 2, G1, 0.9),            # negative class over class 1's GT: Cls
            _det(1, 3, G1, 0.8),            # unverified class: never evaluated, not an error
            _det(1, 2, (0, 0, 10, 3), 0.5),  # negative class, IoU 0.3 with class 1: Both
            _det(2, 1, G2, 0.7),            # not exhaustive, unmatched: ignored
            _det(2, 1, G1, 0.6)]            # TP
    r = error_breakdown(gt, dets)
    assert {e: r["counts"][e]["all"] for e in r["counts"]} == {"Cls": 1, "Loc": 0, "Both": 1, "Dupe": 0, "Bkg": 0,
                                                               "Missed": 0}
    assert r["counts"]["Cls"]["r"] == 1
    assert r["num_detections"] == 4 and r["num_ignored"] == 1 and r["num_true_positives"] == 1
    # class 1 (the only class with GT): g2 found, g1 not -> 51/101; the Cls fix finds g1 too -> 1
    assert r["AP50"]["all"] == pytest.approx(51 / 101) == evaluate_lvis(gt, dets)["AP50"]
    assert r["dAP50"]["Cls"]["all"] == pytest.approx(50 / 101)
    assert r["dAP50"]["Both"]["all"] == 0 and r["dAP50"]["Missed"]["all"] == 0
    (rare,) = r["confusions"]["per_class"]  # class 1 has no false positive (its miss is ignored)
    assert rare["id"] == 2 and rare["false_positives"] == 2 and rare["share"]["f"] == 1.0
    assert r["pairs"][0]["cost"] == 0.0  # class 2 has no GT: removing its confusions changes no AP


@pytest.mark.parametrize("not_exhaustive, want", [
    # the FP x on image 1 stays evaluated (class 1 moves to the negatives): x F, y T, 1 GT -> 1/2
    ((), 0.5 - 51 / 2 / 101),
    # x was ignored (not exhaustive) and stays unevaluated: y T, 1 GT -> 1
    ((1,), 1 - 51 / 101)])
def test_missed_fix_keeps_the_federated_status_of_the_image(not_exhaustive, want):
    gt = {"images": [_img(1, nel=not_exhaustive), _img(2)], "categories": [_cat(1, "f")],
          "annotations": [_ann(1, 1, 1, G1), _ann(2, 2, 1, G1)]}
    dets = [_det(1, 1, G2, 0.9), _det(2, 1, G1, 0.8)]
    r = error_breakdown(gt, dets)
    assert r["counts"]["Missed"]["all"] == 1
    assert r["dAP50"]["Missed"]["all"] == pytest.approx(want)


def test_one_fix_per_gt_the_best_scoring_error():
    """Two Cls errors on g1: the higher-scoring one becomes the TP, the other is removed."""
    gt = {"images": [_img(1)], "categories": [_cat(1, "f"), _cat(2, "f")],
          "annotations": [_ann(1, 1, 1, G1), _ann(2, 1, 2, G2)]}
    dets = [_det(1, 2, G1, 0.9), _det(1, 2, (0, 0, 10, 9), 0.8), _det(1, 2, G2, 0.7)]
    r = error_breakdown(gt, dets)
    assert r["counts"]["Cls"]["all"] == 2
    # before: class 1 AP 0, class 2 F, F, T = 1/3; after: class 1 T = 1, class 2 T = 1
    assert r["AP50"]["all"] == pytest.approx(1 / 6)
    assert r["dAP50"]["Cls"]["all"] == pytest.approx((1 + 2 / 3) / 2)


def test_tide_order_of_the_tests():
    same = np.array([True, False])
    used = np.array([False, False])
    assert _error_type(np.array([0.4, 0.8]), same, used) == ("Loc", 0)  # Loc is tested before Cls
    assert _error_type(np.array([0.1, 0.0]), same, used) == ("Loc", 0)  # t_b itself is Loc
    assert _error_type(np.array([0.05, 0.5]), same, used) == ("Cls", 1)  # t_f itself is Cls
    assert _error_type(np.array([0.6, 0.3]), same, np.array([True, False])) == ("Dupe", 0)
    assert _error_type(np.array([0.05, 0.09]), same, used) == ("Bkg", -1)
    assert _error_type(np.array([0.05, 0.1]), same, used) == ("Both", 1)
    assert _error_type(np.zeros(0), np.zeros(0, bool), np.zeros(0, bool)) == ("Bkg", -1)


# ----------------------------------------------------------------------------- CLI, compare
def _write(tmp_path: Path, gt=MAIN_GT, dets=MAIN_DETS) -> tuple[Path, Path]:
    g, r = tmp_path / "val.json", tmp_path / "results.json"
    g.write_text(json.dumps(gt))
    r.write_text(json.dumps(dets))
    return g, r


def test_cli_writes_its_files_and_never_its_inputs(tmp_path, capsys):
    g, r = _write(tmp_path)
    assert main(["errors", str(g), str(r), "--out", str(tmp_path / "out"), "--top-pairs", "1"]) == 0
    for f in ERROR_FILES:
        assert (tmp_path / "out" / f).stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "errors.json").read_text())
    assert saved["counts"]["Bkg"]["all"] == 2 and len(saved["pairs"]) == 1
    assert "| Cls | 1 |" in (tmp_path / "out" / "errors.md").read_text()
    capsys.readouterr()
    clash = tmp_path / "errors.json"
    clash.write_text(r.read_text())
    assert main(["errors", str(g), str(clash), "--out", str(tmp_path)]) == 2
    assert "would overwrite the results file" in capsys.readouterr().err
    assert json.loads(clash.read_text()) == MAIN_DETS


def test_cli_bad_input_is_the_evaluators_clear_error(tmp_path, capsys):
    g, r = _write(tmp_path, dets=MAIN_DETS + [_det(1, 99, G1, 0.1)])
    assert main(["errors", str(g), str(r)]) == 2
    err = capsys.readouterr().err
    assert str(r) in err and "results[10]" in err and "99" in err
    assert main(["errors", str(tmp_path / "missing.json"), str(r)]) == 2
    assert "GT file not found" in capsys.readouterr().err
    assert main(["errors", str(g), str(r), "--top-pairs", "-1"]) == 2
    assert "--top-pairs (top_pairs) must be an integer >= 0, got -1" in capsys.readouterr().err


def test_compare_report_section_from_a_run_dir(tmp_path):
    g, _ = _write(tmp_path)
    run = tmp_path / "cmp" / "seed0" / "faster_ce"
    run.mkdir(parents=True)
    (run / "results_bbox.json").write_text(json.dumps(MAIN_DETS))
    lines = compare_error_section(tmp_path / "cmp", "seed0", "faster_ce", g)
    text = "\n".join(lines)
    assert "#### Error analysis: faster_ce" in text and "| Bkg | 2 |" in text
    assert "seed0/errors_faster_ce/errors_dap.png" in text
    for f in ERROR_FILES:
        assert (tmp_path / "cmp" / "seed0" / "errors_faster_ce" / f).exists()
    assert compare_error_section(tmp_path / "cmp", "seed0", "prior", g) == []  # no results file: no section
    # the whole section: one row per recipe with a results file, then each recipe's tables
    text = "\n".join(compare_error_sections(tmp_path / "cmp", "seed0", ["prior", "faster_ce"], g))
    dr = [71 / 101 - AP2, 0, 51 / 3 / 101 - AP2, 0, 51 / 2 / 101 - AP2, 0]  # Cls .. Missed on class 2 (rare)
    row = (f"| faster_ce | {100 * (AP1 + AP2 + AP3) / 3:.2f} | {100 * AP2:.2f} | "
           + " | ".join(f"{100 * v:.2f}" for v in dr) + " | 33.3 |")
    assert row in text and "| prior |" not in text and "#### Error analysis: faster_ce" in text
    assert compare_error_sections(tmp_path / "cmp", "seed0", ["prior"], g) == []


@pytest.mark.slow  # generates the embedded dataset at scale 0.05 (about 8 s)
def test_compare_report_gets_each_recipes_error_analysis(tmp_path, monkeypatch):
    """run_compare finds each run's results_bbox.json and its report.md carries the section."""
    import taildet.compare.runner as compare
    import taildet.evaluation.report as report

    def fake_train(runs, jobs, progress, resume=False):
        out = {}
        for key, kind, cfg_path, opts, ckpt in runs:
            run_dir = Path([o for o in opts if o.startswith("output_dir=")][-1].split("=", 1)[1])
            val = Path([o for o in opts if o.startswith("data.root=")][0].split("=", 1)[1]) / "annotations" / "val.json"
            anns = json.loads(val.read_text())["annotations"]
            dets = [_det(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in anns]
            dets.append(_det(anns[0]["image_id"], anns[0]["category_id"], [0.0, 0.0, 1.0, 1.0], 0.95))  # one Bkg
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "results_bbox.json").write_text(json.dumps(dets))
            out[key] = ({"AP": 0.1, "APr": 0.1, "APc": 0.1, "APf": 0.1, "AP50": 0.2, "per_class_AP": {}}, 0.0)
        return out

    monkeypatch.setattr(compare, "_train_recipes", fake_train)
    monkeypatch.setattr(report, "per_class_table", lambda metrics, gt: [])
    monkeypatch.setattr(report, "plot_per_class_ap", lambda rows, png, image_counts=None: png)
    compare.run_compare(["faster_ce"], tmp_path / "cmp", progress=False, scale=0.05)
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "#### Error analysis: faster_ce" in text and "| Bkg | 1 |" in text
    assert (tmp_path / "cmp" / "seed0" / "errors_faster_ce" / "errors_dap.png").exists()


def test_matching_agrees_with_the_evaluator_on_random_boxes():
    """The true positives the analysis finds are the evaluator's: each class's AP50 rebuilt from
    them (101-point, over its GT) equals the evaluator's, on random overlapping boxes with a
    verified negative and a not-exhaustive class."""
    from taildet.evaluation.error_analysis import _Analysis
    from taildet.evaluation.federated import PairIndex, _detections
    from taildet.evaluation.lvis_gt import _prepare_gt
    from taildet.evaluation.result_columns import read_result_columns

    rng = np.random.default_rng(0)
    images = [_img(1, neg=[3]), _img(2, nel=[2]), _img(3)]
    anns, dets = [], []
    for k in range(12):
        x, y = rng.integers(0, 60, size=2).tolist()
        anns.append(_ann(k + 1, k % 3 + 1, k % 2 + 1, (x, y, 20, 20)))
    for k in range(60):
        a = anns[rng.integers(len(anns))]
        dx, dy = rng.integers(-8, 9, size=2).tolist()
        c = a["category_id"] if rng.uniform() < 0.7 else int(rng.integers(1, 4))
        dets.append(_det(a["image_id"], c, (a["bbox"][0] + dx, a["bbox"][1] + dy, 20, 20), float(rng.uniform())))
    gt = {"images": images, "categories": [_cat(1, "f"), _cat(2, "c"), _cat(3, "r")], "annotations": anns}
    pairs = PairIndex(gt)
    prep = _prepare_gt(gt, lvis=True, iou_type="bbox", file="gt")
    d = _detections(read_result_columns(dets, pairs, "bbox"), pairs, "bbox", False, 300, 10_000)
    a = _Analysis(d, prep, "bbox", pairs)
    want = a._ap50(a._columns(np.ones(len(a.kind), bool)))
    assert (a.kind == "TP").sum() > 5 and (a.kind == "Dupe").sum() > 0
    for c in (1, 2):
        mine = (d["category_id"] == c) & (a.kind != "ignored")
        tp = (a.kind[mine] == "TP")[np.argsort(-d["score"][mine], kind="stable")]
        hits = np.cumsum(tp)
        prec = np.maximum.accumulate((hits / np.arange(1, len(tp) + 1))[::-1])[::-1]
        at = np.searchsorted(hits / (a.gt_cat == c).sum(), np.linspace(0, 1, 101), side="left")
        assert np.where(at < len(prec), prec[np.minimum(at, len(prec) - 1)], 0.0).mean() == pytest.approx(want[c])
