"""Two-stage detectors with a pluggable classification head (tiny CPU configuration)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads

from taildet.errors import ConfigError, DataError
from taildet.models import build_classifier, build_faster_rcnn, build_mask_rcnn, build_model
from taildet.models.classifiers import NormalizedLinear
from taildet.models.two_stage import TailRoIHeads, prepare_targets
from helpers import SMALL

C = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(masks: bool = False):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=g) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 40.0, 44.0], [50.0, 20.0, 90.0, 70.0]]), "labels": torch.tensor([0, 3])},
        {
            "boxes": torch.tensor([[5.0, 5.0, 30.0, 60.0], [40.0, 40.0, 80.0, 90.0], [60.0, 5.0, 92.0, 30.0]]),
            "labels": torch.tensor([4, 1, 4]),
        },
    ]
    if masks:
        for t in targets:
            m = torch.zeros(len(t["boxes"]), 96, 96, dtype=torch.uint8)
            for j, (x1, y1, x2, y2) in enumerate(t["boxes"].long().tolist()):
                m[j, y1:y2, x1:x2] = 1
            t["masks"] = m
    return images, targets


def _model(**kw):
    torch.manual_seed(0)
    return build_faster_rcnn(C, **{**SMALL, **kw})


def test_training_losses_backward_and_last_sampled():
    model = _model()
    images, targets = _data()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad is not None
    assert model.backbone.stage1[0][0].weight.grad.abs().sum() > 0

    s = model.roi_heads.last_sampled
    R = s["labels"].shape[0]
    assert R == sum(len(p) for p in s["proposals"]) and R <= 2 * SMALL["box_batch_size_per_image"]
    for key in ("gt_index", "batch_gt_index", "image_index"):
        assert s[key].shape == (R,) and s[key].dtype == torch.int64
    assert s["regression_targets"].shape == (R, 4)
    assert s["box_features"].shape == (R, model.backbone.out_channels, 7, 7)
    assert s["logits"].shape == (R, C + 1) and not s["logits"].requires_grad
    labels, gt_index, img = s["labels"], s["gt_index"], s["image_index"]
    assert labels.min() >= 0 and labels.max() <= C
    assert torch.equal(labels == C, gt_index == -1)
    fg = labels < C
    assert fg.sum() >= 5  # the GT boxes themselves are added as proposals
    for i, t in enumerate(targets):
        sel = fg & (img == i)
        assert gt_index[sel].max() < len(t["boxes"])
        assert torch.equal(labels[sel], t["labels"][gt_index[sel]])  # labels back in 0..C-1
    # batch-unique GT ids: image 1's GTs come after image 0's two
    assert torch.equal(s["batch_gt_index"][fg], gt_index[fg] + 2 * (img[fg] == 1))


def test_eval_detections_and_logit_transform():
    model = _model()
    images, _ = _data()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det in out:
        n = det["boxes"].shape[0]
        assert 0 < n <= 300 and det["labels"].shape == (n,) and det["scores"].shape == (n,)
        assert det["labels"].min() >= 0 and det["labels"].max() <= C - 1
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        assert det["boxes"].min() >= 0 and det["boxes"].max() <= 96
    heads = model.roi_heads
    assert heads.last_logits.shape[1] == C + 1
    assert heads.last_logit_image_index.shape == heads.last_logits.shape[:1]

    class Boost(nn.Module):
        def forward(self, z):
            return z + 50.0 * (torch.arange(z.shape[1]) == 2).to(z)

    model.cls_head.logit_transform = Boost()
    with torch.no_grad():
        boosted = model(images)
    model.cls_head.logit_transform = None
    for det in boosted:
        assert det["labels"][0].item() == 2 and det["scores"][0] > 0.99
    assert "logit_transform" not in "".join(model.state_dict())


def test_mask_rcnn_trains_and_returns_masks():
    torch.manual_seed(0)
    model = build_mask_rcnn(C, **SMALL)
    images, targets = _data(masks=True)
    model.train()
    losses = model(images, targets)
    assert "loss_mask" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    m = out[0]["masks"]
    assert m.shape == (out[0]["boxes"].shape[0], 1, 96, 96) and m.dtype == torch.float32
    assert 0.0 <= m.min() and m.max() <= 1.0


def test_cosine_classifier_formula_and_model():
    torch.manual_seed(0)
    clf = build_classifier("cosine", 8, 3)
    assert isinstance(clf, NormalizedLinear)
    with torch.no_grad():
        clf.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = torch.randn(4, 8)
    w = clf.weight
    expected = 20.0 * (x / (x.norm(dim=1, keepdim=True) + 1e-6)) @ (w / (w.norm(dim=1, keepdim=True) + 1e-6)).t()
    torch.testing.assert_close(clf(x), expected + clf.bias)
    model = _model(classifier="cosine")
    assert isinstance(model.roi_heads.box_predictor.cls_score, NormalizedLinear)
    images, targets = _data()
    model.train()
    assert torch.isfinite(model(images, targets)["loss_classifier"])


def test_sigmoid_bce_head_has_c_outputs():
    model = _model(loss="sigmoid_bce")
    cls = model.roi_heads.box_predictor.cls_score
    assert cls.weight.shape[0] == C
    torch.testing.assert_close(torch.sigmoid(cls.bias), torch.full((C,), 0.01))
    images, targets = _data()
    model.train()
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_classifier"])
    assert model.roi_heads.last_sampled["logits"].shape[1] == C
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out[0]["labels"].max() <= C - 1


def test_a_few_sgd_steps_learn():
    """Classification and objectness losses fall within 20 steps on two images. (The box loss
    rises at first in stock torchvision too: better proposals bring more, harder positives.)"""
    model = _model()
    images, targets = _data()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    model.train()
    history = []
    for _ in range(20):
        losses = model(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert history[-1]["loss_classifier"] < 0.6 * history[0]["loss_classifier"]
    assert history[-1]["loss_objectness"] < history[0]["loss_objectness"]


def test_softmax_head_matches_torchvision_roi_heads():
    """Same sampled RoIs, same weights (bg column moved first): losses and detections equal stock
    torchvision's RoIHeads, i.e. the 0..C-1 / bg-last label conversion is exact."""
    model = _model()
    images, targets = _data()
    model.train()
    ours = model.roi_heads
    with torch.no_grad():
        image_list, tgts = model.transform(images, targets)
        feats = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, feats, tgts)
    tv = RoIHeads(ours.box_roi_pool, ours.box_head, FastRCNNPredictor(64, C + 1), 0.5, 0.5, 64, 0.25, None,
                  ours.score_thresh, ours.nms_thresh, model.cls_head.detections_per_img)
    with torch.no_grad():
        w, b = ours.box_predictor.cls_score.weight, ours.box_predictor.cls_score.bias
        b.normal_()
        tv.box_predictor.cls_score.weight.copy_(torch.cat([w[C:], w[:C]]))
        tv.box_predictor.cls_score.bias.copy_(torch.cat([b[C:], b[:C]]))
        ours.box_predictor.bbox_pred.weight.normal_(std=0.1)
        tv.box_predictor.bbox_pred.weight.copy_(torch.cat([torch.zeros(4, 64), ours.box_predictor.bbox_pred.weight]))
        tv.box_predictor.bbox_pred.bias.copy_(torch.cat([torch.zeros(4), ours.box_predictor.bbox_pred.bias]))
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in tgts]
    tv.train()
    torch.manual_seed(3)
    ours_losses = ours(feats, [p.clone() for p in proposals], image_list.image_sizes, tgts)[1]
    torch.manual_seed(3)
    tv_losses = tv(feats, [p.clone() for p in proposals], image_list.image_sizes, tv_targets)[1]
    for key in ("loss_classifier", "loss_box_reg"):
        torch.testing.assert_close(ours_losses[key], tv_losses[key])
    ours.eval()
    tv.eval()
    with torch.no_grad():
        ours_det = ours(feats, proposals, image_list.image_sizes)[0]
        tv_det = tv(feats, proposals, image_list.image_sizes)[0]
    for a, t in zip(ours_det, tv_det):
        torch.testing.assert_close(a["boxes"], t["boxes"])
        torch.testing.assert_close(a["scores"], t["scores"])
        assert torch.equal(a["labels"], t["labels"] - 1)


def test_class_agnostic_regression_and_box_head_api():
    model = _model(class_agnostic_box_reg=True)
    heads: TailRoIHeads = model.roi_heads
    assert heads.box_predictor.bbox_pred.out_features == 4
    images, targets = _data()
    model.train()
    assert torch.isfinite(model(images, targets)["loss_box_reg"])
    # push extra boxes through the box head, as memory-augmented sampling does
    feats = model.backbone(torch.rand(2, 3, 96, 96))
    pooled = heads.forward_box_features(feats, [t["boxes"] for t in targets], [(96, 96)] * 2)
    assert pooled.shape == (5, model.backbone.out_channels, 7, 7)
    logits, deltas = heads.box_head_logits(pooled)
    assert logits.shape == (5, C + 1) and deltas.shape == (5, 4)
    model.eval()
    with torch.no_grad():
        assert model(images)[0]["boxes"].shape[1] == 4


def test_targets_boundary_crowd_and_label_checks():
    images, targets = _data()
    t = dict(targets[1], iscrowd=torch.tensor([0, 1, 0]))
    kept = prepare_targets([t], C)[0]
    assert kept["boxes"].shape == (2, 4) and kept["labels"].tolist() == [4, 4]
    assert t["boxes"].shape == (3, 4)  # caller's dict untouched
    with pytest.raises(DataError, match=r"0\.\.4"):
        prepare_targets([{"boxes": torch.zeros(1, 4), "labels": torch.tensor([5])}], C)
    model = _model()
    model.train()
    losses = model(images, [targets[0], t])  # crowd box dropped before matching
    assert torch.isfinite(sum(losses.values()))
    # an image without any annotation: every sampled RoI is background
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    model(images[:1], [empty])
    s = model.roi_heads.last_sampled
    assert (s["labels"] == C).all() and (s["gt_index"] == -1).all()


def test_state_dict_is_torchvision_style_and_round_trips():
    model = _model()
    images, targets = _data()
    model.train()
    model(images, targets)
    sd = model.state_dict()
    assert "roi_heads.box_predictor.cls_score.weight" in sd and "roi_heads.box_predictor.bbox_pred.bias" in sd
    assert not any("last_" in k for k in sd)
    fresh = _model()
    fresh.load_state_dict(sd)  # strict


def test_build_model_and_config_errors():
    model = build_model("faster_rcnn", C, **SMALL)
    assert model.roi_heads.num_classes == C
    with pytest.raises(ConfigError, match="yolo"):
        build_model("yolo", C)
    with pytest.raises(ConfigError, match="bogus_option"):
        build_model("faster_rcnn", C, bogus_option=1)
    with pytest.raises(ConfigError, match="softmax_ce"):
        build_faster_rcnn(C, loss="nope", **SMALL)
    with pytest.raises(ConfigError, match="cosine"):
        build_faster_rcnn(C, classifier="nope", **SMALL)
    with pytest.raises(ConfigError, match="anchor_sizes"):
        build_faster_rcnn(C, anchor_sizes=((16,), (32,)), **SMALL)


def test_fixed_size_keeps_input_resolution():
    model = _model(fixed_size=True, min_size=800, max_size=1333)
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 80, 112)])
    assert out[0]["boxes"][:, 2].max() <= 112 and out[0]["boxes"][:, 3].max() <= 80
    images, _ = model.transform([torch.rand(3, 80, 112)])
    assert images.image_sizes == [(80, 112)]


def test_resnet18_fpn_faster_rcnn_runs():
    torch.manual_seed(0)
    model = build_faster_rcnn(C, backbone="resnet18", **{**SMALL, "min_size": 64, "max_size": 64})
    assert len(model.rpn.anchor_generator.sizes) == 5
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([2])}]
    model.train()
    assert torch.isfinite(sum(model(images, targets).values()))
    model.eval()
    with torch.no_grad():
        assert model(images)[0]["labels"].max() < C


def test_builders_take_the_options_of_one_dataclass():
    """build_faster_rcnn / build_mask_rcnn: keyword options validated by TwoStageOptions; their
    signatures list every option (what ARCHITECTURES' checks and the config read)."""
    import dataclasses
    import inspect

    from taildet.models.two_stage import TwoStageOptions, build_faster_rcnn, build_mask_rcnn

    names = [f.name for f in dataclasses.fields(TwoStageOptions)]
    assert list(inspect.signature(build_mask_rcnn).parameters) == ["num_classes"] + names
    assert list(inspect.signature(build_faster_rcnn).parameters) == ["num_classes"] + [
        n for n in names if n != "mask_layers"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'mask_layers'"):
        build_faster_rcnn(3, mask_layers=(8,))
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        build_mask_rcnn(3, bogus=1)
    model = build_faster_rcnn(num_classes=3, representation_size=16, box_detections_per_img=7)
    assert model.num_classes == 3 and model.cls_head.detections_per_img == 7
