"""reset_classifier re-initialises only the box classifier, never the RPN's objectness layer."""

from __future__ import annotations

import torch

from taildet.engine.finetune import load_stage1_weights
from taildet.models import build_model


def test_reset_classifier_keeps_rpn_objectness():
    torch.manual_seed(0)
    stage1 = build_model("faster_rcnn", 5, min_size=96, max_size=96)
    stage2 = build_model("faster_rcnn", 5, min_size=96, max_size=96, loss="sigmoid_bce")  # K = C
    report = load_stage1_weights(stage2, stage1.state_dict(), reset_classifier=True)
    assert sorted(report["ignored"]) == ["roi_heads.box_predictor.cls_score.bias",
                                         "roi_heads.box_predictor.cls_score.weight"]
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    assert torch.equal(s1["rpn.head.cls_logits.weight"], s2["rpn.head.cls_logits.weight"])
    assert torch.equal(s1["roi_heads.box_predictor.bbox_pred.weight"], s2["roi_heads.box_predictor.bbox_pred.weight"])


def test_reset_classifier_one_stage_heads():
    for arch, key in (("retinanet", "head.classification_head.cls_logits.weight"), ("atss", "head.cls_logits.weight")):
        a = build_model(arch, 5, min_size=96, max_size=96)
        b = build_model(arch, 5, min_size=96, max_size=96)
        report = load_stage1_weights(b, a.state_dict(), reset_classifier=True)
        assert key in report["ignored"]
        assert all("cls_logits" in k for k in report["ignored"])
