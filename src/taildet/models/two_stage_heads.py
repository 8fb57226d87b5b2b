"""The RoI heads of the two-stage detectors (:mod:`taildet.models.two_stage`): the box predictor
(classifier + box regressor, optional logit BatchNorm) and :class:`TailRoIHeads`, torchvision's RoI
heads with the classification handed to the model's :class:`~taildet.models.heads.ClassificationHead`
(sampling record, MFS integration, class-aware post-processing)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from taildet.errors import ConfigError
from taildet.models.heads import ClassificationHead

__all__ = ["TailBoxPredictor", "TailRoIHeads"]


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
        (what the loss saw: batch-normalised when the predictor's ``logit_bn`` is in training mode),
        ``box_deltas`` [R, 4C or 4] (the box regression of the sampled RoIs; a cascade refines them).
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
            "box_deltas": box_deltas.detach(),
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
        return self.postprocess_scores(self.cls_head.scores(class_logits), box_regression, proposals, image_shapes)

    def postprocess_scores(
        self,
        scores_all: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """:meth:`postprocess_detections` from foreground scores ``[R, C]`` (a cascade averages its
        stages before this): per-class boxes, clipping, score threshold, NMS, top-k."""
        C = self.num_classes
        if scores_all.shape != (box_regression.shape[0], C):
            raise RuntimeError(
                f"{type(self.cls_head.loss).__name__}.scores returned {tuple(scores_all.shape)}, "
                f"expected [{box_regression.shape[0]}, {C}]"
            )
        # the box count per RoI from the regression width: ``-1`` is ambiguous when a batch has no
        # proposal at all (a badly trained RPN), which made inference fail inside torch
        pred_boxes = self.box_coder.decode(box_regression, proposals).reshape(
            box_regression.shape[0], box_regression.shape[-1] // 4, 4)
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
