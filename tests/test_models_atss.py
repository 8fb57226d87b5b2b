"""ATSS "improved baseline": the assignment on a hand-checked example and against a loop
transcription, training with EFL / EQFL / QFL / focal, inference, the logit-transform hook, a
short overfit, FPN backbones; EFL and EQFL by name in RetinaNet and FCOS. Tiny CPU models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from taildet.errors import ConfigError
from taildet.losses.equalized_focal import EqualizedFocalLoss, EqualizedQualityFocalLoss
from taildet.models.atss import TailATSS, atss_assign, build_atss
from taildet.models.build import build_model
from taildet.models.one_stage import build_fcos, build_retinanet
from helpers import random_batch

C = 5
S = 96


def _data(batch: int = 2, seed: int = 0):
    return random_batch(C, batch, seed, S)


def _atss(**kw) -> TailATSS:
    torch.manual_seed(0)
    kw.setdefault("anchor_scales", (2, 4))
    return build_atss(C, min_size=S, max_size=S, **kw)


# ----------------------------------------------------------------------------------------------
# assignment


def test_assignment_hand_checked_example() -> None:
    """One level, one anchor per location, topk = 6, two GTs sharing the centre (5, 5).

    Candidates (6 closest centres): a1 (dist 0), a0 (5.1), a2, a3 (20), a4, a5 (30); a6 is too far.
    GT0 [0,0,10,10]: IoUs a1 0.64, a0 100/202, others 0 -> threshold mean + std (sample) = 0.4858;
      a0 passes the IoU test but its centre (10.1, 5) is outside GT0 -> not positive; a1 positive.
    GT1 [1,0,9,10]: IoUs a1 0.8, a0 80/202 -> threshold 0.5335; a1 positive.
    a1 is positive for both -> takes GT1 (IoU 0.8 > 0.64). Everything else negative.
    """
    anchors = torch.tensor(
        [
            [0, 0, 20.2, 10],  # a0 centre (10.1, 5)
            [1, 1, 9, 9],  # a1 centre (5, 5)
            [-20, 0, -10, 10],  # a2 centre (-15, 5)
            [0, -20, 10, -10],  # a3 centre (5, -15)
            [30, 0, 40, 10],  # a4 centre (35, 5)
            [0, 30, 10, 40],  # a5 centre (5, 35)
            [60, 60, 70, 70],  # a6 far away
        ]
    )
    gts = torch.tensor([[0, 0, 10, 10], [1, 0, 9, 10.0]])
    matched, thresh = atss_assign(anchors, [7], gts, topk=6, return_thresholds=True)
    assert matched.tolist() == [-1, 1, -1, -1, -1, -1, -1]

    def mean_std(values):
        m = sum(values) / len(values)
        return m + math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))

    expected = [mean_std([0.64, 100 / 202, 0, 0, 0, 0]), mean_std([0.8, 80 / 202, 0, 0, 0, 0])]
    torch.testing.assert_close(thresh, torch.tensor(expected))
    assert abs(expected[0] - 0.4858) < 1e-4 and 100 / 202 >= expected[0]  # a0 fails only the centre rule
    # without GT1, a1 belongs to GT0
    assert atss_assign(anchors, [7], gts[:1], topk=6).tolist() == [-1, 0, -1, -1, -1, -1, -1]
    # no GT: everything negative
    assert atss_assign(anchors, [7], gts[:0], topk=6).tolist() == [-1] * 7


def _loop_assign(anchors, per_level, gts, topk, a_loc):
    """Direct loop transcription of the ATSS rule (the reference for the vectorised one)."""
    ious = box_iou(anchors, gts)
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = [(-1.0, -1)] * anchors.shape[0]
    for j in range(gts.shape[0]):
        g = gts[j].tolist()
        gc = ((g[0] + g[2]) / 2, (g[1] + g[3]) / 2)
        cands, start = [], 0
        for n in per_level:
            d = [(math.dist(ctr[a].tolist(), gc), a) for a in range(start, start + n)]
            cands += [a for _, a in sorted(d)[: topk * a_loc]]
            start += n
        vals = [float(ious[a, j]) for a in cands]
        m = sum(vals) / len(vals)
        thr = m + math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
        for a in cands:
            cx, cy = ctr[a].tolist()
            inside = min(cx - g[0], cy - g[1], g[2] - cx, g[3] - cy) > 0.01
            if float(ious[a, j]) >= thr and inside and float(ious[a, j]) > best[a][0]:
                best[a] = (float(ious[a, j]), j)
    return [j for _, j in best]


def test_assignment_matches_loop_transcription_multi_level() -> None:
    model = _atss(backbone_kwargs={"fpn": True}, anchor_scales=(3, 5))
    images, targets = _data(batch=3, seed=4)
    model.train()
    model(images, targets)  # records the per-level anchor counts
    image_list, t2 = model.transform(images, targets)
    feats = list(model.backbone(image_list.tensors).values())
    anchors = model.anchor_generator(image_list, feats)
    per_level = model.head.num_anchors_per_level
    assert len(per_level) == 3 and model.head.num_anchors == 2
    for a, t in zip(anchors, t2):
        got = atss_assign(a, per_level, t["boxes"], topk=4, anchors_per_location=2)
        # (equidistant locations straddling the top-k cut could order differently; none do here)
        ref = _loop_assign(a, per_level, t["boxes"], 4, 2)
        assert (got >= 0).sum() > 0
        assert got.tolist() == ref


# ----------------------------------------------------------------------------------------------
# training and inference


@pytest.mark.parametrize("loss", ["equalized_focal", "equalized_quality_focal", "quality_focal", "sigmoid_focal"])
def test_train_step_finite_and_backward(loss: str) -> None:
    model = _atss(loss=loss)
    images, targets = _data()
    model.train()
    out = model(images, targets)
    assert set(out) == {"classification", "bbox_regression", "bbox_iou"}
    assert all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    assert model.head.cls_logits.weight.grad.abs().sum() > 0
    assert model.head.bbox_iou.weight.grad.abs().sum() > 0
    logits, labels = (model.cls_head.record.logits, model.cls_head.record.labels)
    assert logits.shape == (labels.shape[0], C) and not logits.requires_grad
    assert labels.min() >= 0 and labels.max() <= C and (labels < C).any()  # ATSS ignores nothing
    if loss.startswith("equalized"):
        assert "cls_head.loss.pos_grad" in model.state_dict()
        assert model.cls_head.loss.pos_grad.sum() > 0 and model.cls_head.loss.neg_grad.sum() > 0


def test_classifier_bias_prior_and_quality_passed() -> None:
    model = _atss(loss="equalized_quality_focal")
    torch.testing.assert_close(torch.sigmoid(model.head.cls_logits.bias), torch.full((2 * C,), 0.001))
    seen = {}
    original = model.cls_head.loss.forward

    def spy(logits, labels, normalizer=None, quality=None):
        seen["quality"], seen["labels"] = quality, labels
        return original(logits, labels, normalizer, quality=quality)

    model.cls_head.loss.forward = spy
    model.train()
    model(*_data())
    pos = seen["labels"] < C
    q = seen["quality"]
    assert q is not None and not q.requires_grad
    assert torch.all(q[~pos] == 0) and torch.all((q[pos] > 0) & (q[pos] <= 1))


def test_eval_detections() -> None:
    model = _atss()
    images, _ = _data(batch=2)
    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2 and len(model.last_logits) == 2
    for d, rows in zip(dets, model.last_logits):
        n = d["boxes"].shape[0]
        assert 0 < n <= 300 and rows.shape == (n, C)
        assert d["labels"].min() >= 0 and d["labels"].max() < C
        assert torch.all((d["scores"] >= 0) & (d["scores"] <= 1))
        assert torch.all(d["boxes"][:, 2:] <= S) and torch.all(d["boxes"] >= 0)
    model.cls_head.detections_per_img = 7
    with torch.no_grad():
        assert all(d["boxes"].shape[0] <= 7 for d in model(images))


class _Shift(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[-1], dtype=x.dtype) * 3.0


def test_logit_transform_hook_changes_predictions() -> None:
    model = _atss()
    images, _ = _data(batch=1)
    model.eval()
    with torch.no_grad():
        before = model(images)[0]
        raw = model.last_logits[0]
        model.cls_head.logit_transform = _Shift()
        after = model(images)[0]
    assert not torch.equal(before["labels"], after["labels"])
    assert (after["labels"] == C - 1).float().mean() > (before["labels"] == C - 1).float().mean()
    # last_logits are the raw logits, before the transform
    assert model.last_logits[0].shape[1] == raw.shape[1] == C


def test_sgd_steps_reduce_the_loss() -> None:
    model = _atss(loss="equalized_focal")
    images, targets = _data(batch=1, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for _ in range(12):
        out = model(images, targets)
        total = sum(out.values())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
        opt.step()
        losses.append(float(total.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


def test_fpn_backbone_and_registry() -> None:
    model = build_model("atss", C, min_size=S, max_size=S, backbone_kwargs={"fpn": True}, anchor_scales=(3, 5))
    assert isinstance(model, TailATSS)
    sizes = model.anchor_generator.sizes
    assert sizes == ((12, 20), (24, 40), (48, 80))  # strides 4, 8, 16
    images, targets = _data()
    model.train()
    out = model(images, targets)
    sum(out.values()).backward()
    model.eval()
    with torch.no_grad():
        assert len(model(images)) == 2
    with pytest.raises(ConfigError):
        build_model("atss", C, bogus=1)
    # defaults: 2 anchors per location at 6 and 8 x stride (stride 8 for the tiny backbone)
    assert build_atss(C).anchor_generator.sizes == ((48, 64),)


def test_quality_branch_off_and_crowd_dropped() -> None:
    model = _atss(quality_branch=False)
    images, targets = _data()
    targets[0]["iscrowd"] = torch.zeros(targets[0]["labels"].shape[0], dtype=torch.int64)
    targets[0]["iscrowd"][0] = 1
    model.train()
    out = model(images, targets)
    assert set(out) == {"classification", "bbox_regression"}
    model.eval()
    with torch.no_grad():
        assert len(model(images)) == 2


@pytest.mark.parametrize("loss", ["equalized_focal", "equalized_quality_focal"])
@pytest.mark.parametrize("builder", [build_retinanet, build_fcos])
def test_efl_by_name_in_retinanet_and_fcos(builder, loss: str) -> None:
    torch.manual_seed(0)
    model = builder(C, min_size=S, max_size=S, loss=loss)
    assert isinstance(model.cls_head.loss, EqualizedFocalLoss)
    assert isinstance(model.cls_head.loss, EqualizedQualityFocalLoss) == (loss == "equalized_quality_focal")
    model.train()
    out = model(*_data())
    assert all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    assert model.cls_head.loss.pos_grad.sum() > 0
