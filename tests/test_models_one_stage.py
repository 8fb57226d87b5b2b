"""One-stage detectors (RetinaNet / FCOS) with a pluggable loss: training, labels, equivalence with
torchvision's stock heads, inference and the logit-transform hook. Tiny CPU models, 96 px images."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.retinanet import RetinaNetClassificationHead
from torchvision.ops import boxes as box_ops

from taildet.errors import ConfigError
from taildet.losses.focal import SigmoidFocalLoss
from taildet.models.one_stage import (
    TailFCOS,
    TailRetinaNet,
    anchor_labels,
    build_fcos,
    build_retinanet,
    default_anchor_sizes,
    feature_strides,
)
from helpers import random_batch

C = 6
S = 96


class TinyNet(nn.Module):
    """Small test backbone: strides 8 (and 16 with ``levels=2``), OrderedDict output."""

    def __init__(self, ch: int = 16, levels: int = 1):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = nn.Sequential(block(3, 8), block(8, ch), block(ch, ch))
        self.extra = block(ch, ch) if levels == 2 else None
        self.out_channels = ch

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        f = self.stem(x)
        out = OrderedDict([("0", f)])
        if self.extra is not None:
            out["1"] = self.extra(f)
        return out


def _data(batch: int = 2, seed: int = 0):
    return random_batch(C, batch, seed, S)


def _retina(**kw) -> TailRetinaNet:
    torch.manual_seed(0)
    kw.setdefault("backbone", TinyNet())
    return build_retinanet(C, min_size=S, max_size=S, **kw)


def _fcos(**kw) -> TailFCOS:
    torch.manual_seed(0)
    kw.setdefault("backbone", TinyNet(ch=32))
    return build_fcos(C, min_size=S, max_size=S, **kw)


def _matched(model: TailRetinaNet, images, targets) -> list[torch.Tensor]:
    """torchvision's matcher output for the model's own anchors (computed independently)."""
    image_list, tt = model.transform(images, targets)
    features = list(model.backbone(image_list.tensors).values())
    anchors = model.anchor_generator(image_list, features)
    return [model.proposal_matcher(box_ops.box_iou(t["boxes"], a)) for t, a in zip(tt, anchors)]


@pytest.mark.parametrize("make", [_retina, _fcos], ids=["retinanet", "fcos"])
def test_train_step_finite_and_backward(make) -> None:
    model = make()
    model.train()
    images, targets = _data()
    losses = model(images, targets)
    assert set(losses) >= {"classification", "bbox_regression"}
    for v in losses.values():
        assert torch.isfinite(v)
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    logits, labels = (model.cls_head.record.logits, model.cls_head.record.labels)
    assert logits.shape == (labels.shape[0], C) and not logits.requires_grad


def test_label_vector_matches_torchvision_matcher() -> None:
    model = _retina()
    model.train()
    images, targets = _data(batch=2)
    model(images, targets)
    _, labels = (model.cls_head.record.logits, model.cls_head.record.labels)
    matched = _matched(model, images, targets)
    assert labels.shape[0] == sum(m.numel() for m in matched)
    m_all = torch.cat(matched)
    gt = torch.cat([t["labels"][m.clamp(min=0)] for t, m in zip(targets, matched)])
    assert int((labels == C).sum()) == int((m_all == -1).sum())
    assert int((labels == -1).sum()) == int((m_all == -2).sum()) > 0
    assert torch.equal(labels[m_all >= 0], gt[m_all >= 0])
    assert int((m_all >= 0).sum()) > 0
    # the pure function on a hand-made vector
    out = anchor_labels(torch.tensor([1, -1, -2, 0]), torch.tensor([4, 2]), C)
    assert out.tolist() == [2, C, -1, 4]


def test_fcos_labels_have_no_ignored_anchors() -> None:
    model = _fcos()
    model.train()
    images, targets = _data()
    model(images, targets)
    _, labels = (model.cls_head.record.logits, model.cls_head.record.labels)
    assert int((labels == -1).sum()) == 0
    assert int((labels < C).sum()) > 0 and int((labels == C).sum()) > 0


def test_retinanet_cls_loss_equals_stock_head() -> None:
    model = _retina()
    model.train()
    ours_head = model.head.classification_head
    stock = RetinaNetClassificationHead(model.backbone.out_channels, ours_head.num_anchors, C)
    stock.load_state_dict(ours_head.state_dict())
    for batch in (1, 3):
        images, targets = _data(batch=batch, seed=batch)
        matched = _matched(model, images, targets)
        image_list, _ = model.transform(images, targets)
        features = list(model.backbone(image_list.tensors).values())
        out_ours = {"cls_logits": ours_head(features)}
        out_stock = {"cls_logits": stock(features)}
        torch.testing.assert_close(out_ours["cls_logits"], out_stock["cls_logits"])
        ours = ours_head.compute_loss(targets, out_ours, matched)
        # stock: per-image sum / own positives, averaged over images; ours: total sum / total positives
        per_image = [
            stock.compute_loss([t], {"cls_logits": out_stock["cls_logits"][i : i + 1]}, [m])
            for i, (t, m) in enumerate(zip(targets, matched))
        ]
        npos = [max(1, int((m >= 0).sum())) for m in matched]
        expected = sum(l * n for l, n in zip(per_image, npos)) / max(1, sum(int((m >= 0).sum()) for m in matched))
        torch.testing.assert_close(ours, expected)
        if batch == 1:
            torch.testing.assert_close(ours, stock.compute_loss(targets, out_stock, matched))


def test_retinanet_whole_model_equals_stock_torchvision() -> None:
    """Same weights: identical training losses (one image) and identical detections."""
    ours = _retina()
    stock = RetinaNet(
        copy.deepcopy(ours.backbone), C, anchor_generator=ours.anchor_generator, min_size=S, max_size=S,
        score_thresh=1e-4, detections_per_img=300,
    )
    stock.load_state_dict(ours.state_dict())
    images, targets = _data(batch=1, seed=5)
    ours.train(), stock.train()
    lo, ls = ours(images, targets), stock(images, targets)
    for k in ls:
        torch.testing.assert_close(lo[k], ls[k])
    ours.eval(), stock.eval()
    with torch.no_grad():
        do, ds = ours(images)[0], stock(images)[0]
    for k in ("boxes", "scores", "labels"):
        torch.testing.assert_close(do[k], ds[k])


def test_fcos_losses_equal_stock_torchvision() -> None:
    """With the focal loss and GN towers, the whole FCOS loss dict equals torchvision's (batch 2)."""
    ours = _fcos(head_norm="gn")
    stock = FCOS(copy.deepcopy(ours.backbone), C, anchor_generator=ours.anchor_generator, min_size=S, max_size=S)
    stock.load_state_dict(ours.state_dict())
    images, targets = _data(batch=2, seed=7)
    ours.train(), stock.train()
    lo, ls = ours(images, targets), stock(images, targets)
    assert set(lo) == set(ls)
    for k in ls:
        torch.testing.assert_close(lo[k], ls[k])


@pytest.mark.parametrize("make", [_retina, _fcos], ids=["retinanet", "fcos"])
def test_eval_detections(make) -> None:
    model = make()
    model.eval()
    images, _ = _data(batch=2)
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2
    for d, rows in zip(dets, model.last_logits):
        n = d["boxes"].shape[0]
        assert 0 < n <= 300
        assert d["scores"].shape == (n,) and d["labels"].shape == (n,) and rows.shape == (n, C)
        assert d["labels"].min() >= 0 and d["labels"].max() < C
        assert d["labels"].dtype == torch.int64
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= S).all()


class _Boost(nn.Module):
    def __init__(self, cls: int, amount: float):
        super().__init__()
        self.register_buffer("delta", torch.zeros(C))
        self.delta[cls] = amount

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta


@pytest.mark.parametrize("make", [_retina, _fcos], ids=["retinanet", "fcos"])
def test_logit_transform_hook_changes_predictions(make) -> None:
    model = make()
    model.eval()
    images, _ = _data(batch=1)
    with torch.no_grad():
        plain = model(images)[0]
        model.cls_head.logit_transform = _Boost(3, 6.0)
        boosted = model(images)[0]
    assert "cls_head.logit_transform.delta" in model.state_dict()
    assert not torch.equal(plain["scores"], boosted["scores"])
    assert (boosted["labels"][:20] == 3).all()
    assert boosted["scores"].max() > plain["scores"].max()
    if isinstance(model, TailRetinaNet):  # last_logits are raw rows aligned with the detections
        rows = model.last_logits[0]
        expect = torch.sigmoid(rows + model.cls_head.logit_transform.delta).gather(1, boosted["labels"][:, None])[:, 0]
        torch.testing.assert_close(boosted["scores"], expect)


def test_sgd_steps_reduce_loss() -> None:
    model = _retina()
    model.train()
    images, targets = _data(batch=1, seed=11)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(8):
        loss = sum(model(images, targets).values())
        history.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[-1] < history[0]


def test_crowd_boxes_are_dropped_before_matching() -> None:
    model = _retina()
    model.train()
    images, targets = _data(batch=1, seed=2)
    model(images, targets)
    _, plain = (model.cls_head.record.logits, model.cls_head.record.labels)
    crowd = dict(targets[0])
    crowd["boxes"] = torch.cat([crowd["boxes"], torch.tensor([[10.0, 10.0, 80.0, 80.0]])])
    crowd["labels"] = torch.cat([crowd["labels"], torch.tensor([0])])
    crowd["iscrowd"] = torch.tensor([0] * len(targets[0]["labels"]) + [1])
    model(images, [crowd])
    _, with_crowd = (model.cls_head.record.logits, model.cls_head.record.labels)
    assert torch.equal(plain, with_crowd)


class _StatefulFocal(SigmoidFocalLoss):
    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.register_buffer("seen", torch.zeros(num_classes))


def test_loss_is_registered_submodule_and_bias_from_loss() -> None:
    loss = _StatefulFocal(C)
    loss.prior = 0.05
    model = _retina(loss=loss)
    keys = list(model.state_dict())
    assert "cls_head.loss.seen" in keys and sum(k.endswith(".seen") for k in keys) == 1
    assert model.cls_head.loss is loss and model.head.classification_head.cls_head.loss is loss
    bias = model.head.classification_head.cls_logits.bias
    torch.testing.assert_close(torch.sigmoid(bias), torch.full_like(bias, 0.05))
    fcos = _fcos(loss=_StatefulFocal(C))
    assert "cls_head.loss.seen" in fcos.state_dict()
    b = fcos.head.classification_head.cls_logits.bias
    torch.testing.assert_close(torch.sigmoid(b), torch.full_like(b, 0.01))


def test_no_rescale_at_96() -> None:
    model = _retina()
    images, targets = _data(batch=1)
    model.train()
    image_list, tt = model.transform(images, targets)
    assert image_list.tensors.shape[-2:] == (S, S)
    torch.testing.assert_close(tt[0]["boxes"], targets[0]["boxes"])
    mean = torch.tensor(model.transform.image_mean)[:, None, None]
    std = torch.tensor(model.transform.image_std)[:, None, None]
    torch.testing.assert_close(image_list.tensors[0], (images[0] - mean) / std)


def test_anchor_sizes_from_strides() -> None:
    assert feature_strides(TinyNet()) == [8]
    assert feature_strides(TinyNet(levels=2)) == [8, 16]
    assert default_anchor_sizes([8], "retinanet") == ((16, 24, 32, 48),)
    # several levels: torchvision's rule (its defaults for strides 8..128)
    assert default_anchor_sizes([8, 16, 32, 64, 128], "retinanet") == (
        (32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406), (512, 645, 812),
    )
    m = _retina(backbone=TinyNet(levels=2))
    assert m.anchor_generator.sizes == ((32, 40, 50), (64, 80, 101))
    f = _fcos(backbone=TinyNet(ch=32, levels=2))
    assert f.anchor_generator.sizes == ((8,), (16,))
    m.train()
    images, targets = _data()
    assert torch.isfinite(sum(m(images, targets).values()))


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="levels"):
        _retina(anchor_sizes=((16,), (32,)))
    with pytest.raises(ConfigError, match="one_stage"):
        _retina(loss="softmax_ce")
    with pytest.raises(ConfigError, match="out_channels"):
        build_retinanet(C, backbone=nn.ReLU())


def test_with_project_tiny_backbone() -> None:
    pytest.importorskip("taildet.models.backbones")
    torch.manual_seed(0)
    model = build_retinanet(C, backbone="tiny", min_size=S, max_size=S)
    assert model.anchor_generator.sizes == ((16, 24, 32, 48),)
    model.train()
    images, targets = _data()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    fcos = build_fcos(C, backbone="tiny", min_size=S, max_size=S)
    fcos.eval()
    with torch.no_grad():
        assert len(fcos(images)) == 2


class _QualityProbe(SigmoidFocalLoss):
    uses_quality = True

    def forward(self, logits, labels, normalizer=None, quality=None):
        self.seen = quality
        return super().forward(logits, labels, normalizer)


@pytest.mark.parametrize("make", [_retina, _fcos], ids=["retinanet", "fcos"])
def test_quality_passed_to_losses_that_use_it(make) -> None:
    model = make(loss=_QualityProbe(C))
    model.train()
    images, targets = _data(batch=2, seed=4)
    model(images, targets)
    _, labels = (model.cls_head.record.logits, model.cls_head.record.labels)
    q = model.cls_head.loss.seen
    assert q is not None and q.shape == labels.shape and not q.requires_grad
    pos = (labels >= 0) & (labels < C)
    assert (q[~pos] == 0).all() and (q[pos] > 0).any() and (q <= 1).all()
    # recompute the IoU of the first positive anchor by hand
    image_list, tt = model.transform(images, targets)
    features = list(model.backbone(image_list.tensors).values())
    out = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    a = int(torch.where(pos)[0][0])
    img, idx = divmod(a, anchors[0].shape[0])
    if isinstance(model, TailRetinaNet):
        m = model.proposal_matcher(box_ops.box_iou(tt[img]["boxes"], anchors[img]))
        box = model.box_coder.decode_single(out["bbox_regression"][img][idx : idx + 1], anchors[img][idx : idx + 1])
        gt = tt[img]["boxes"][m[idx]][None]
    else:
        gt_box = [t for t in tt[img]["boxes"]]
        box = model.box_coder.decode(out["bbox_regression"][img][idx : idx + 1], anchors[img][idx : idx + 1])
        ious = box_ops.box_iou(box, torch.stack(gt_box))[0]
        gt = tt[img]["boxes"][int((ious - q[a]).abs().argmin())][None]  # FCOS: q is the IoU with one GT box
    torch.testing.assert_close(q[a], box_ops.box_iou(box, gt)[0, 0].detach(), atol=1e-5, rtol=1e-4)
