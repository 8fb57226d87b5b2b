"""The RoI heads of Cascade R-CNN (:mod:`taildet.models.cascade`): a sequence of
:class:`~taildet.models.two_stage_heads.TailRoIHeads`, one per stage, each refining the boxes of
the one before.

Training (stage ``t = 0, 1, 2``), as mmdetection's ``CascadeRoIHead``:

* stage ``t`` matches and samples its proposals with its own IoU threshold (torchvision's
  ``select_training_samples``: GT boxes added, ``box_batch_size_per_image`` RoIs per image with
  the positive fraction), trains its classifier through its own
  :class:`~taildet.models.heads.ClassificationHead` (own loss instance, own state update, own
  record) and regresses class-agnostic deltas encoded with its own box-coder weights; its
  losses are multiplied by its stage loss weight and named ``s{t}.loss_classifier`` /
  ``s{t}.loss_box_reg``;
* the proposals of stage ``t + 1`` are stage ``t``'s sampled RoIs, decoded with its deltas,
  clipped to the image and detached, less the RoIs that were GT boxes added by the sampler
  (mmdetection's ``refine_bboxes`` drops those ``pos_is_gts``; the next stage adds every GT box
  again);
* the mask head (Mask variant) trains on the positives of the **last** stage only, with weight 1
  (mmdetection trains one mask head per stage, weighted like the box losses; torchvision's Mask
  R-CNN has one mask head, which is what this keeps).

Test time: every stage runs on the boxes refined by the stage before; the class logits of each
stage go through that stage's ``logit_transform`` (LogN statistics of that stage), are
**averaged over the stages as logits**, and the last stage's loss turns the average into scores
(``loss.scores``: softmax without the background column, or sigmoid). This is mmdetection's rule
(``CascadeRoIHead.simple_test`` / ``predict_bbox``: the raw ``cls_score`` of every stage is
appended to ``ms_scores`` and their mean goes to the last bbox head's ``get_bboxes``, which applies
the softmax), which LogN's code (mmdetection-based, normalisation inside the bbox head's forward)
builds on. detectron2's ``CascadeROIHeads`` differs: it averages the stages' softmax
*probabilities*. The boxes are the last stage's regression of its input boxes; then the per-class
score threshold, NMS and top-k of the two-stage heads. The mask head runs on the final boxes.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.ops import boxes as box_ops

from taildet.errors import ConfigError
from taildet.models.two_stage_heads import TailRoIHeads

__all__ = ["CascadeRoIHeads"]


class CascadeRoIHeads(nn.Module):
    """The stages of a Cascade R-CNN (see the module doc).

    Args:
        stages: one :class:`TailRoIHeads` per stage (own matcher IoU, box coder, box head,
            predictor with a class-agnostic regressor, classification head); the last may hold the
            mask parts.
        stage_loss_weights: one weight per stage for its classification and box losses.

    ``last_stage_logits`` (inference) -- the raw logits ``[R, K]`` of every stage (before any
    transform), in stage order; each stage's ``last_logits`` holds its own too.
    """

    def __init__(self, stages: Sequence[TailRoIHeads], stage_loss_weights: Sequence[float]):
        super().__init__()
        if len(stages) < 1 or len(stage_loss_weights) != len(stages):
            raise ConfigError(f"a cascade needs one loss weight per stage: {len(stages)} stages, "
                              f"{len(stage_loss_weights)} weights")
        for t, st in enumerate(stages):
            if not st.class_agnostic_box_reg:
                raise ConfigError(f"cascade stage {t}: the box regression of a cascade stage is class-agnostic")
            if st.has_mask() and t != len(stages) - 1:
                raise ConfigError(f"cascade stage {t}: only the last stage has a mask head")
        self.stages = nn.ModuleList(stages)
        self.stage_loss_weights = tuple(float(w) for w in stage_loss_weights)
        self.num_classes = stages[-1].num_classes
        self.mfs: Any = None
        self.last_stage_logits: list[Tensor] | None = None

    @property
    def cls_head(self):
        """The last stage's classification head (its ``detections_per_img`` caps the output)."""
        return self.stages[-1].cls_head

    def has_mask(self) -> bool:
        return self.stages[-1].has_mask()

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.mfs is not None:
            raise ConfigError("memory-augmented feature sampling (MFS) is not supported on a cascade")
        if self.training:
            if targets is None:
                raise ValueError("CascadeRoIHeads: targets are required in training mode")
            return [], self._forward_train(features, proposals, image_shapes, targets)
        return self._forward_test(features, proposals, image_shapes), {}

    # -- training --------------------------------------------------------------------------------

    def _forward_train(self, features, proposals, image_shapes, targets) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        last = len(self.stages) - 1
        for t, (stage, w) in enumerate(zip(self.stages, self.stage_loss_weights)):
            stage_losses = stage._forward_train(features, proposals, image_shapes, targets)
            for k, v in stage_losses.items():
                if k == "loss_mask":
                    losses[k] = v
                else:
                    losses[f"s{t}.{k}"] = v * w
            if t < last:
                proposals = self._refine_sampled(stage, image_shapes, targets)
        return losses

    @staticmethod
    def _refine_sampled(stage: TailRoIHeads, image_shapes, targets) -> list[Tensor]:
        """The next stage's proposals: ``stage``'s sampled RoIs decoded with its deltas, clipped,
        detached, without the RoIs that were GT boxes."""
        rec = stage.last_sampled
        assert rec is not None
        props = rec["proposals"]
        counts = [len(p) for p in props]
        # in the proposals' dtype (under autocast the deltas, hence the decoded boxes, may be float16)
        boxes = stage.box_coder.decode(rec["box_deltas"][:, :4], props).reshape(-1, 4).detach().to(props[0].dtype)
        out = []
        for i, (b, p, lab, gi) in enumerate(zip(boxes.split(counts), props, rec["labels"].split(counts),
                                                rec["gt_index"].split(counts))):
            gt = targets[i]["boxes"]
            is_gt = torch.zeros(len(p), dtype=torch.bool, device=p.device)
            pos = lab < stage.num_classes
            if bool(pos.any()):
                is_gt[pos] = (p[pos] == gt[gi[pos]].to(p.dtype)).all(dim=1)
            out.append(box_ops.clip_boxes_to_image(b[~is_gt], image_shapes[i]))
        return out

    # -- inference -------------------------------------------------------------------------------

    def _forward_test(self, features, proposals, image_shapes) -> list[dict[str, Tensor]]:
        last = len(self.stages) - 1
        raw, transformed = [], []
        deltas = None
        for t, stage in enumerate(self.stages):
            if t > 0:
                proposals = self._refine(self.stages[t - 1], deltas, proposals, image_shapes)
            logits, deltas = stage.box_head_logits(stage.forward_box_features(features, proposals, image_shapes))
            stage.last_logits = logits.detach()
            stage.last_logit_image_index = torch.cat(
                [torch.full((len(p),), i, dtype=torch.int64, device=logits.device) for i, p in enumerate(proposals)]
            )
            raw.append(logits.detach())
            transformed.append(stage.cls_head.transform(logits))
        self.last_stage_logits = raw
        final = self.stages[last]
        scores = final.cls_head.loss.scores(average_stage_logits(transformed))
        boxes, scores, labels = final.postprocess_scores(scores, deltas, proposals, image_shapes)
        result = [{"boxes": b, "labels": lb, "scores": s} for b, s, lb in zip(boxes, scores, labels)]
        if final.has_mask():
            mask_logits = final.mask_predictor(final.mask_head(final.mask_roi_pool(features, boxes, image_shapes)))
            for mask_prob, r in zip(maskrcnn_inference(mask_logits, labels), result):
                r["masks"] = mask_prob
        return result

    @staticmethod
    def _refine(stage: TailRoIHeads, deltas: Tensor, proposals: list[Tensor], image_shapes) -> list[Tensor]:
        boxes = stage.box_coder.decode(deltas[:, :4], proposals).reshape(-1, 4).to(proposals[0].dtype)
        return [box_ops.clip_boxes_to_image(b, s)
                for b, s in zip(boxes.split([len(p) for p in proposals]), image_shapes)]


def average_stage_logits(logits: Sequence[Tensor]) -> Tensor:
    """The test-time logits of a cascade: the mean of the stages' (transformed) logits ``[R, K]``
    (in their promoted dtype: a stage with a float32 transform and one without under autocast)."""
    logits = list(logits)
    dtype = functools.reduce(torch.promote_types, (z.dtype for z in logits))
    return torch.stack([z.to(dtype) for z in logits]).mean(dim=0)
