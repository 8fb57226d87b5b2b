"""The dense heads of the one-stage detectors (:mod:`taildet.models.one_stage`, :mod:`taildet.models.atss`):
per-anchor labels from the matcher, the localisation quality EQFL reads, the classification loss
call (normalised by the positive anchors averaged over ranks), and torchvision's RetinaNet / FCOS
heads with the classification handed to the detector's
:class:`~taildet.models.heads.ClassificationHead`."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)
from torchvision.ops import boxes as box_ops

from taildet.errors import ConfigError
from taildet.losses.base import ClassificationLoss, default_normalizer
from taildet.models.heads import ClassificationHead

__all__ = [
    "TailRetinaNetHead",
    "TailRetinaNetClassificationHead",
    "TailFCOSHead",
    "anchor_labels",
    "anchor_quality",
    "HEAD_NORMS",
]

#: The ``head_norm`` names of the dense heads' towers: none (torchvision's v1 head), GroupNorm, BatchNorm.
HEAD_NORMS = ("none", "gn", "bn")


def _head_norm(head_norm: str | None, channels: int) -> Callable[[int], nn.Module] | None:
    if head_norm is None or head_norm == "none":
        return None
    if head_norm == "gn":
        groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
        return partial(nn.GroupNorm, groups)
    if head_norm == "bn":
        return nn.BatchNorm2d
    raise ConfigError(f"head_norm must be None or one of {', '.join(HEAD_NORMS)}, got {head_norm!r}")


def _new_cls_head(loss: ClassificationLoss, logit_transform: nn.Module | None, detector_kwargs: dict) -> ClassificationHead:
    """The :class:`ClassificationHead` of a one-stage detector (stage ``"head"``; the cap is the
    ``detections_per_img`` keyword given to torchvision's detector, 300 by default)."""
    return ClassificationHead(loss, stage="head", detections_per_img=detector_kwargs.get("detections_per_img", 300),
                              logit_transform=logit_transform)



def anchor_labels(matched_idxs: Tensor, gt_labels: Tensor, num_classes: int) -> Tensor:
    """One-stage label vector of one image from torchvision's matcher output.

    ``matched_idxs[a] >= 0`` -> ``gt_labels[matched_idxs[a]]``; ``Matcher.BELOW_LOW_THRESHOLD``
    (-1, also FCOS's "unmatched") -> ``num_classes``; ``Matcher.BETWEEN_THRESHOLDS`` (-2) -> ``-1``.
    Fixed shapes (no boolean-mask indexing: no host read on GPU).
    """
    negative = torch.full_like(matched_idxs, num_classes)
    if gt_labels.numel():
        labels = gt_labels.to(matched_idxs.dtype)[matched_idxs.clamp(min=0)]
        labels = torch.where(matched_idxs >= 0, labels, negative)
    else:
        labels = negative
    return labels.masked_fill(matched_idxs == det_utils.Matcher.BETWEEN_THRESHOLDS, -1)


def _batch_labels(targets: list[dict[str, Tensor]], matched_idxs: list[Tensor], num_classes: int) -> Tensor:
    return torch.cat([anchor_labels(m, t["labels"], num_classes) for t, m in zip(targets, matched_idxs)])


def _set_unregistered(module: nn.Module, name: str, value: Any) -> None:
    """Attach ``value`` to ``module`` without registering it as a submodule (no duplicate keys)."""
    object.__setattr__(module, name, value)


def _init_cls_bias(conv: nn.Conv2d, loss: ClassificationLoss, num_anchors: int) -> None:
    """Initialise a dense classifier bias ``[A * K]`` (A blocks of K) with ``loss.init_bias``."""
    k = loss.num_outputs()
    per_anchor = torch.zeros(k, dtype=conv.bias.dtype, device=conv.bias.device)
    loss.init_bias(per_anchor)
    with torch.no_grad():
        conv.bias.copy_(per_anchor.repeat(num_anchors))


def _attach_cls_head(head: nn.Module, cls_conv: nn.Conv2d, cls_head: ClassificationHead, num_anchors: int) -> None:
    """The setup every one-stage dense head shares: classifier bias from the loss, and the
    detector's classification head attached unregistered as ``head.cls_head``."""
    _init_cls_bias(cls_conv, cls_head.loss, num_anchors)
    _set_unregistered(head, "cls_head", cls_head)


def _cls_loss_call(
    cls_head: ClassificationHead,
    cls_logits: Tensor,
    labels: Tensor,
    quality: Tensor | None = None,
) -> Tensor:
    logits = cls_logits.reshape(-1, cls_logits.shape[-1])
    num_pos = ((labels >= 0) & (labels < cls_head.num_classes)).sum()
    # number of positive anchors averaged over DDP ranks, at least 1 (the same on every rank)
    normalizer = default_normalizer(num_pos, None, torch.float32)
    cls_head.observe(logits, labels)
    if quality is None:
        return cls_head(logits, labels, normalizer)
    return cls_head(logits, labels, normalizer, quality=quality)


def _elementwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of row ``i`` of ``a`` with row ``i`` of ``b`` (xyxy), ``[N]``."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    union = box_ops.box_area(a) + box_ops.box_area(b) - inter
    return inter / union.clamp(min=1e-6)


def anchor_quality(
    decode: Callable[[Tensor, Tensor], Tensor],
    bbox_regression: Tensor,
    anchors: list[Tensor],
    targets: list[dict[str, Tensor]],
    matched_idxs: list[Tensor],
) -> Tensor:
    """``[B*A]`` localisation quality for losses that use it (EQFL): IoU of the detached decoded box
    of each positive anchor with its matched GT box; 0 for negative and ignored anchors."""
    out = []
    for reg, anc, t, m in zip(bbox_regression, anchors, targets, matched_idxs):
        q = reg.new_zeros(m.shape[0])
        pos = torch.where(m >= 0)[0]
        if pos.numel() > 0:
            boxes = decode(reg[pos].detach(), anc[pos])
            q[pos] = _elementwise_iou(boxes, t["boxes"][m[pos]]).to(q.dtype)
        out.append(q)
    return torch.cat(out)


class TailRetinaNetClassificationHead(RetinaNetClassificationHead):
    """torchvision's RetinaNet classification tower with a pluggable one-stage loss.

    Width ``K = cls_head.num_outputs`` per anchor, bias from ``loss.init_bias``. ``compute_loss``
    builds the label vector (see the module docstring) and calls the loss once for the batch.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        cls_head: ClassificationHead,
        norm_layer: Callable[..., nn.Module] | None = None,
    ):
        super().__init__(in_channels, num_anchors, cls_head.num_outputs, norm_layer=norm_layer)
        _attach_cls_head(self, self.cls_logits, cls_head, num_anchors)

    def compute_loss(self, targets, head_outputs, matched_idxs, quality=None):  # type: ignore[override]
        labels = _batch_labels(targets, matched_idxs, self.cls_head.num_classes)
        return _cls_loss_call(self.cls_head, head_outputs["cls_logits"], labels, quality)


class TailRetinaNetHead(RetinaNetHead):
    """RetinaNet head = :class:`TailRetinaNetClassificationHead` + torchvision's regression head."""

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        cls_head: ClassificationHead,
        norm_layer: Callable[..., nn.Module] | None = None,
    ):
        nn.Module.__init__(self)  # RetinaNetHead.__init__ would build a stock classification head
        self.classification_head = TailRetinaNetClassificationHead(in_channels, num_anchors, cls_head, norm_layer)
        self.regression_head = RetinaNetRegressionHead(in_channels, num_anchors, norm_layer=norm_layer)

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):  # type: ignore[override]
        quality = None
        if self.classification_head.cls_head.uses_quality:
            decode = self.regression_head.box_coder.decode_single
            quality = anchor_quality(decode, head_outputs["bbox_regression"], anchors, targets, matched_idxs)
        return {
            "classification": self.classification_head.compute_loss(targets, head_outputs, matched_idxs, quality),
            "bbox_regression": self.regression_head.compute_loss(targets, head_outputs, anchors, matched_idxs),
        }


class TailFCOSHead(FCOSHead):
    """FCOS head whose classification loss is the pluggable one-stage loss.

    Box (GIoU) and centerness losses are torchvision's ``FCOSHead.compute_loss``, called with a
    one-column all-zero stand-in for the classification output and all-zero labels, so its own
    focal term costs ``1/C`` of the real one and is discarded.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        cls_head: ClassificationHead,
        num_convs: int = 4,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ):
        nn.Module.__init__(self)  # FCOSHead.__init__ hard-codes GroupNorm(32), too wide for tiny nets
        if norm_layer is None:
            norm_layer = _identity_norm
        self.box_coder = det_utils.BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(
            in_channels, num_anchors, cls_head.num_outputs, num_convs, norm_layer=norm_layer
        )
        self.regression_head = FCOSRegressionHead(in_channels, num_anchors, num_convs, norm_layer=norm_layer)
        _attach_cls_head(self, self.classification_head.cls_logits, cls_head, num_anchors)

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):  # type: ignore[override]
        cls_logits = head_outputs["cls_logits"]
        labels = _batch_labels(targets, matched_idxs, self.cls_head.num_classes)
        quality = None
        if self.cls_head.uses_quality:
            bbox_regression = head_outputs["bbox_regression"]
            quality = anchor_quality(self.box_coder.decode, bbox_regression, anchors, targets, matched_idxs)
        loss_cls = _cls_loss_call(self.cls_head, cls_logits, labels, quality)
        stand_in = dict(head_outputs)
        stand_in["cls_logits"] = cls_logits.new_zeros(cls_logits.shape[0], cls_logits.shape[1], 1)
        box_targets = [{"boxes": t["boxes"], "labels": torch.zeros_like(t["labels"])} for t in targets]
        stock = super().compute_loss(box_targets, stand_in, anchors, matched_idxs)
        return {
            "classification": loss_cls,
            "bbox_regression": stock["bbox_regression"],
            "bbox_ctrness": stock["bbox_ctrness"],
        }


def _identity_norm(channels: int) -> nn.Module:
    return nn.Identity()
