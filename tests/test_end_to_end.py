"""Tiny end-to-end runs on CPU with the real data, models, engine and evaluation.

A few iterations each on a small embedded dataset: they check that every detector family trains,
writes a valid LVIS results JSON and gets metrics -- not that the numbers are good. The demo's
claims (APr far below APf; RFS raises APr) are checked on a short schedule by
``test_short_schedule_shows_the_long_tail_and_the_rfs_gain`` (default set) and at the demo's full
schedule by the slow test.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import numpy as np
import pytest
import torch

from taildet.config import apply_overrides, load_config
from taildet.engine import train

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_run(tmp_path, preset, extra=()):
    cfg = load_config(os.path.join(REPO, "configs", preset))
    cfg = apply_overrides(cfg, [f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
                                "data.synthetic.scale=0.05", "train.iterations=2", "train.warmup_iters=1",
                                "data.batch_size=2", "train.device=cpu", "eval.max_dets=100", *extra])
    return cfg, train(cfg, progress=False)


def check_results(run_dir, val_json, iou_type):
    # one LVIS results file: each detection has its bbox and, for Mask R-CNN, its RLE mask
    results = json.load(open(os.path.join(run_dir, "results_bbox.json")))
    gt = json.load(open(val_json))
    cat_ids = {c["id"] for c in gt["categories"]}
    image_ids = {im["id"] for im in gt["images"]}
    assert results, "an untrained detector still returns low-score detections"
    for r in results[:200]:
        assert r["category_id"] in cat_ids and r["image_id"] in image_ids
        assert 0.0 <= r["score"] <= 1.0
        assert len(r["bbox"]) == 4 and r["bbox"][2] >= 0 and r["bbox"][3] >= 0
        if iou_type == "segm":
            assert set(r["segmentation"]) == {"size", "counts"}
    per_image: dict[int, int] = {}
    for r in results:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert max(per_image.values()) <= 100


@pytest.mark.parametrize("preset", ["demo_retinanet_tiny_focal.yaml", "demo_faster_tiny_ce.yaml",
                                    "demo_atss_tiny_efl.yaml"])
def test_train_and_eval_produce_results_and_metrics(tmp_path, preset):
    cfg, out = tiny_run(tmp_path, preset)
    metrics = out["metrics"]["bbox"]
    for key in ("AP", "APr", "APc", "APf", "AP50"):
        assert key in metrics
    assert 0.0 <= metrics["AP"] <= 1.0
    check_results(out["run_dir"], os.path.join(cfg.data.root, "annotations", "val.json"), "bbox")


def test_fcos_trains_and_evaluates(tmp_path):
    cfg, out = tiny_run(tmp_path, "demo_retinanet_tiny_focal.yaml", ["model.arch=fcos"])
    assert 0.0 <= out["metrics"]["bbox"]["AP"] <= 1.0


def test_mask_rcnn_produces_segm_metrics(tmp_path):
    cfg, out = tiny_run(tmp_path, "demo_mask_tiny_ce.yaml")
    assert set(out["metrics"]) >= {"bbox", "segm"}
    assert 0.0 <= out["metrics"]["segm"]["AP"] <= 1.0
    check_results(out["run_dir"], os.path.join(cfg.data.root, "annotations", "val.json"), "segm")


# ----------------------------------------------------------------------------- short-schedule demo claims

#: The demo's two recipes on a short schedule: 300 iterations of batch 4 (1,200 images, about one
#: epoch of the embedded set's 1,139 training images; the demo trains 1,500 x 8), lighter RPN / RoI
#: sampling. About 25 s of one CPU core per training, evaluation included.
SHORT = ["train.iterations=300", "data.batch_size=4", "train.warmup_iters=30", "train.device=cpu",
         "train.checkpoint_period=100000", "model.box_batch_size_per_image=64",
         "model.rpn_pre_nms_top_n_train=300", "model.rpn_post_nms_top_n_train=150", "train.log_period=100"]


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xywh boxes ``a [N, 4]`` with one xywh box ``b [4]``."""
    x1, y1 = np.maximum(a[:, 0], b[0]), np.maximum(a[:, 1], b[1])
    x2 = np.minimum(a[:, 0] + a[:, 2], b[0] + b[2])
    y2 = np.minimum(a[:, 1] + a[:, 3], b[1] + b[3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return inter / (a[:, 2] * a[:, 3] + b[2] * b[3] - inter)


def group_scores(val_json: str, results: list[dict]) -> dict[str, dict[str, float]]:
    """Per frequency group (r / c / f) of the validation set:

    * ``"true_score"``: mean over the group's GT boxes of the highest score the detector gives
      the box's own class there (a same-class detection with IoU >= 0.5; 0 when there is none) --
      a rank-free, threshold-free per-object version of recall, the quantity AP ranks;
    * ``"score_share"``: the group's share of the summed scores of all detections -- how much of
      its confidence the detector spends on the group's classes.
    """
    gt = json.load(open(val_json))
    group = {c["id"]: c["frequency"] for c in gt["categories"]}
    dets: dict[tuple[int, int], list[dict]] = defaultdict(list)
    mass = dict.fromkeys("rcf", 0.0)
    for r in results:
        dets[r["image_id"], r["category_id"]].append(r)
        mass[group[r["category_id"]]] += r["score"]
    best: dict[str, list[float]] = {g: [] for g in "rcf"}
    for a in gt["annotations"]:
        same = dets.get((a["image_id"], a["category_id"]), [])
        score = 0.0
        if same:
            ious = _box_iou(np.array([d["bbox"] for d in same], dtype=np.float64), np.array(a["bbox"], dtype=np.float64))
            hit = [d["score"] for d, iou in zip(same, ious) if iou >= 0.5]
            score = max(hit, default=0.0)
        best[group[a["category_id"]]].append(score)
    total = sum(mass.values())
    return {g: {"true_score": float(np.mean(best[g])), "score_share": mass[g] / total} for g in "rcf"}


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    """CE and RFS (the demo's presets) trained on the short schedule; their metrics and group scores."""
    root = tmp_path_factory.mktemp("short_demo")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared
    out = {}
    try:
        for name, preset in (("ce", "demo_faster_tiny_ce.yaml"), ("rfs", "demo_faster_tiny_ce_rfs.yaml")):
            cfg = apply_overrides(load_config(os.path.join(REPO, "configs", preset)),
                                  [f"output_dir={root / name}", f"data.root={root / 'data'}", *SHORT])
            t0 = time.process_time()
            res = train(cfg, progress=False)
            results = json.load(open(os.path.join(res["run_dir"], "results_bbox.json")))
            val_json = os.path.join(cfg.data.root, "annotations", "val.json")
            out[name] = {"metrics": res["metrics"]["bbox"], "groups": group_scores(val_json, results),
                         "cpu_s": time.process_time() - t0}
    finally:
        torch.set_num_threads(n)
    return out


def test_group_scores_on_a_hand_made_case(tmp_path):
    """The proxy's definition on three GT boxes (one per group) and four detections."""
    gt = {"categories": [{"id": 1, "frequency": "r"}, {"id": 2, "frequency": "c"}, {"id": 3, "frequency": "f"}],
          "annotations": [{"image_id": 1, "category_id": c, "bbox": [10 * c, 0, 10, 10]} for c in (1, 2, 3)]}
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(gt))
    res = [{"image_id": 1, "category_id": 1, "bbox": [10, 0, 10, 10], "score": 0.2},   # hit, rare
           {"image_id": 1, "category_id": 1, "bbox": [12, 0, 10, 10], "score": 0.4},   # IoU 0.67: hit
           {"image_id": 1, "category_id": 2, "bbox": [26, 0, 10, 10], "score": 0.3},   # IoU 0.25: miss
           {"image_id": 1, "category_id": 3, "bbox": [30, 0, 10, 10], "score": 0.1}]   # hit, frequent
    g = group_scores(str(p), res)
    assert {k: v["true_score"] for k, v in g.items()} == pytest.approx({"r": 0.4, "c": 0.0, "f": 0.1})
    assert {k: v["score_share"] for k, v in g.items()} == pytest.approx({"r": 0.6, "c": 0.3, "f": 0.1})


def test_short_schedule_shows_the_long_tail_and_the_rfs_gain(short_demo):
    """The demo's two claims on a schedule CI can afford (see SHORT; thresholds from measurements).

    After about one epoch AP is a few points in every group (measured, train.seed 0 / 1 / 2: CE
    APr 1.95 / 1.31 / 1.97, APf 2.98 / 3.43 / 2.71; RFS APr 2.08 / 1.45 / 2.69): RFS's APr is
    higher in all three, but by 0.1-0.7 points, too little to tell from noise, so APr is not
    asserted. What the detector has learned by then, and what the demo's claims are about, is how
    its confidence follows the training frequency, measured per object by ``group_scores``
    (mean true-class score on the GT boxes, "true"; the group's share of all detection scores,
    "share"), seeds 0 / 1 / 2:

    * CE: true rare 0.0021 / 0.0017 / 0.0033, frequent 0.050 / 0.055 / 0.036, i.e. rare / frequent
      0.04 / 0.03 / 0.09 -- the long-tail effect (asserted: < 0.25);
    * RFS: true rare 1.9x / 1.7x / 2.0x CE's (asserted: > 1.3x); rare / frequent 2.3x / 2.1x / 2.4x
      CE's (asserted: > 1.5x); rare share 0.049 / 0.038 / 0.091 against CE's 0.018 / 0.019 / 0.041,
      2.7x / 2.0x / 2.2x (asserted: > 1.5x).

    RFS made a no-op (``data.rfs_threshold`` 0.001 instead of auto: every repeat factor 1) trains
    exactly the CE run here (measured, seeds 0 and 1: identical numbers), so every RFS / CE ratio
    is 1 and the three RFS assertions fail (checked: the test fails so). Without the long tail
    (equal training frequencies) rare / frequent would be expected near 1 (not measured), far
    above the first assertion's 0.25.
    """
    ce, rfs = short_demo["ce"]["groups"], short_demo["rfs"]["groups"]
    seen = json.dumps({k: v["groups"] for k, v in short_demo.items()})
    # the long-tail effect: the CE detector scores rare objects far below frequent ones
    assert ce["r"]["true_score"] < 0.25 * ce["f"]["true_score"], seen
    # RFS's gain: rare objects get clearly higher scores, and a larger share of the confidence
    assert rfs["r"]["true_score"] > 1.3 * ce["r"]["true_score"], seen
    assert rfs["r"]["true_score"] / rfs["f"]["true_score"] > 1.5 * ce["r"]["true_score"] / ce["f"]["true_score"], seen
    assert rfs["r"]["score_share"] > 1.5 * ce["r"]["score_share"], seen
    # and the run is a real training + LVIS evaluation
    for run in short_demo.values():
        m = run["metrics"]
        assert 0.0 < m["AP"] < 1.0 and all(0.0 <= m[k] <= 1.0 for k in ("APr", "APc", "APf"))


@pytest.mark.slow
def test_demo_shows_the_long_tail_problem(tmp_path):
    """The demo's claims: with random sampling APr is >= 10 points below APf; RFS raises APr."""
    from taildet.compare import run_demo

    summary = run_demo(tmp_path / "demo", seed=0, progress=False)
    runs = {n: r["runs"]["seed0"] for n, r in summary["recipes"].items()}
    ce, rfs = runs["faster_ce"], runs["faster_ce_rfs"]
    assert ce["APf"] - ce["APr"] >= 10.0
    assert rfs["APr"] > ce["APr"]


def test_every_architecture_is_a_valid_config_value():
    from taildet.config import config_from_dict
    from taildet.models.build import ARCHITECTURES, architecture_info

    for arch in ARCHITECTURES:
        raw = {"model": {"arch": arch}, "train": {"iterations": 1},
               "data": {"synthetic": {"seed": 0}, "with_masks": architecture_info(arch).masks}}
        assert config_from_dict(raw).model.arch == arch
