"""Two-stage detectors (Faster / Mask R-CNN) whose RoI classifier follows a taildet loss.

The detectors are torchvision's ``FasterRCNN`` / ``MaskRCNN`` (transform, RPN, ``MultiScaleRoIAlign``,
``TwoMLPHead``, proposal matching and sampling, box coder, mask head and mask loss are all
torchvision's) with one part replaced: the RoI heads are a :class:`TailRoIHeads`, which hands
classification to the model's :class:`taildet.models.heads.ClassificationHead` (``model.cls_head``,
holding the :class:`taildet.losses.base.ClassificationLoss` -- the "head policy"):

* the classifier width is ``loss.num_outputs()`` (``C + 1`` with background **last** for softmax
  losses, ``C`` for sigmoid losses) and its bias starts at ``loss.init_bias``;
* training: after torchvision's matching/sampling, ``cls_head.update(...)`` then
  ``cls_head(logits, labels)``; the sampled logits, labels and GT ids go to ``cls_head.record``;
* inference: ``scores = cls_head.scores(logits)`` (``[R, C]``, the logit transform then
  ``loss.scores``), then per-class box decoding, clipping, score threshold, small-box removal,
  per-class NMS and the top ``cls_head.detections_per_img``.

Label conventions at the model boundary: targets carry ``labels`` in ``0..C-1`` (not torchvision's
1-based labels); crowd boxes (``iscrowd != 0``) are dropped before matching; outputs carry labels in
``0..C-1``. Internally torchvision's matcher uses 0 as background, so the heads shift labels by +1
going into the matcher and map them back (background -> ``C``) right after sampling.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from taildet.errors import ConfigError, DataError
from taildet.losses import build_loss
from taildet.models.backbones import build_backbone
from taildet.models.classifiers import LogitBatchNorm, build_classifier
from taildet.models.heads import ClassificationHead, register_legacy_key_hook
from taildet.models.poolers import ParallelMultiScaleRoIAlign

__all__ = [
    "TailBoxPredictor",
    "TailRoIHeads",
    "TailTransform",
    "TailFasterRCNN",
    "TailMaskRCNN",
    "build_faster_rcnn",
    "build_mask_rcnn",
    "prepare_targets",
    "default_anchor_sizes",
]

#: Per-target entries with one row per box; crowd filtering keeps them aligned.
_PER_BOX_KEYS = ("boxes", "labels", "masks", "iscrowd", "area")


# --------------------------------------------------------------------------------------------
# Boundary: targets in, images resized (or not)


def prepare_targets(targets: list[dict[str, Tensor]], num_classes: int) -> list[dict[str, Tensor]]:
    """Check labels are in ``0..C-1`` and drop crowd boxes (``iscrowd != 0``).

    Returns new dicts (the caller's are not modified). Raises :class:`DataError` naming the target.
    """
    out = []
    for i, t in enumerate(targets):
        if "boxes" not in t or "labels" not in t:
            raise DataError("model targets", f"targets[{i}]", "needs 'boxes' and 'labels'")
        boxes, labels = t["boxes"], t["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
            raise DataError(
                "model targets",
                f"targets[{i}]",
                f"expected boxes [N, 4] and labels [N], got {tuple(boxes.shape)} and {tuple(labels.shape)}",
            )
        if labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                raise DataError(
                    "model targets",
                    f"targets[{i}]['labels']",
                    f"labels must be foreground classes 0..{num_classes - 1} (background is implicit), "
                    f"got values in [{lo}, {hi}]",
                )
        t = dict(t)
        crowd = t.get("iscrowd")
        if crowd is not None and crowd.numel() and bool((crowd != 0).any()):
            keep = crowd == 0
            n = keep.shape[0]
            for k in _PER_BOX_KEYS:
                v = t.get(k)
                if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n:
                    t[k] = v[keep]
        out.append(t)
    return out


class TailTransform(GeneralizedRCNNTransform):
    """torchvision's transform (normalise, resize, pad) that skips no-op resizes.

    ``keep_size=True`` never resizes: images (already at the training size, e.g. the embedded 96 px
    set) are only normalised and padded to a multiple of ``size_divisible``. Otherwise images are
    resized as torchvision does (shorter side ``min_size``, longer side at most ``max_size``),
    except that an image whose scale factor is exactly 1 is passed through untouched
    (``min_size = max_size = 96`` on 96 px images costs no interpolation).
    """

    def __init__(self, *args: Any, keep_size: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.keep_size = bool(keep_size)

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        if self.keep_size:
            return image, target
        if self.fixed_size is None and (not self.training or len(self.min_size) == 1):
            h, w = image.shape[-2:]
            scale = min(float(self.min_size[-1]) / min(h, w), float(self.max_size) / max(h, w))
            if scale == 1.0:
                return image, target
        return super().resize(image, target)


# --------------------------------------------------------------------------------------------
# RoI heads


class TailBoxPredictor(nn.Module):
    """Classifier + box regressor; state-dict keys as torchvision's ``FastRCNNPredictor``.

    ``cls_score`` is any classifier from :mod:`taildet.models.classifiers` (``K`` outputs);
    ``bbox_pred`` regresses ``4 * C`` deltas (one box per foreground class, no background box) or
    ``4`` with ``class_agnostic=True``.

    ``logit_bn`` (optional, a :class:`~taildet.models.classifiers.LogitBatchNorm`; LogN's released
    recipe, ``model.logit_bn``): while that module is in training mode, the class logits are
    returned batch-normalised over the rows of the call (every column, background included) and
    its running statistics are updated; in eval mode (``model.eval()``, and the LogN statistics
    pass, which puts norm layers in eval mode) the raw logits are returned. A call with fewer
    than 2 rows is returned raw (a batch variance needs 2). When set, its buffers appear in the
    state dict as ``roi_heads.box_predictor.logit_bn.*``; when None, the keys are unchanged.
    """

    def __init__(self, in_channels: int, classifier: nn.Module, num_classes: int, class_agnostic: bool = False,
                 logit_bn: nn.Module | None = None):
        super().__init__()
        self.cls_score = classifier
        self.bbox_pred = nn.Linear(in_channels, 4 * (1 if class_agnostic else num_classes))
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)
        self.logit_bn = logit_bn

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        logits = self.cls_score(x)
        bn = self.logit_bn
        if bn is not None and bn.training and logits.shape[0] > 1:
            logits = bn(logits)
        return logits, self.bbox_pred(x)


class TailRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` with the classification handed to a :class:`ClassificationHead`.

    ``cls_head`` -- the model's classification head (an unregistered reference: its state is in
    the model's ``state_dict`` as ``cls_head.*``). Its loss trains and scores the RoIs, its
    ``logit_transform`` applies at inference, its ``detections_per_img`` caps the detections,
    and each training forward fills its ``record`` (sampled logits, labels, batch GT ids, image
    ids and, with ``record_features``, the pooled RoI features).

    Attributes set after each forward (all tensors detached, on the model's device):

    ``last_sampled`` (training) -- the RoI sampler's record, a dict with
        ``proposals`` list[Tensor [R_i, 4]] (sampled, GT boxes included), ``labels`` [R] (``0..C-1``,
        background ``C``), ``gt_index`` [R] (assigned GT within its image, -1 for background),
        ``batch_gt_index`` [R] (the same, unique over the batch: what ``loss.update`` receives),
        ``image_index`` [R], ``regression_targets`` [R, 4], ``box_features`` [R, ch, 7, 7] (pooled,
        before the box head; ``None`` unless ``cls_head.record_features``), ``logits`` [R, K]
        (what the loss saw: batch-normalised when the predictor's ``logit_bn`` is in training mode).
    ``last_logits`` / ``last_logit_image_index`` (inference) -- raw logits ``[R, K]`` of every RoI
        (before ``logit_transform``) and the image each belongs to.

    ``mfs`` -- optional :class:`taildet.sampling.mfs.MemoryAugmentedSampling` (LOCE's MFS),
    used in training only. When set, each training forward: enqueues the current GTs' jittered-box
    features, samples the memory, runs the box head on the sampled RoIs and the memory samples
    together, updates the loss state with the memory samples' logits and labels, and computes the
    classification and box-regression losses over sampled RoIs followed by memory samples (the
    mask head sees only the sampled RoIs). A plain attribute, never in the ``state_dict``.
    """

    def __init__(
        self,
        box_roi_pool: MultiScaleRoIAlign,
        box_head: nn.Module,
        box_predictor: TailBoxPredictor,
        cls_head: ClassificationHead,
        *,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        bbox_reg_weights: tuple[float, float, float, float] | None = None,
        score_thresh: float = 1e-4,
        nms_thresh: float = 0.5,
        mask_roi_pool: MultiScaleRoIAlign | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
        class_agnostic_box_reg: bool = False,
    ):
        super().__init__(
            box_roi_pool,
            box_head,
            box_predictor,
            fg_iou_thresh,
            bg_iou_thresh,
            batch_size_per_image,
            positive_fraction,
            bbox_reg_weights,
            score_thresh,
            nms_thresh,
            cls_head.detections_per_img,
            mask_roi_pool=mask_roi_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
        )
        del self.detections_per_img  # one cap: cls_head.detections_per_img
        loss = cls_head.loss
        if loss.kind != "two_stage":
            raise ConfigError(
                f"loss {type(loss).__name__} is a {loss.kind!r} loss; a two-stage RoI head needs a two_stage loss"
            )
        object.__setattr__(self, "cls_head", cls_head)  # owned (registered) by the detector
        self.num_classes = loss.num_classes
        self.class_agnostic_box_reg = bool(class_agnostic_box_reg)
        self.mfs: Any = None
        self.last_sampled: dict[str, Any] | None = None
        self.last_logits: Tensor | None = None
        self.last_logit_image_index: Tensor | None = None

    # -- building blocks other code reuses (e.g. memory-augmented feature sampling) -------------

    def forward_box_features(
        self, features: dict[str, Tensor], boxes_list: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """RoIAlign of ``boxes_list`` (per image, xyxy in the transformed image) -> ``[R, ch, 7, 7]``."""
        return self.box_roi_pool(features, boxes_list, image_shapes)

    def box_head_logits(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """Box head + predictor on pooled features -> (logits ``[R, K]``, box deltas ``[R, 4C or 4]``)."""
        return self.box_predictor(self.box_head(pooled))

    def box_regression_loss(self, box_deltas: Tensor, labels: Tensor, regression_targets: Tensor) -> Tensor:
        """torchvision's Fast R-CNN box loss: smooth-L1 (beta 1/9) summed over positives / #RoIs."""
        n = labels.numel()
        pos = torch.where(labels < self.num_classes)[0]
        deltas = box_deltas.reshape(n, -1, 4)
        if self.class_agnostic_box_reg:
            pred = deltas[pos, 0]
        else:
            pred = deltas[pos, labels[pos]]
        loss = F.smooth_l1_loss(pred, regression_targets[pos], beta=1 / 9, reduction="sum")
        return loss / max(n, 1)

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("TailRoIHeads: targets are required in training mode")
            return [], self._forward_train(features, proposals, image_shapes, targets)
        return self._forward_test(features, proposals, image_shapes), {}

    def _forward_train(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        C = self.num_classes
        shifted = []
        for t in targets:
            if not t["boxes"].is_floating_point():
                raise TypeError(f"target boxes must be of float type, got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must be of int64 type, got {t['labels'].dtype}")
            s = {"boxes": t["boxes"], "labels": t["labels"] + 1}  # torchvision: 0 = background
            if "masks" in t:
                s["masks"] = t["masks"]
            shifted.append(s)
        proposals, matched_idxs, tv_labels, regression_targets = self.select_training_samples(proposals, shifted)

        device = proposals[0].device
        tv = torch.cat(tv_labels)
        fg = tv > 0
        labels = torch.where(fg, tv - 1, torch.full_like(tv, C))
        matched = torch.cat(matched_idxs)
        gt_index = torch.where(fg, matched, torch.full_like(matched, -1))
        image_index = torch.cat(
            [torch.full((len(p),), i, dtype=torch.int64, device=device) for i, p in enumerate(proposals)]
        )
        gt_counts = torch.tensor([len(t["boxes"]) for t in targets], dtype=torch.int64, device=device)
        gt_offsets = torch.cumsum(gt_counts, 0) - gt_counts
        batch_gt_index = torch.where(fg, matched + gt_offsets[image_index], torch.full_like(matched, -1))
        reg_targets = torch.cat(regression_targets)

        head = self.cls_head
        mfs = self.mfs
        memory = None
        if mfs is not None:  # LOCE's MFS: enqueue current GTs, then sample the memory
            mfs.enqueue_for_step(self, features, targets, image_shapes)
            memory = mfs.sample(head.loss, device)
        pooled = self.forward_box_features(features, proposals, image_shapes)
        if memory is None:
            logits, box_deltas = self.box_head_logits(pooled)
            if mfs is None:
                head.update(logits.detach(), labels, batch_gt_index)
            else:
                mfs.update_mean_score(head.loss, logits.detach(), labels, batch_gt_index, None, None)
            cls_logits, cls_labels, all_deltas, all_reg = logits, labels, box_deltas, reg_targets
        else:
            # the box head and predictor work row by row: the memory samples go through them in a
            # call of their own (no copy of the sampled RoIs' features into a concatenation)
            logits, box_deltas = self.box_head_logits(pooled)
            mem_logits, mem_deltas = self.box_head_logits(memory.features.to(pooled.dtype))
            cls_logits, all_deltas = torch.cat([logits, mem_logits]), torch.cat([box_deltas, mem_deltas])
            mfs.update_mean_score(head.loss, logits.detach(), labels, batch_gt_index, mem_logits.detach(),
                                  memory.labels)
            cls_labels = torch.cat([labels, memory.labels])
            all_reg = torch.cat([reg_targets, memory.regression_targets.to(reg_targets.dtype)])
        losses = {
            "loss_classifier": head(cls_logits, cls_labels),
            "loss_box_reg": self.box_regression_loss(all_deltas, cls_labels, all_reg),
        }
        self.last_sampled = {
            "proposals": [p.detach() for p in proposals],
            "labels": labels,
            "gt_index": gt_index,
            "batch_gt_index": batch_gt_index,
            "image_index": image_index,
            "regression_targets": reg_targets.detach(),
            "box_features": pooled.detach() if head.record_features else None,
            "logits": logits.detach(),
        }
        head.observe(logits, labels, batch_gt_index, image_index, pooled)

        if self.has_mask():
            mask_proposals, pos_matched_idxs = [], []
            for img_labels, img_props, img_matched in zip(tv_labels, proposals, matched_idxs):
                pos = torch.where(img_labels > 0)[0]
                mask_proposals.append(img_props[pos])
                pos_matched_idxs.append(img_matched[pos])
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
            if not all("masks" in t for t in targets):
                raise ValueError("Mask R-CNN training needs 'masks' in every target")
            losses["loss_mask"] = maskrcnn_loss(
                mask_logits,
                mask_proposals,
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],  # 0..C-1 index the C mask channels directly
                pos_matched_idxs,
            )
        return losses

    def _forward_test(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        pooled = self.forward_box_features(features, proposals, image_shapes)
        logits, box_deltas = self.box_head_logits(pooled)
        self.last_logits = logits.detach()
        self.last_logit_image_index = torch.cat(
            [torch.full((len(p),), i, dtype=torch.int64, device=logits.device) for i, p in enumerate(proposals)]
        )
        boxes, scores, labels = self.postprocess_detections(logits, box_deltas, proposals, image_shapes)
        result = [{"boxes": b, "labels": l, "scores": s} for b, s, l in zip(boxes, scores, labels)]
        if self.has_mask():
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
            for mask_prob, r in zip(maskrcnn_inference(mask_logits, labels), result):
                r["masks"] = mask_prob
        return result

    def postprocess_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Scores from ``cls_head.scores`` (transform, then the loss's), per-class boxes, NMS, top-k;
        labels 0..C-1."""
        C = self.num_classes
        scores_all = self.cls_head.scores(class_logits)
        if scores_all.shape != (class_logits.shape[0], C):
            raise RuntimeError(
                f"{type(self.cls_head.loss).__name__}.scores returned {tuple(scores_all.shape)}, "
                f"expected [{class_logits.shape[0]}, {C}]"
            )
        # the box count per RoI from the regression width: ``-1`` is ambiguous when a batch has no
        # proposal at all (a badly trained RPN), which made inference fail inside torch
        pred_boxes = self.box_coder.decode(box_regression, proposals).reshape(
            class_logits.shape[0], box_regression.shape[-1] // 4, 4)
        if pred_boxes.shape[1] == 1:
            pred_boxes = pred_boxes.expand(-1, C, 4)
        counts = [len(p) for p in proposals]
        out_boxes, out_scores, out_labels = [], [], []
        for boxes, scores, image_shape in zip(pred_boxes.split(counts), scores_all.split(counts), image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(C, device=scores.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.cls_head.detections_per_img]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
            out_labels.append(labels[keep])
        return out_boxes, out_scores, out_labels


# --------------------------------------------------------------------------------------------
# Detectors


class _TailDetectorMixin:
    """Target preparation at the model boundary (label range check, crowd boxes dropped); the
    classification head ``cls_head`` (set by the builders); state dicts saved before it (keys
    ``roi_heads.loss.*``, ``roi_heads.logit_transform.*``) load through a key remap."""

    cls_head: ClassificationHead

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        register_legacy_key_hook(self)  # type: ignore[arg-type]

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):  # type: ignore[override]
        if targets is not None:
            targets = prepare_targets(targets, self.roi_heads.num_classes)
        return super().forward(images, targets)  # type: ignore[misc]

    @property
    def num_classes(self) -> int:
        return self.roi_heads.num_classes


class TailFasterRCNN(_TailDetectorMixin, FasterRCNN):
    """torchvision ``FasterRCNN`` with :class:`TailRoIHeads`; build with :func:`build_faster_rcnn`."""


class TailMaskRCNN(_TailDetectorMixin, MaskRCNN):
    """torchvision ``MaskRCNN`` with :class:`TailRoIHeads`; build with :func:`build_mask_rcnn`."""


def default_anchor_sizes(backbone_name: str, num_maps: int) -> tuple[tuple[int, ...], ...]:
    """Anchor sizes per feature map: tiny one map ``((16, 32, 64),)``; tiny FPN 16/32/64 on strides
    4/8/16; ResNet-FPN torchvision's 32..512 on strides 4..64; ResNet single map 64/128/256/512."""
    if backbone_name == "tiny":
        return ((16, 32, 64),) if num_maps == 1 else tuple((16 * 2**i,) for i in range(num_maps))
    if num_maps == 1:
        return ((64, 128, 256, 512),)
    return tuple((32 * 2**i,) for i in range(num_maps))


def _build_two_stage(
    with_masks: bool,
    num_classes: int,
    *,
    backbone: str,
    backbone_weights: str | os.PathLike | None,
    norm: str,
    loss: str,
    loss_kwargs: dict[str, Any] | None,
    classifier: str,
    logit_bn: bool,
    logit_bn_momentum: float | None,
    min_size: int,
    max_size: int,
    fixed_size: bool,
    anchor_sizes: tuple[tuple[int, ...], ...] | None,
    aspect_ratios: tuple[float, ...],
    rpn_pre_nms_top_n_train: int,
    rpn_post_nms_top_n_train: int,
    rpn_pre_nms_top_n_test: int,
    rpn_post_nms_top_n_test: int,
    rpn_batch_size_per_image: int,
    rpn_positive_fraction: float,
    box_batch_size_per_image: int,
    box_positive_fraction: float,
    box_score_thresh: float,
    box_nms_thresh: float,
    box_detections_per_img: int,
    representation_size: int,
    class_agnostic_box_reg: bool,
    trainable_backbone_layers: int,
    fpn: bool | None,
    mask_layers: tuple[int, ...] | None = None,
) -> FasterRCNN:
    if int(num_classes) <= 0:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    net = build_backbone(
        backbone, norm=norm, weights=backbone_weights, trainable_layers=trainable_backbone_layers, fpn=fpn
    )
    cls_loss = build_loss(loss, num_classes, **(loss_kwargs or {}))
    if cls_loss.kind != "two_stage":
        raise ConfigError(f"loss {loss!r} is for one-stage detectors; Faster/Mask R-CNN need a two-stage loss")

    num_maps = len(net.strides)
    if anchor_sizes is None:
        anchor_sizes = default_anchor_sizes(backbone, num_maps)
    anchor_sizes = tuple(tuple(int(s) for s in level) for level in anchor_sizes)
    if len(anchor_sizes) != num_maps:
        raise ConfigError(
            f"anchor_sizes has {len(anchor_sizes)} levels but backbone {backbone!r} gives {num_maps} feature maps"
        )
    ratios = tuple(aspect_ratios)
    if ratios and isinstance(ratios[0], (tuple, list)):
        per_level = tuple(tuple(float(r) for r in lv) for lv in ratios)
        if len(per_level) != num_maps:
            raise ConfigError(f"aspect_ratios has {len(per_level)} levels, expected {num_maps}")
    else:
        per_level = (tuple(float(r) for r in ratios),) * num_maps
    anchor_gen = AnchorGenerator(anchor_sizes, per_level)
    if len(set(anchor_gen.num_anchors_per_location())) != 1:
        raise ConfigError("every feature map needs the same number of anchors (sizes x ratios) for the RPN head")

    box_roi_pool = ParallelMultiScaleRoIAlign(featmap_names=list(net.featmap_names), output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(net.out_channels * 7 * 7, representation_size)
    cls_layer = build_classifier(classifier, representation_size, cls_loss.num_outputs())
    cls_loss.init_bias(cls_layer.bias)
    if not isinstance(logit_bn, bool):
        raise ConfigError(f"logit_bn must be true or false, got {logit_bn!r}")
    bn = None
    if logit_bn:
        bn = LogitBatchNorm(cls_loss.num_outputs(), momentum=1e-4 if logit_bn_momentum is None else logit_bn_momentum)
    elif logit_bn_momentum is not None:
        raise ConfigError("logit_bn_momentum is set but logit_bn is false (it is the momentum of the logits' BatchNorm)")
    box_predictor = TailBoxPredictor(representation_size, cls_layer, num_classes, class_agnostic_box_reg,
                                     logit_bn=bn)

    common: dict[str, Any] = dict(
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchor_gen,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        rpn_positive_fraction=rpn_positive_fraction,
        box_roi_pool=box_roi_pool,
        box_head=box_head,
        box_predictor=box_predictor,
    )
    mask_parts: dict[str, Any] = {}
    if with_masks:
        if mask_layers is None:
            mask_layers = (256, 256, 256, 256) if net.out_channels >= 256 else (64, 64)
        mask_parts = dict(
            mask_roi_pool=ParallelMultiScaleRoIAlign(featmap_names=list(net.featmap_names), output_size=14, sampling_ratio=2),
            mask_head=MaskRCNNHeads(net.out_channels, tuple(mask_layers), 1),
            mask_predictor=MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], num_classes),  # C channels
        )
        model: FasterRCNN = TailMaskRCNN(net, **common, **mask_parts)
    else:
        model = TailFasterRCNN(net, **common)

    model.cls_head = ClassificationHead(cls_loss, stage="roi_heads", detections_per_img=box_detections_per_img,
                                        record_features=True)
    model.cls_head.set_logit_bn(bn)
    model.roi_heads = TailRoIHeads(
        box_roi_pool,
        box_head,
        box_predictor,
        model.cls_head,
        batch_size_per_image=box_batch_size_per_image,
        positive_fraction=box_positive_fraction,
        score_thresh=box_score_thresh,
        nms_thresh=box_nms_thresh,
        class_agnostic_box_reg=class_agnostic_box_reg,
        **mask_parts,
    )
    model.transform = TailTransform(
        min_size, max_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], keep_size=fixed_size
    )
    return model


def build_faster_rcnn(
    num_classes: int,
    *,
    backbone: str = "tiny",
    backbone_weights: str | os.PathLike | None = None,
    norm: str = "bn",
    loss: str = "softmax_ce",
    loss_kwargs: dict[str, Any] | None = None,
    classifier: str = "linear",
    logit_bn: bool = False,
    logit_bn_momentum: float | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    fixed_size: bool = False,
    anchor_sizes: tuple[tuple[int, ...], ...] | None = None,
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 1000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    rpn_positive_fraction: float = 0.5,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    box_score_thresh: float = 1e-4,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 300,
    representation_size: int = 1024,
    class_agnostic_box_reg: bool = False,
    trainable_backbone_layers: int = 5,
    fpn: bool | None = None,
) -> TailFasterRCNN:
    """Faster R-CNN for ``num_classes`` foreground classes with a pluggable classification loss.

    Args:
        backbone, backbone_weights, norm, trainable_backbone_layers, fpn: see
            :func:`taildet.models.backbones.build_backbone` (``backbone_weights`` is a local
            torchvision ResNet state dict path; nothing is downloaded).
        loss, loss_kwargs: a name in :data:`taildet.losses.LOSSES` and its keyword arguments.
        classifier: ``"linear"`` or ``"cosine"``.
        logit_bn: LogN's released recipe (the authors' ``LogitNormHead``): an affine-free
            BatchNorm1d (eps 1e-5) over the classifier's ``K`` logits (background included), with
            batch statistics in training, before the loss; raw logits at eval. Its running
            statistics (momentum ``logit_bn_momentum``, default the reference's 1e-4) are buffers
            of the model: ``taildet calibrate --stats running`` turns them into LogN statistics.
            See :class:`taildet.models.classifiers.LogitBatchNorm`.
        min_size, max_size: torchvision's resize rule; ``min_size = max_size = 96`` leaves 96 px
            images untouched. ``fixed_size=True`` never resizes (the data pipeline sets the size).
        anchor_sizes: per feature map; None = :func:`default_anchor_sizes`. ``aspect_ratios``: one
            tuple for every map (or one tuple per map).
        rpn_batch_size_per_image, rpn_positive_fraction: RPN anchor sampling (torchvision's).
        box_*: RoI sampling (per image, GT boxes added) and inference post-processing.
        class_agnostic_box_reg: one box regressor for all classes instead of one per class.
    """
    return _build_two_stage(False, num_classes, **_kwargs_of(locals()))  # type: ignore[return-value]


def build_mask_rcnn(
    num_classes: int,
    *,
    backbone: str = "tiny",
    backbone_weights: str | os.PathLike | None = None,
    norm: str = "bn",
    loss: str = "softmax_ce",
    loss_kwargs: dict[str, Any] | None = None,
    classifier: str = "linear",
    logit_bn: bool = False,
    logit_bn_momentum: float | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    fixed_size: bool = False,
    anchor_sizes: tuple[tuple[int, ...], ...] | None = None,
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 1000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    rpn_positive_fraction: float = 0.5,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    box_score_thresh: float = 1e-4,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 300,
    representation_size: int = 1024,
    class_agnostic_box_reg: bool = False,
    trainable_backbone_layers: int = 5,
    fpn: bool | None = None,
    mask_layers: tuple[int, ...] | None = None,
) -> TailMaskRCNN:
    """Mask R-CNN: :func:`build_faster_rcnn` plus torchvision's mask head with ``C`` mask channels.

    ``mask_layers``: widths of the mask head's 3x3 convs (default ``(256,) * 4`` for 256-channel
    backbones as torchvision, ``(64, 64)`` for the tiny network). Output masks are ``[N, 1, H, W]``
    probabilities.
    """
    return _build_two_stage(True, num_classes, **_kwargs_of(locals()))  # type: ignore[return-value]


def _kwargs_of(local_vars: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in local_vars.items() if k != "num_classes"}
