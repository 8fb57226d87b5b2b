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

import inspect
import os
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from taildet.errors import ConfigError, DataError
from taildet.losses import build_loss
from taildet.models.backbones import build_backbone
from taildet.models.classifiers import LogitBatchNorm, build_classifier
from taildet.models.heads import ClassificationHead, register_legacy_key_hook
from taildet.models.poolers import ParallelMultiScaleRoIAlign
from taildet.models.two_stage_heads import TailBoxPredictor, TailRoIHeads

__all__ = [
    "TailBoxPredictor",
    "TailRoIHeads",
    "TailTransform",
    "TailFasterRCNN",
    "TailMaskRCNN",
    "TwoStageOptions",
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
    # one host read for the whole batch (a synchronisation on GPU): per image the label range and
    # whether it has a crowd box
    summary = []
    for t in targets:
        labels, crowd = t["labels"], t.get("iscrowd")
        lo_hi = torch.stack(torch.aminmax(labels)) if labels.numel() else labels.new_tensor([0, 0])
        has_crowd = (crowd != 0).any().to(lo_hi.dtype).view(1) if crowd is not None and crowd.numel() \
            else lo_hi.new_zeros(1)
        summary.append(torch.cat([lo_hi, has_crowd]))
    values = torch.stack(summary).tolist() if summary else []
    out = []
    for i, (t, (lo, hi, has_crowd)) in enumerate(zip(targets, values)):
        if lo < 0 or hi >= num_classes:
            raise DataError(
                "model targets",
                f"targets[{i}]['labels']",
                f"labels must be foreground classes 0..{num_classes - 1} (background is implicit), "
                f"got values in [{lo}, {hi}]",
            )
        t = dict(t)
        crowd = t.get("iscrowd")
        if has_crowd:
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


# --------------------------------------------------------------------------------------------
# Builders


@dataclass(frozen=True)
class TwoStageOptions:
    """Every option of :func:`build_faster_rcnn` / :func:`build_mask_rcnn` (their keyword arguments,
    validated once here: an unknown name is a ``TypeError`` as for any function).

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
        mask_layers: Mask R-CNN only: widths of the mask head's 3x3 convs (default ``(256,) * 4``
            for 256-channel backbones as torchvision, ``(64, 64)`` for the tiny network).
    """

    backbone: str = "tiny"
    backbone_weights: str | os.PathLike | None = None
    norm: str = "bn"
    loss: str = "softmax_ce"
    loss_kwargs: dict[str, Any] | None = None
    classifier: str = "linear"
    logit_bn: bool = False
    logit_bn_momentum: float | None = None
    min_size: int = 800
    max_size: int = 1333
    fixed_size: bool = False
    anchor_sizes: tuple[tuple[int, ...], ...] | None = None
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_score_thresh: float = 1e-4
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 300
    representation_size: int = 1024
    class_agnostic_box_reg: bool = False
    trainable_backbone_layers: int = 5
    fpn: bool | None = None
    mask_layers: tuple[int, ...] | None = None

    @classmethod
    def of(cls, builder: str, options: dict[str, Any], with_masks: bool) -> TwoStageOptions:
        """The options of one builder call (``builder`` names it in the error of an unknown keyword)."""
        for k in options:
            if k not in _OPTION_NAMES or (k == "mask_layers" and not with_masks):
                raise TypeError(f"{builder}() got an unexpected keyword argument {k!r}")
        return cls(**options)


_OPTION_NAMES = frozenset(f.name for f in fields(TwoStageOptions))


def _builder_signature(with_masks: bool, returns: str) -> inspect.Signature:
    """``(num_classes, *, <every option>)``: what ``inspect.signature`` shows for a builder (the
    config checks and :data:`taildet.models.ARCHITECTURES` read the option names from it)."""
    params = [inspect.Parameter("num_classes", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="int")]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in fields(TwoStageOptions) if with_masks or f.name != "mask_layers"]
    return inspect.Signature(params, return_annotation=returns)


def anchor_generator(o: TwoStageOptions, net: Any) -> AnchorGenerator:
    """The RPN's anchors for backbone ``net`` (``o.anchor_sizes`` / ``o.aspect_ratios``, checked
    against its feature maps)."""
    num_maps = len(net.strides)
    anchor_sizes = o.anchor_sizes
    if anchor_sizes is None:
        anchor_sizes = default_anchor_sizes(o.backbone, num_maps)
    anchor_sizes = tuple(tuple(int(s) for s in level) for level in anchor_sizes)
    if len(anchor_sizes) != num_maps:
        raise ConfigError(
            f"anchor_sizes has {len(anchor_sizes)} levels but backbone {o.backbone!r} gives {num_maps} feature maps"
        )
    ratios = tuple(o.aspect_ratios)
    if ratios and isinstance(ratios[0], (tuple, list)):
        per_level = tuple(tuple(float(r) for r in lv) for lv in ratios)
        if len(per_level) != num_maps:
            raise ConfigError(f"aspect_ratios has {len(per_level)} levels, expected {num_maps}")
    else:
        per_level = (tuple(float(r) for r in ratios),) * num_maps
    anchor_gen = AnchorGenerator(anchor_sizes, per_level)
    if len(set(anchor_gen.num_anchors_per_location())) != 1:
        raise ConfigError("every feature map needs the same number of anchors (sizes x ratios) for the RPN head")
    return anchor_gen


def logit_batchnorm(o: TwoStageOptions, num_outputs: int) -> LogitBatchNorm | None:
    """The BatchNorm on the class logits (``o.logit_bn``), or None."""
    if not isinstance(o.logit_bn, bool):
        raise ConfigError(f"logit_bn must be true or false, got {o.logit_bn!r}")
    if o.logit_bn:
        return LogitBatchNorm(num_outputs, momentum=1e-4 if o.logit_bn_momentum is None else o.logit_bn_momentum)
    if o.logit_bn_momentum is not None:
        raise ConfigError("logit_bn_momentum is set but logit_bn is false (it is the momentum of the logits' BatchNorm)")
    return None


def mask_head_parts(o: TwoStageOptions, net: Any, num_classes: int) -> dict[str, Any]:
    """Mask R-CNN's mask RoIAlign (14 x 14), head (``o.mask_layers``) and predictor (``C`` channels)."""
    mask_layers = o.mask_layers
    if mask_layers is None:
        mask_layers = (256, 256, 256, 256) if net.out_channels >= 256 else (64, 64)
    return dict(
        mask_roi_pool=ParallelMultiScaleRoIAlign(featmap_names=list(net.featmap_names), output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(net.out_channels, tuple(mask_layers), 1),
        mask_predictor=MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], num_classes),  # C channels
    )


def rpn_options(o: TwoStageOptions, anchor_gen: AnchorGenerator) -> dict[str, Any]:
    """The keyword arguments of torchvision's ``FasterRCNN`` for the transform sizes and the RPN."""
    return dict(
        num_classes=None,
        min_size=o.min_size,
        max_size=o.max_size,
        rpn_anchor_generator=anchor_gen,
        rpn_pre_nms_top_n_train=o.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=o.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=o.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=o.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=o.rpn_batch_size_per_image,
        rpn_positive_fraction=o.rpn_positive_fraction,
    )


def _build_two_stage(with_masks: bool, num_classes: int, o: TwoStageOptions) -> FasterRCNN:
    if int(num_classes) <= 0:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    net = build_backbone(
        o.backbone, norm=o.norm, weights=o.backbone_weights, trainable_layers=o.trainable_backbone_layers, fpn=o.fpn
    )
    cls_loss = build_loss(o.loss, num_classes, **(o.loss_kwargs or {}))
    if cls_loss.kind != "two_stage":
        raise ConfigError(f"loss {o.loss!r} is for one-stage detectors; Faster/Mask R-CNN need a two-stage loss")

    anchor_gen = anchor_generator(o, net)

    box_roi_pool = ParallelMultiScaleRoIAlign(featmap_names=list(net.featmap_names), output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(net.out_channels * 7 * 7, o.representation_size)
    cls_layer = build_classifier(o.classifier, o.representation_size, cls_loss.num_outputs())
    cls_loss.init_bias(cls_layer.bias)
    bn = logit_batchnorm(o, cls_loss.num_outputs())
    box_predictor = TailBoxPredictor(o.representation_size, cls_layer, num_classes, o.class_agnostic_box_reg,
                                     logit_bn=bn)

    common: dict[str, Any] = dict(
        **rpn_options(o, anchor_gen),
        box_roi_pool=box_roi_pool,
        box_head=box_head,
        box_predictor=box_predictor,
    )
    mask_parts: dict[str, Any] = {}
    if with_masks:
        mask_parts = mask_head_parts(o, net, num_classes)
        model: FasterRCNN = TailMaskRCNN(net, **common, **mask_parts)
    else:
        model = TailFasterRCNN(net, **common)

    model.cls_head = ClassificationHead(cls_loss, stage="roi_heads", detections_per_img=o.box_detections_per_img,
                                        record_features=True)
    model.cls_head.set_logit_bn(bn)
    model.roi_heads = TailRoIHeads(
        box_roi_pool,
        box_head,
        box_predictor,
        model.cls_head,
        batch_size_per_image=o.box_batch_size_per_image,
        positive_fraction=o.box_positive_fraction,
        score_thresh=o.box_score_thresh,
        nms_thresh=o.box_nms_thresh,
        class_agnostic_box_reg=o.class_agnostic_box_reg,
        **mask_parts,
    )
    model.transform = TailTransform(
        o.min_size, o.max_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], keep_size=o.fixed_size
    )
    return model


def build_faster_rcnn(num_classes: int, **options: Any) -> TailFasterRCNN:
    """Faster R-CNN for ``num_classes`` foreground classes with a pluggable classification loss.

    ``options``: the keyword arguments of :class:`TwoStageOptions` (all but ``mask_layers``), e.g.
    ``build_faster_rcnn(8, backbone="tiny", loss="eql", loss_kwargs={...})``.
    """
    o = TwoStageOptions.of("build_faster_rcnn", options, with_masks=False)
    return _build_two_stage(False, num_classes, o)  # type: ignore[return-value]


def build_mask_rcnn(num_classes: int, **options: Any) -> TailMaskRCNN:
    """Mask R-CNN: :func:`build_faster_rcnn` plus torchvision's mask head with ``C`` mask channels.

    ``options``: the keyword arguments of :class:`TwoStageOptions`; ``mask_layers`` sets the mask
    head's widths. Output masks are ``[N, 1, H, W]`` probabilities.
    """
    o = TwoStageOptions.of("build_mask_rcnn", options, with_masks=True)
    return _build_two_stage(True, num_classes, o)  # type: ignore[return-value]


build_faster_rcnn.__signature__ = _builder_signature(False, "TailFasterRCNN")  # type: ignore[attr-defined]
build_mask_rcnn.__signature__ = _builder_signature(True, "TailMaskRCNN")  # type: ignore[attr-defined]
# What they build (read by taildet.models.build.architecture_info): RoI heads, and masks for Mask R-CNN.
build_faster_rcnn.cls_stage = build_mask_rcnn.cls_stage = "roi_heads"  # type: ignore[attr-defined]
build_mask_rcnn.with_masks = True  # type: ignore[attr-defined]
