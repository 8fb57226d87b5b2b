"""Tiny end-to-end runs on CPU with the real data, models, engine and evaluation.

A few iterations each on a small embedded dataset: they check that every detector family trains,
writes a valid LVIS results JSON and gets metrics -- not that the numbers are good. The demo's
claims (APr far below APf; RFS raises APr) are checked by the slow test at the end.
"""

from __future__ import annotations

import json
import os

import pytest

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
    from taildet.models.build import ARCHITECTURES

    for arch in ARCHITECTURES:
        raw = {"model": {"arch": arch}, "train": {"iterations": 1},
               "data": {"synthetic": {"seed": 0}, "with_masks": arch == "mask_rcnn"}}
        assert config_from_dict(raw).model.arch == arch
