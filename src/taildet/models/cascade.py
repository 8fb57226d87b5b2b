"""Cascade R-CNN / Cascade Mask R-CNN whose RoI classifiers follow a taildet loss.

Built from torchvision parts as :mod:`taildet.models.two_stage` (transform, RPN,
``MultiScaleRoIAlign``, a ``TwoMLPHead`` per stage, a ``BoxCoder`` and a ``Matcher`` per stage,
the mask head and mask loss), with :class:`~taildet.models.cascade_heads.CascadeRoIHeads` as the
RoI heads. The defaults are those of mmdetection's reference config
(``configs/_base_/models/cascade_rcnn_r50_fpn.py``, ``cascade-rcnn_r50_fpn.py`` in mmdetection 3):
three stages at IoU 0.5 / 0.6 / 0.7, box
targets normalised with stds (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067,
0.067) -- torchvision box-coder weights (10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15) --,
class-agnostic box regression (``reg_class_agnostic=True``) and stage loss weights
(``stage_loss_weights=[1, 0.5, 0.25]``); each stage samples 512 RoIs per image at a quarter
positives with the GT boxes added. One difference: the box loss is torchvision's smooth-L1 with
beta 1/9 (mmdetection's cascade heads use beta 1.0), as in taildet's Faster R-CNN.

Classification heads: every stage has its own classifier and its own
:class:`~taildet.models.heads.ClassificationHead` with its own loss instance (stateful losses --
EQLv2, EFL, Equilibrium, ... -- keep per-stage state), stage names ``"roi_heads.0"``,
``"roi_heads.1"``, ``"roi_heads.2"`` (the keys of the LogN statistics file: each stage keeps its
own statistics, spec section 1). They are ``model.cls_heads`` (a ``ModuleList``, state-dict keys
``cls_heads.{t}.*``); ``model.cls_head`` is the last stage's (its ``detections_per_img`` caps
the output) and ``model.classification_heads()`` gives ``{stage name: head}``
(:func:`taildet.calibration.heads.classification_heads` reads it). The test-time averaging rule
is in :mod:`taildet.models.cascade_heads`.

Not supported on a cascade (ConfigError): decoupled stage-2 fine-tunes -- LOCE's memory-augmented
feature sampling (MFS), the classifier re-initialisation (``model.reset_classifier``) and
``train.freeze`` with ``model.init_from`` (the freeze presets name the parameters of the
one-stage RoI head, ``roi_heads.box_head`` / ``roi_heads.box_predictor``). LogN works per stage
with either source: the statistics pass, or (``logit_bn: true``, one BatchNorm per stage) the
running statistics (:mod:`taildet.calibration.stages`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any

from torch import nn
from torchvision.models.detection.faster_rcnn import FasterRCNN, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNN

from taildet.errors import ConfigError
from taildet.losses import build_loss
from taildet.models.backbones import build_backbone
from taildet.models.cascade_heads import CascadeRoIHeads
from taildet.models.classifiers import build_classifier
from taildet.models.heads import ClassificationHead
from taildet.models.poolers import ParallelMultiScaleRoIAlign
from taildet.models.two_stage import (TailTransform, TwoStageOptions, _TailDetectorMixin, anchor_generator,
                                      logit_batchnorm, mask_head_parts, rpn_options)
from taildet.models.two_stage_heads import TailBoxPredictor, TailRoIHeads

__all__ = ["TailCascadeRCNN", "TailCascadeMaskRCNN", "CascadeOptions", "build_cascade_rcnn",
           "build_cascade_mask_rcnn", "CASCADE_IOU_THRESHOLDS", "CASCADE_BOX_WEIGHTS", "CASCADE_LOSS_WEIGHTS",
           "cascade_stage_name"]

#: mmdetection's cascade_rcnn_r50_fpn: the stages' IoU thresholds (positive = negative threshold).
CASCADE_IOU_THRESHOLDS = (0.5, 0.6, 0.7)
#: 1 / target_stds of the same config, as torchvision ``BoxCoder`` weights.
CASCADE_BOX_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
#: ``stage_loss_weights`` of the same config.
CASCADE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


def cascade_stage_name(t: int) -> str:
    """The LogN stage name (statistics-file key) of cascade stage ``t``: ``"roi_heads.{t}"``."""
    return f"roi_heads.{t}"


class _CascadeMixin(_TailDetectorMixin):
    """Per-stage classification heads ``cls_heads``; ``cls_head`` is the last one."""

    cls_heads: nn.ModuleList

    @property
    def cls_head(self) -> ClassificationHead:  # type: ignore[override]
        return self.cls_heads[-1]  # type: ignore[return-value]

    def classification_heads(self) -> dict[str, ClassificationHead]:
        """``{stage name: head}`` of every stage, in stage order."""
        return {h.stage: h for h in self.cls_heads}  # type: ignore[misc]


class TailCascadeRCNN(_CascadeMixin, FasterRCNN):
    """Cascade R-CNN on torchvision's ``FasterRCNN``; build with :func:`build_cascade_rcnn`."""


class TailCascadeMaskRCNN(_CascadeMixin, MaskRCNN):
    """Cascade Mask R-CNN on torchvision's ``MaskRCNN``; build with :func:`build_cascade_mask_rcnn`."""


@dataclass(frozen=True)
class CascadeOptions:
    """The cascade's own options (besides :class:`TwoStageOptions`, less ``class_agnostic_box_reg``:
    a cascade stage always regresses one box).

    Args:
        stage_iou_thresholds: per stage, the IoU at which a RoI is positive (below: background).
        stage_box_weights: per stage, the ``BoxCoder`` weights ``(wx, wy, ww, wh)``.
        stage_loss_weights: per stage, the weight of its classification and box losses.
    """

    stage_iou_thresholds: tuple[float, ...] = CASCADE_IOU_THRESHOLDS
    stage_box_weights: tuple[tuple[float, float, float, float], ...] = CASCADE_BOX_WEIGHTS
    stage_loss_weights: tuple[float, ...] = CASCADE_LOSS_WEIGHTS

    def checked(self) -> "CascadeOptions":
        """The options as tuples of floats; a ConfigError naming what is wrong otherwise."""
        try:
            ious = tuple(float(x) for x in self.stage_iou_thresholds)
            boxes = tuple(tuple(float(v) for v in w) for w in self.stage_box_weights)
            weights = tuple(float(x) for x in self.stage_loss_weights)
        except (TypeError, ValueError):
            raise ConfigError(f"cascade: stage_iou_thresholds and stage_loss_weights are lists of numbers, "
                              f"stage_box_weights a list of 4-number lists; got {self.stage_iou_thresholds!r}, "
                              f"{self.stage_loss_weights!r}, {self.stage_box_weights!r}") from None
        n = len(ious)
        if n < 1 or len(boxes) != n or len(weights) != n:
            raise ConfigError(f"cascade: stage_iou_thresholds, stage_box_weights and stage_loss_weights need one "
                              f"entry per stage, got {len(ious)}, {len(boxes)} and {len(weights)}")
        if any(not 0.0 < x < 1.0 for x in ious):
            raise ConfigError(f"cascade: stage_iou_thresholds must be in (0, 1), got {list(ious)}")
        if any(len(w) != 4 or min(w) <= 0 for w in boxes):
            raise ConfigError(f"cascade: each stage_box_weights entry is 4 positive numbers, got {list(boxes)}")
        if any(w < 0 for w in weights):
            raise ConfigError(f"cascade: stage_loss_weights must be >= 0, got {list(weights)}")
        return CascadeOptions(ious, boxes, weights)  # type: ignore[arg-type]


_CASCADE_NAMES = frozenset(f.name for f in fields(CascadeOptions))
_TWO_STAGE_NAMES = frozenset(f.name for f in fields(TwoStageOptions)) - {"class_agnostic_box_reg"}


def _split_options(builder: str, options: dict[str, Any], with_masks: bool) -> tuple[TwoStageOptions, CascadeOptions]:
    for k in options:
        if k not in _CASCADE_NAMES and (k not in _TWO_STAGE_NAMES or (k == "mask_layers" and not with_masks)):
            raise TypeError(f"{builder}() got an unexpected keyword argument {k!r}")
    two = TwoStageOptions(**{k: v for k, v in options.items() if k in _TWO_STAGE_NAMES}, class_agnostic_box_reg=True)
    casc = CascadeOptions(**{k: v for k, v in options.items() if k in _CASCADE_NAMES}).checked()
    return two, casc


def _build_cascade(with_masks: bool, num_classes: int, o: TwoStageOptions, c: CascadeOptions) -> FasterRCNN:
    if int(num_classes) <= 0:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    net = build_backbone(
        o.backbone, norm=o.norm, weights=o.backbone_weights, trainable_layers=o.trainable_backbone_layers, fpn=o.fpn
    )
    anchor_gen = anchor_generator(o, net)
    box_roi_pool = ParallelMultiScaleRoIAlign(featmap_names=list(net.featmap_names), output_size=7, sampling_ratio=2)
    mask_parts = mask_head_parts(o, net, num_classes) if with_masks else {}
    heads, stages = [], []
    last = len(c.stage_iou_thresholds) - 1
    for t, (iou, weights) in enumerate(zip(c.stage_iou_thresholds, c.stage_box_weights)):
        loss = build_loss(o.loss, num_classes, **(o.loss_kwargs or {}))  # one instance per stage
        if loss.kind != "two_stage":
            raise ConfigError(f"loss {o.loss!r} is for one-stage detectors; Cascade R-CNN needs a two-stage loss")
        cls_layer = build_classifier(o.classifier, o.representation_size, loss.num_outputs())
        loss.init_bias(cls_layer.bias)
        bn = logit_batchnorm(o, loss.num_outputs())
        predictor = TailBoxPredictor(o.representation_size, cls_layer, num_classes, class_agnostic=True, logit_bn=bn)
        head = ClassificationHead(loss, stage=cascade_stage_name(t), detections_per_img=o.box_detections_per_img,
                                  record_features=True)
        head.set_logit_bn(bn)
        heads.append(head)
        stages.append(TailRoIHeads(
            box_roi_pool,
            TwoMLPHead(net.out_channels * 7 * 7, o.representation_size),
            predictor,
            head,
            fg_iou_thresh=iou,
            bg_iou_thresh=iou,
            batch_size_per_image=o.box_batch_size_per_image,
            positive_fraction=o.box_positive_fraction,
            bbox_reg_weights=weights,
            score_thresh=o.box_score_thresh,
            nms_thresh=o.box_nms_thresh,
            class_agnostic_box_reg=True,
            **(mask_parts if t == last else {}),
        ))
    common: dict[str, Any] = dict(**rpn_options(o, anchor_gen), box_roi_pool=box_roi_pool,
                                  box_head=stages[0].box_head, box_predictor=stages[0].box_predictor)
    if with_masks:
        model: FasterRCNN = TailCascadeMaskRCNN(net, **common, **mask_parts)
    else:
        model = TailCascadeRCNN(net, **common)
    model.cls_heads = nn.ModuleList(heads)
    model.roi_heads = CascadeRoIHeads(stages, c.stage_loss_weights)
    model.transform = TailTransform(
        o.min_size, o.max_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], keep_size=o.fixed_size
    )
    return model


def build_cascade_rcnn(num_classes: int, **options: Any) -> TailCascadeRCNN:
    """Cascade R-CNN for ``num_classes`` foreground classes with a pluggable classification loss.

    ``options``: the keyword arguments of :class:`TwoStageOptions` (all but ``mask_layers`` and
    ``class_agnostic_box_reg``) and of :class:`CascadeOptions`.
    """
    o, c = _split_options("build_cascade_rcnn", options, with_masks=False)
    return _build_cascade(False, num_classes, o, c)  # type: ignore[return-value]


def build_cascade_mask_rcnn(num_classes: int, **options: Any) -> TailCascadeMaskRCNN:
    """Cascade Mask R-CNN: :func:`build_cascade_rcnn` plus torchvision's mask head (``C`` mask
    channels) on the last stage; ``mask_layers`` sets its widths."""
    o, c = _split_options("build_cascade_mask_rcnn", options, with_masks=True)
    return _build_cascade(True, num_classes, o, c)  # type: ignore[return-value]


def _signature(with_masks: bool, returns: str) -> inspect.Signature:
    params = [inspect.Parameter("num_classes", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="int")]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in fields(TwoStageOptions)
               if f.name in _TWO_STAGE_NAMES and (with_masks or f.name != "mask_layers")]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in fields(CascadeOptions)]
    return inspect.Signature(params, return_annotation=returns)


build_cascade_rcnn.__signature__ = _signature(False, "TailCascadeRCNN")  # type: ignore[attr-defined]
build_cascade_mask_rcnn.__signature__ = _signature(True, "TailCascadeMaskRCNN")  # type: ignore[attr-defined]
# read by taildet.models.build.architecture_info: RoI heads with 3 classification stages; masks
build_cascade_rcnn.cls_stage = build_cascade_mask_rcnn.cls_stage = "roi_heads"  # type: ignore[attr-defined]
build_cascade_rcnn.cls_stages = build_cascade_mask_rcnn.cls_stages = len(CASCADE_IOU_THRESHOLDS)  # type: ignore[attr-defined]
build_cascade_mask_rcnn.with_masks = True  # type: ignore[attr-defined]
