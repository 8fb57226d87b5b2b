"""ATSS one-stage detector: the "improved baseline" of the Equalized Focal Loss paper (seed 003).

Builder: :func:`build_atss`, returning a :class:`TailATSS` -- a torchvision ``RetinaNet`` subclass
(so torchvision's ``GeneralizedRCNNTransform``, ``AnchorGenerator``, ``BoxCoder`` and forward are
reused) with its own head and loss computation:

* Anchors: ``len(anchor_scales)`` square anchors per location, sizes ``scale * stride`` per level
  (default scales 6 and 8, so 2 anchors per location); the strides are measured from the backbone
  (:func:`taildet.models.one_stage.feature_strides`), so the tiny single-map backbone and FPN
  backbones both work.
* Head (:class:`TailATSSHead`): a classification tower and a box tower of ``num_convs``
  3x3 conv-norm-ReLU layers (GroupNorm by default, as torchvision's RetinaNet v2 towers), a
  classifier (``K = loss.num_outputs()`` per anchor, bias from ``loss.init_bias``, e.g.
  prior 0.001 for EFL), a box regressor and an IoU-quality predictor (one logit per anchor) on the
  box tower, replacing ATSS's centerness.
* Assignment (:func:`atss_assign`, per image, crowd boxes dropped first): for every GT, per level,
  the ``topk * A`` anchors whose centres are closest to the GT centre (``A`` anchors per location
  share a centre, so this is the ``topk`` closest locations: 9 locations x 2 anchors = the 18
  candidates per level of the reference); IoU threshold = mean + std (sample std, as the reference
  ATSS) of the candidates' IoUs; positives = candidates with IoU >= threshold whose centre lies
  inside the GT (at least 0.01 px from every side, as the reference); an anchor positive for several
  GTs takes the one with the highest IoU; every other anchor is negative (no ignored anchors).
* Losses (``normalizer`` = number of positives in the batch, averaged over DDP ranks, >= 1):
  classification = ``cls_loss(logits [B*A, K], labels [B*A], normalizer[, quality])`` with labels
  ``0..C-1`` / ``C`` as in :mod:`taildet.models.one_stage` and, for losses with ``uses_quality``
  (EQFL, QFL), ``quality`` = IoU of each positive anchor's detached decoded box with its GT (0
  elsewhere); ``bbox_regression`` = ``giou_weight`` x GIoU loss of the decoded boxes, weighted by
  that IoU and divided by the sum of the weights (averaged over ranks); ``bbox_iou`` = BCE of the
  IoU logit against that IoU, positives only, divided by the normalizer.
* Inference: score = ``cls_head.scores(logits) * sigmoid(iou_logit)``; per level
  the ``pre_nms_top_n`` best (anchor, class) pairs above ``score_thresh`` (0: none dropped), boxes
  decoded and clipped, class-wise NMS at ``nms_thresh``, ``detections_per_img`` per image.
  Labels ``0..C-1``.
* Like :mod:`taildet.models.one_stage`: ``model.cls_head`` (loss, logit transform, training
  record, detection cap) and ``model.last_logits`` (inference).

Box coding: torchvision's ``BoxCoder`` with weights (10, 10, 5, 5) (the reference ATSS's
(0.1, 0.1, 0.2, 0.2) standard deviations). Not reproduced from the reference: its learnable
per-level scale on the regression output.

"Stabilized settings" (long warm-up, gradient clipping) belong to the training config, not here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss
from torchvision.ops.misc import Conv2dNormActivation

from taildet.errors import ConfigError
from taildet.losses.base import ClassificationLoss, default_normalizer, mean_over_ranks
from taildet.models.heads import ClassificationHead
from taildet.models.one_stage import (
    _drop_crowd,
    _one_stage_detector,
    _resolve_backbone,
    _resolve_loss,
    _TailOneStage,
    feature_strides,
)
from taildet.models.one_stage_heads import _attach_cls_head, _elementwise_iou, _new_cls_head, anchor_labels

__all__ = ["build_atss", "TailATSS", "TailATSSHead", "atss_assign"]


# ----------------------------------------------------------------------------------------------
# assignment


def atss_assign(
    anchors: Tensor,
    num_anchors_per_level: Sequence[int],
    gt_boxes: Tensor,
    topk: int = 9,
    anchors_per_location: int = 1,
    return_thresholds: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Adaptive Training Sample Selection for one image.

    Args:
        anchors: ``[A, 4]`` xyxy anchors of the image, level after level.
        num_anchors_per_level: how many of ``anchors`` belong to each level.
        gt_boxes: ``[G, 4]`` xyxy GT boxes (crowd boxes already removed).
        topk: closest *locations* per level; ``topk * anchors_per_location`` candidate anchors.
        anchors_per_location: anchors sharing a centre at each location.
        return_thresholds: also return the ``[G]`` IoU thresholds (mean + std).

    Returns:
        ``matched_idxs`` ``[A]`` int64: the GT index of each positive anchor, -1 for negatives
        (torchvision's ``Matcher.BELOW_LOW_THRESHOLD``).
    """
    num_anchors = anchors.shape[0]
    num_gt = gt_boxes.shape[0]
    if sum(int(n) for n in num_anchors_per_level) != num_anchors:
        raise ValueError(f"num_anchors_per_level {list(num_anchors_per_level)} does not sum to {num_anchors} anchors")
    matched = torch.full((num_anchors,), -1, dtype=torch.int64, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        empty = anchors.new_zeros(num_gt)
        return (matched, empty) if return_thresholds else matched

    ious = box_ops.box_iou(anchors, gt_boxes)  # [A, G]
    anchor_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    gt_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = torch.cdist(anchor_ctr, gt_ctr)  # [A, G]

    candidates = []
    start = 0
    for n in num_anchors_per_level:
        n = int(n)
        k = min(int(topk) * int(anchors_per_location), n)
        if k > 0:
            _, idx = dist[start : start + n].topk(k, dim=0, largest=False)
            candidates.append(idx + start)
        start += n
    cand = torch.cat(candidates)  # [K, G]
    cand_iou = ious.gather(0, cand)
    std = cand_iou.std(dim=0) if cand.shape[0] > 1 else torch.zeros_like(cand_iou[0])
    thresh = cand_iou.mean(dim=0) + std  # [G]
    is_pos = cand_iou >= thresh[None]

    cx, cy = anchor_ctr[cand, 0], anchor_ctr[cand, 1]  # [K, G]
    gx1, gy1, gx2, gy2 = gt_boxes.unbind(1)
    margin = torch.stack([cx - gx1, cy - gy1, gx2 - cx, gy2 - cy]).amin(dim=0)
    is_pos &= margin > 0.01

    # an anchor positive for several GTs takes the one with the highest IoU
    # (a scatter along the anchors: the candidates of one GT are distinct anchors; no boolean-mask
    # indexing, so no host read on GPU)
    scored = torch.full_like(ious, -math.inf)
    scored.scatter_(0, cand, torch.where(is_pos, cand_iou, torch.full_like(cand_iou, -math.inf)))
    best, arg = scored.max(dim=1)
    matched = torch.where(best > -math.inf, arg, matched)
    return (matched, thresh) if return_thresholds else matched


# ----------------------------------------------------------------------------------------------
# head


def _tower(channels: int, num_convs: int, norm_layer: Callable[..., nn.Module] | None) -> nn.Sequential:
    return nn.Sequential(*[Conv2dNormActivation(channels, channels, norm_layer=norm_layer) for _ in range(num_convs)])


def _flatten(x: Tensor, per_anchor: int) -> Tensor:
    """``[B, A*K, H, W]`` -> ``[B, H*W*A, K]`` (torchvision's anchor order: location, then anchor)."""
    b, _, h, w = x.shape
    return x.view(b, -1, per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, per_anchor)


class TailATSSHead(nn.Module):
    """ATSS head: classification tower + classifier; box tower + box regressor + IoU predictor.

    ``forward(features)`` returns ``{"cls_logits": [B, HWA, K], "bbox_regression": [B, HWA, 4],
    "bbox_iou": [B, HWA, 1]}`` and remembers ``num_anchors_per_level`` for the assignment.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        cls_head: ClassificationHead,
        num_convs: int = 4,
        norm_layer: Callable[..., nn.Module] | None = None,
        quality_branch: bool = True,
    ):
        super().__init__()
        self.num_anchors = int(num_anchors)
        self.num_outputs = cls_head.num_outputs
        self.cls_tower = _tower(in_channels, num_convs, norm_layer)
        self.box_tower = _tower(in_channels, num_convs, norm_layer)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * self.num_outputs, 3, padding=1)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        self.bbox_iou = nn.Conv2d(in_channels, num_anchors, 3, padding=1) if quality_branch else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        _attach_cls_head(self, self.cls_logits, cls_head, num_anchors)
        self.num_anchors_per_level: list[int] = []

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        cls, reg, iou = [], [], []
        for f in features:
            c = self.cls_tower(f)
            b = self.box_tower(f)
            cls.append(_flatten(self.cls_logits(c), self.num_outputs))
            reg.append(_flatten(self.bbox_reg(b), 4))
            if self.bbox_iou is not None:
                iou.append(_flatten(self.bbox_iou(b), 1))
        self.num_anchors_per_level = [f.shape[-2] * f.shape[-1] * self.num_anchors for f in features]
        out = {"cls_logits": torch.cat(cls, 1), "bbox_regression": torch.cat(reg, 1)}
        if self.bbox_iou is not None:
            out["bbox_iou"] = torch.cat(iou, 1)
        return out

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
        decode: Callable[[Tensor, Tensor], Tensor],
        giou_weight: float,
    ) -> dict[str, Tensor]:
        cls_head = self.cls_head
        num_classes = cls_head.num_classes
        labels, quality, ious, gious, iou_logits = [], [], [], [], []
        for i, (t, m) in enumerate(zip(targets, matched_idxs)):
            labels.append(anchor_labels(m, t["labels"], num_classes))
            pos = torch.where(m >= 0)[0]
            boxes = decode(head_outputs["bbox_regression"][i][pos], anchors[i][pos])
            gt = t["boxes"][m[pos]].to(boxes.dtype)
            iou = _elementwise_iou(boxes.detach(), gt)
            q = boxes.new_zeros(m.shape[0])
            q[pos] = iou
            quality.append(q)
            ious.append(iou)
            gious.append(generalized_box_iou_loss(boxes, gt, reduction="none"))
            if "bbox_iou" in head_outputs:
                iou_logits.append(head_outputs["bbox_iou"][i][pos, 0])
        labels_all = torch.cat(labels)
        iou_all, giou_all = torch.cat(ious), torch.cat(gious)
        logits = head_outputs["cls_logits"].reshape(-1, self.num_outputs)
        normalizer = default_normalizer(logits.new_tensor(float(iou_all.numel())), None, logits.dtype)
        cls_head.observe(logits, labels_all)
        if cls_head.uses_quality:
            loss_cls = cls_head(logits, labels_all, normalizer, quality=torch.cat(quality))
        else:
            loss_cls = cls_head(logits, labels_all, normalizer)
        weight_sum = mean_over_ranks(iou_all.sum()).clamp(min=1e-6)
        loss_box = giou_weight * (giou_all * iou_all).sum() / weight_sum
        losses = {"classification": loss_cls, "bbox_regression": loss_box}
        if iou_logits:
            iou_logit_all = torch.cat(iou_logits)
            bce = F.binary_cross_entropy_with_logits(iou_logit_all, iou_all, reduction="sum")
            losses["bbox_iou"] = bce / normalizer
        return losses


# ----------------------------------------------------------------------------------------------
# detector


class TailATSS(_TailOneStage, RetinaNet):
    """torchvision ``RetinaNet`` with ATSS assignment, an IoU branch and a pluggable one-stage loss.

    Args:
        backbone: module with ``out_channels`` returning a Tensor or an OrderedDict of maps.
        cls_loss: a one-stage :class:`~taildet.losses.base.ClassificationLoss` (``self.cls_head.loss``).
        anchor_generator: torchvision ``AnchorGenerator`` (same anchors per location on every level).
        logit_transform: optional module applied to raw logits at inference.
        head_norm_layer: norm layer factory for the towers (None = no normalisation).
        num_convs: tower depth.
        topk: ATSS candidate locations per level.
        giou_weight: weight of the GIoU box loss.
        quality_branch: with False, no IoU predictor (test score = class score alone; ablation).
        **kwargs: passed to ``RetinaNet`` (min_size, max_size, score_thresh, nms_thresh,
            detections_per_img, topk_candidates, image_mean, image_std).
    """

    def __init__(
        self,
        backbone: nn.Module,
        cls_loss: ClassificationLoss,
        *,
        anchor_generator: AnchorGenerator,
        logit_transform: nn.Module | None = None,
        head_norm_layer: Callable[..., nn.Module] | None = None,
        num_convs: int = 4,
        topk: int = 9,
        giou_weight: float = 2.0,
        quality_branch: bool = True,
        **kwargs: Any,
    ):
        num_anchors = anchor_generator.num_anchors_per_location()[0]
        cls_head = _new_cls_head(cls_loss, logit_transform, kwargs)
        head = TailATSSHead(backbone.out_channels, num_anchors, cls_head, num_convs, head_norm_layer, quality_branch)
        super().__init__(backbone, cls_loss.num_classes, anchor_generator=anchor_generator, head=head, **kwargs)
        self.box_coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
        self.proposal_matcher = None  # ATSS assigns by atss_assign, not torchvision's Matcher
        self.topk = int(topk)
        self.giou_weight = float(giou_weight)
        self._setup_tail(cls_head)

    def assign(self, targets: list[dict[str, Tensor]], anchors: list[Tensor]) -> list[Tensor]:
        """ATSS ``matched_idxs`` per image for the anchors of the last head forward."""
        per_level = self.head.num_anchors_per_level
        return [
            atss_assign(a, per_level, t["boxes"], self.topk, self.head.num_anchors) for a, t in zip(anchors, targets)
        ]

    def compute_loss(self, targets, head_outputs, anchors):  # type: ignore[override]
        targets = _drop_crowd(targets)
        matched_idxs = self.assign(targets, anchors)
        return self.head.compute_loss(
            targets, head_outputs, anchors, matched_idxs, self.box_coder.decode_single, self.giou_weight
        )

    def postprocess_detections(self, head_outputs, anchors, image_shapes):  # type: ignore[override]
        def with_iou(scores: Tensor, outputs: dict, level: int, index: int) -> Tensor:
            return scores * torch.sigmoid(outputs["bbox_iou"][level][index])

        extra = with_iou if "bbox_iou" in head_outputs else None
        return self._postprocess(head_outputs, anchors, image_shapes, self.box_coder.decode_single, extra)


# ----------------------------------------------------------------------------------------------
# builder


def build_atss(
    num_classes: int,
    *,
    backbone: str | nn.Module = "tiny",
    backbone_weights: Any = None,
    backbone_kwargs: dict | None = None,
    trainable_backbone_layers: int | None = None,
    norm: str = "bn",
    loss: str | ClassificationLoss = "equalized_focal",
    loss_kwargs: dict | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    topk: int = 9,
    anchor_scales: Sequence[float] = (6, 8),
    quality_branch: bool = True,
    head_norm: str | None = "gn",
    num_convs: int = 4,
    score_thresh: float = 0.0,
    nms_thresh: float = 0.5,
    detections_per_img: int = 300,
    pre_nms_top_n: int = 6000,
    giou_weight: float = 2.0,
    logit_transform: nn.Module | None = None,
) -> TailATSS:
    """Build a :class:`TailATSS` (the EFL paper's improved ATSS baseline) for ``num_classes`` classes.

    Args:
        backbone, backbone_weights, backbone_kwargs, trainable_backbone_layers, norm: as
            :func:`~taildet.models.one_stage.build_retinanet`.
        loss: a one-stage loss name (``"equalized_focal"``, ``"equalized_quality_focal"``,
            ``"quality_focal"``, ``"sigmoid_focal"``, ...) with ``loss_kwargs``, or a loss object.
        min_size, max_size, image_mean, image_std: torchvision's resize / normalisation.
        topk: ATSS candidate locations per level (x anchors per location = candidate anchors).
        anchor_scales: anchor sizes as multiples of each level's stride (one square anchor each).
        quality_branch: the IoU predictor on the box tower (test score x sigmoid(IoU logit), BCE
            on IoU targets); False drops it (an ablation; no centerness branch is offered).
        head_norm: ``"gn"`` (default), ``"bn"``, or None/``"none"`` in the towers.
        num_convs: tower depth.
        score_thresh, nms_thresh, detections_per_img: inference; ``pre_nms_top_n`` candidates per level.
        giou_weight: weight of the GIoU box loss.
        logit_transform: optional inference-time module on raw logits.
    """
    if int(topk) < 1:
        raise ConfigError(f"build_atss: topk must be >= 1, got {topk!r}")
    scales = tuple(float(s) for s in anchor_scales)
    if not scales or any(s <= 0 for s in scales):
        raise ConfigError(f"build_atss: anchor_scales must be positive numbers, got {anchor_scales!r}")
    if int(pre_nms_top_n) < 1 or int(detections_per_img) < 1:
        raise ConfigError("build_atss: pre_nms_top_n and detections_per_img must be >= 1")
    cls_loss = _resolve_loss(loss, num_classes, loss_kwargs)
    net = _resolve_backbone(backbone, backbone_weights, norm, backbone_kwargs, trainable_backbone_layers)
    strides = feature_strides(net)
    sizes = tuple(tuple(max(1, int(round(s * stride))) for s in scales) for stride in strides)
    generator = AnchorGenerator(sizes, ((1.0,),) * len(strides))
    return _one_stage_detector(
        TailATSS, net, cls_loss, generator, head_norm=head_norm, image_mean=image_mean, image_std=image_std,
        logit_transform=logit_transform, num_convs=num_convs, topk=topk, giou_weight=giou_weight,
        quality_branch=bool(quality_branch), min_size=min_size, max_size=max_size, score_thresh=score_thresh,
        nms_thresh=nms_thresh, detections_per_img=detections_per_img, topk_candidates=int(pre_nms_top_n),
    )
