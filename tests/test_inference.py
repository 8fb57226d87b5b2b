"""taildet.engine.inference: result dicts, the per-image cap, and AP-fixed inference (no per-image
cap, each class's best k over the dataset, the detector's own cap raised for the run)."""

from __future__ import annotations

import os

import torch
from torch import nn

from taildet.config import apply_overrides, load_config
from taildet.engine.evaluate import eval_caps
from taildet.engine.inference import inference


class _Heads(nn.Module):
    detections_per_img = 300


class _FakeDetector(nn.Module):
    """Per image: ``detections_per_img`` boxes of 3 classes with scores from the image's value."""

    def __init__(self):
        super().__init__()
        self.cls_head = _Heads()
        self.caps_seen: list[int] = []

    def forward(self, images):
        n = self.cls_head.detections_per_img
        self.caps_seen.append(n)
        outs = []
        for im in images:
            base = float(im.flatten()[0])
            scores = base * torch.linspace(1.0, 0.5, n)
            boxes = torch.tensor([[1.0, 1.0, 5.0, 5.0]]).repeat(n, 1)
            outs.append({"boxes": boxes, "scores": scores, "labels": torch.arange(n) % 3})
        return outs


class _Images(torch.utils.data.Dataset):
    cat_ids = [10, 20, 30]

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((3, 8, 8), 0.1 + 0.8 * i / self.n), {"image_id": i + 1}


def test_per_image_cap_and_no_cap():
    model = _FakeDetector()
    res = inference(model, _Images(3), batch_size=2, max_dets=50, progress=False)
    assert len(res) == 3 * 50 and model.caps_seen == [300, 300]
    res = inference(model, _Images(3), batch_size=2, max_dets=None, progress=False)
    assert len(res) == 3 * 300


def test_ap_fixed_inference_keeps_each_class_best_k_and_raises_detector_cap():
    model = _FakeDetector()
    data = _Images(7)
    res = inference(model, data, batch_size=3, max_dets=None, score_thresh=0.0, progress=False,
                    per_class_top_k=40, detector_dets_per_img=1000)
    assert model.caps_seen == [1000] * 3 and model.cls_head.detections_per_img == 300  # restored
    full = inference(model, data, batch_size=3, max_dets=None, score_thresh=0.0, progress=False,
                     detector_dets_per_img=1000)
    for cat in (10, 20, 30):
        got = sorted((r["score"] for r in res if r["category_id"] == cat), reverse=True)
        want = sorted((r["score"] for r in full if r["category_id"] == cat), reverse=True)[:40]
        assert got == want and len(got) == 40


def test_eval_caps_from_config():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(repo, "configs", "demo_faster_tiny_ce.yaml"))
    assert eval_caps(cfg) == {"max_dets": cfg.eval.max_dets}
    cfg = apply_overrides(cfg, ["eval.fixed=true", "eval.fixed_dets_per_img=2000"])
    assert eval_caps(cfg) == {"max_dets": None, "per_class_top_k": 10000, "detector_dets_per_img": 2000}
