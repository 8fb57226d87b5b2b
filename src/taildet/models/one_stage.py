"""One-stage detectors (torchvision RetinaNet and FCOS) with a pluggable classification loss.

Builders: :func:`build_retinanet`, :func:`build_fcos`. Both return a torchvision model subclass
(:class:`TailRetinaNet`, :class:`TailFCOS`) whose classification branch is trained by a one-stage
loss from :mod:`taildet.losses` (``kind == "one_stage"``) and scored at test time by that loss's
``scores``. Everything else (anchor generation, matching, box coding, box/centerness losses, NMS,
resizing) is torchvision's own code.

What the models add to torchvision
----------------------------------
* ``model.cls_head`` -- the :class:`~taildet.models.heads.ClassificationHead`: the loss
  (``cls_head.loss``, in ``model.state_dict()`` under ``"cls_head.loss.*"``; the dense heads keep
  an unregistered reference to the same head, so there are no duplicate keys), the optional
  ``cls_head.logit_transform`` applied at inference to the raw logits ``[N, K]`` before
  ``loss.scores`` (for LogN / logit adjustment; registered, assignable after building), and the
  per-image cap ``cls_head.detections_per_img``. State dicts saved before the head (``cls_loss.*``,
  ``logit_transform.*``) load through a key remap.
* Label vector passed to the loss (training): one entry per anchor, image-major, then torchvision's
  anchor order inside an image (level, then location row-major, then anchor):
  ``0..C-1`` = positive anchor (its matched GT class), ``C`` = negative anchor, ``-1`` = ignored
  (RetinaNet: IoU between the background and foreground thresholds, torchvision's
  ``Matcher.BETWEEN_THRESHOLDS``; FCOS has no ignored anchors). The loss is called once per batch
  with ``normalizer`` = total number of positive anchors in the batch, averaged over DDP ranks
  (the same on every rank, as the EFL paper's reference does), clamped to at least 1. Note: torchvision's stock RetinaNet instead normalises each image by its
  own positives and averages over images; the two agree for one image per batch.
* ``model.cls_head.record`` (training) -- a :class:`~taildet.models.heads.SampledLogits` with
  ``logits [B*A, K]`` (detached) and ``labels [B*A]`` as passed to the loss in the last forward.
  ``model.last_logits`` (inference) -- a list with one ``[D_i, K]`` tensor per image: the raw
  logits (before ``logit_transform``) of the anchor behind each returned detection, row-aligned
  with ``detections[i]["boxes"]``. Both are cleared at the start of each forward; set
  ``model.cls_head.record_logits = False`` to skip recording.
* Crowd boxes (``target["iscrowd"] != 0``) are dropped before matching.
* A loss with ``uses_quality`` true (EQFL) also gets ``quality=[B*A]``: the IoU of each
  positive anchor's detached decoded box with its matched GT box, 0 elsewhere
  (:func:`anchor_quality`). Other losses are called without ``quality``.

Anchors (``anchor_sizes=None``): the feature strides are measured by one dummy forward of the
backbone. RetinaNet: one map of stride ``s`` gets sizes ``(2s, 3s, 4s, 6s)`` (stride 8 -> 16-48 px,
for the 14-40 px objects of the 96 px demo images); several maps get torchvision's rule per level,
``4s * (1, 2^(1/3), 2^(2/3))`` (identical to torchvision's defaults for strides 8-128). FCOS: one
point per location of size ``s`` per level (torchvision's defaults for strides 8-128).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import (
    RetinaNet,
)
from torchvision.ops import boxes as box_ops

from taildet.errors import ConfigError
from taildet.losses import build_loss
from taildet.losses.base import ClassificationLoss
from taildet.models.backbones import build_backbone
from taildet.models.heads import ClassificationHead, register_legacy_key_hook
from taildet.models.one_stage_heads import (TailFCOSHead, TailRetinaNetClassificationHead, TailRetinaNetHead, _head_norm,
                                            _new_cls_head, anchor_labels, anchor_quality)

__all__ = [
    "build_retinanet",
    "build_fcos",
    "TailRetinaNet",
    "TailFCOS",
    "TailRetinaNetHead",
    "TailRetinaNetClassificationHead",
    "TailFCOSHead",
    "anchor_labels",
    "anchor_quality",
    "feature_strides",
    "default_anchor_sizes",
]


# ----------------------------------------------------------------------------------------------
# helpers


def _drop_crowd(targets: list[dict[str, Tensor]] | None) -> list[dict[str, Tensor]] | None:
    if targets is None:
        return None
    out = []
    for t in targets:
        crowd = t.get("iscrowd")
        if crowd is not None and crowd.numel() > 0:
            keep = crowd == 0
            t = dict(t)
            for key in ("boxes", "labels", "iscrowd", "area"):
                if key in t and t[key].shape[:1] == keep.shape:
                    t[key] = t[key][keep]
        out.append(t)
    return out


def feature_strides(backbone: nn.Module, probe_size: int = 256) -> list[int]:
    """Strides of the backbone's output maps, measured with one dummy forward (eval mode, no grad).

    The training/eval flags of every submodule are restored afterwards.
    """
    param = next(iter(backbone.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, 3, probe_size, probe_size, device=device, dtype=dtype))
    finally:
        for m, mode in modes.items():
            m.training = mode
    if isinstance(out, Tensor):
        out = OrderedDict([("0", out)])
    if not isinstance(out, dict) or len(out) == 0:
        raise ConfigError(f"backbone {type(backbone).__name__} must return a Tensor or a non-empty OrderedDict")
    return [max(1, int(round(probe_size / f.shape[-2]))) for f in out.values()]


def default_anchor_sizes(strides: Sequence[int], detector: str) -> tuple[tuple[int, ...], ...]:
    """Anchor sizes per level for ``detector`` in ``{"retinanet", "fcos"}`` (see module docstring)."""
    if detector == "fcos":
        return tuple((int(s),) for s in strides)
    if len(strides) == 1:
        s = int(strides[0])
        return ((2 * s, 3 * s, 4 * s, 6 * s),)
    return tuple((4 * s, int(4 * s * 2 ** (1.0 / 3)), int(4 * s * 2 ** (2.0 / 3))) for s in strides)


def _anchor_generator(
    backbone: nn.Module,
    anchor_sizes: Sequence[Sequence[int]] | None,
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]],
    detector: str,
) -> AnchorGenerator:
    strides = feature_strides(backbone)
    levels = len(strides)
    if anchor_sizes is None:
        anchor_sizes = default_anchor_sizes(strides, detector)
    anchor_sizes = tuple(tuple(int(s) for s in level) for level in anchor_sizes)
    if len(anchor_sizes) != levels:
        raise ConfigError(
            f"anchor_sizes has {len(anchor_sizes)} levels but the backbone returns {levels} feature maps"
        )
    if len(aspect_ratios) > 0 and isinstance(aspect_ratios[0], (tuple, list)):
        ratios = tuple(tuple(float(r) for r in level) for level in aspect_ratios)  # type: ignore[union-attr]
        if len(ratios) != levels:
            raise ConfigError(f"aspect_ratios has {len(ratios)} levels but the backbone returns {levels} maps")
    else:
        ratios = (tuple(float(r) for r in aspect_ratios),) * levels  # type: ignore[arg-type]
    counts = {len(s) * len(r) for s, r in zip(anchor_sizes, ratios)}
    if len(counts) != 1:
        raise ConfigError("every level must have the same number of anchors per location (sizes x ratios)")
    return AnchorGenerator(anchor_sizes, ratios)


def _resolve_loss(loss: str | ClassificationLoss, num_classes: int, loss_kwargs: dict | None) -> ClassificationLoss:
    if isinstance(loss, str):
        loss = build_loss(loss, num_classes, **(loss_kwargs or {}))
    elif isinstance(loss, ClassificationLoss):
        if loss_kwargs:
            raise ConfigError("loss_kwargs must be empty when loss is already a loss object")
    else:
        raise ConfigError(f"loss must be a loss name or a ClassificationLoss, got {type(loss).__name__}")
    if loss.kind != "one_stage":
        raise ConfigError(
            f"loss {type(loss).__name__} is a {loss.kind!r} loss; one-stage detectors need "
            "kind 'one_stage' (labels 0..C-1 positive, C negative, -1 ignored)"
        )
    if loss.num_classes != int(num_classes):
        raise ConfigError(f"loss has {loss.num_classes} classes but the detector was asked for {num_classes}")
    return loss


def _resolve_backbone(
    backbone: str | nn.Module, backbone_weights: Any, norm: str, backbone_kwargs: dict | None,
    trainable_backbone_layers: int | None = None,
) -> nn.Module:
    if isinstance(backbone, str):
        kwargs = dict(backbone_kwargs or {})
        if trainable_backbone_layers is not None:
            if "trainable_layers" in kwargs:
                raise ConfigError("set trainable_backbone_layers or backbone_kwargs.trainable_layers, not both")
            kwargs["trainable_layers"] = trainable_backbone_layers
        return build_backbone(backbone, norm=norm, weights=backbone_weights, **kwargs)
    if isinstance(backbone, nn.Module):
        if backbone_weights is not None or backbone_kwargs or trainable_backbone_layers is not None:
            raise ConfigError("backbone_weights/backbone_kwargs/trainable_backbone_layers apply only when "
                              "backbone is given by name")
        if not isinstance(getattr(backbone, "out_channels", None), int):
            raise ConfigError(f"backbone {type(backbone).__name__} needs an integer attribute out_channels")
        return backbone
    raise ConfigError(f"backbone must be a name or an nn.Module, got {type(backbone).__name__}")


# ----------------------------------------------------------------------------------------------
# detectors


class _TailOneStage:
    """Shared parts of :class:`TailRetinaNet`, :class:`TailFCOS` and :class:`TailATSS` (a mixin).

    ``cls_head`` is the :class:`ClassificationHead` (registered here, referenced by the dense
    head); ``last_logits`` the inference record (see the module docstring).
    """

    head: nn.Module
    cls_head: ClassificationHead
    last_logits: list[Tensor] | None
    score_thresh: float
    topk_candidates: int
    nms_thresh: float

    def _setup_tail(self, cls_head: ClassificationHead) -> None:
        self.cls_head = cls_head
        del self.detections_per_img  # one cap: cls_head.detections_per_img
        self.last_logits = None
        register_legacy_key_hook(self)  # type: ignore[arg-type]

    def _clear_records(self) -> None:
        self.last_logits = None
        self.cls_head.clear()

    def forward(self, images, targets=None):
        """The detector's own forward, after clearing the records of the previous one."""
        self._clear_records()
        return super().forward(images, targets)  # type: ignore[misc]

    def _postprocess(self, head_outputs, anchors, image_shapes, decode, extra_score=None):
        """torchvision's per-level top-k + batched NMS, with pluggable scores and logit tracking."""
        class_logits = head_outputs["cls_logits"]
        box_regression = head_outputs["bbox_regression"]
        detections: list[dict[str, Tensor]] = []
        kept_logits: list[Tensor] = []
        for index in range(len(image_shapes)):
            image_shape = image_shapes[index]
            boxes_all, scores_all, labels_all, rows_all = [], [], [], []
            for level, (br, lg, an) in enumerate(zip(box_regression, class_logits, anchors[index])):
                br, lg = br[index], lg[index]
                scores = self.cls_head.scores(lg)
                if extra_score is not None:
                    scores = extra_score(scores, head_outputs, level, index)
                num_classes = scores.shape[-1]
                scores = scores.flatten()
                keep_idxs = scores > self.score_thresh
                scores = scores[keep_idxs]
                topk_idxs = torch.where(keep_idxs)[0]
                num_topk = det_utils._topk_min(topk_idxs, self.topk_candidates, 0)
                scores, idxs = scores.topk(num_topk)
                topk_idxs = topk_idxs[idxs]
                anchor_idxs = torch.div(topk_idxs, num_classes, rounding_mode="floor")
                boxes = decode(br[anchor_idxs], an[anchor_idxs])
                boxes_all.append(box_ops.clip_boxes_to_image(boxes, image_shape))
                scores_all.append(scores)
                labels_all.append(topk_idxs % num_classes)
                rows_all.append(lg[anchor_idxs])
            boxes = torch.cat(boxes_all)
            scores = torch.cat(scores_all)
            labels = torch.cat(labels_all)
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.cls_head.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
            kept_logits.append(torch.cat(rows_all)[keep].detach())
        if self.cls_head.record_logits:
            self.last_logits = kept_logits
        return detections


class TailRetinaNet(_TailOneStage, RetinaNet):
    """torchvision ``RetinaNet`` trained and scored through a pluggable one-stage loss.

    Args:
        backbone: module with ``out_channels`` returning a Tensor or OrderedDict of maps.
        cls_loss: a one-stage :class:`~taildet.losses.base.ClassificationLoss`; it becomes
            ``self.cls_head.loss``.
        anchor_generator: torchvision ``AnchorGenerator``.
        logit_transform: optional module applied to raw logits at inference
            (``self.cls_head.logit_transform``).
        head_norm_layer: norm layer factory for the head towers (None = torchvision's v1 head).
        **kwargs: passed to ``RetinaNet`` (min_size, max_size, score_thresh, ...).
    """

    def __init__(
        self,
        backbone: nn.Module,
        cls_loss: ClassificationLoss,
        *,
        anchor_generator: AnchorGenerator,
        logit_transform: nn.Module | None = None,
        head_norm_layer: Callable[..., nn.Module] | None = None,
        **kwargs: Any,
    ):
        cls_head = _new_cls_head(cls_loss, logit_transform, kwargs)
        head = TailRetinaNetHead(
            backbone.out_channels, anchor_generator.num_anchors_per_location()[0], cls_head, head_norm_layer
        )
        super().__init__(backbone, cls_loss.num_classes, anchor_generator=anchor_generator, head=head, **kwargs)
        self._setup_tail(cls_head)

    def compute_loss(self, targets, head_outputs, anchors):  # type: ignore[override]
        return super().compute_loss(_drop_crowd(targets), head_outputs, anchors)

    def postprocess_detections(self, head_outputs, anchors, image_shapes):  # type: ignore[override]
        return self._postprocess(head_outputs, anchors, image_shapes, self.box_coder.decode_single)


class TailFCOS(_TailOneStage, FCOS):
    """torchvision ``FCOS`` whose classification is trained and scored through a pluggable loss.

    Test score: ``sqrt(cls_head.scores(cls_logits) * sigmoid(centerness))`` as torchvision
    (with the loss's scores after the logit transform in place of the sigmoid). Box and centerness losses are unchanged.
    Args as :class:`TailRetinaNet` plus ``num_convs`` (tower depth); ``head_norm_layer=None`` means
    no normalisation in the towers.
    """

    def __init__(
        self,
        backbone: nn.Module,
        cls_loss: ClassificationLoss,
        *,
        anchor_generator: AnchorGenerator,
        logit_transform: nn.Module | None = None,
        head_norm_layer: Callable[[int], nn.Module] | None = None,
        num_convs: int = 4,
        **kwargs: Any,
    ):
        cls_head = _new_cls_head(cls_loss, logit_transform, kwargs)
        head = TailFCOSHead(
            backbone.out_channels,
            anchor_generator.num_anchors_per_location()[0],
            cls_head,
            num_convs=num_convs,
            norm_layer=head_norm_layer,
        )
        super().__init__(backbone, cls_loss.num_classes, anchor_generator=anchor_generator, head=head, **kwargs)
        self._setup_tail(cls_head)

    def compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level):  # type: ignore[override]
        return super().compute_loss(_drop_crowd(targets), head_outputs, anchors, num_anchors_per_level)

    def postprocess_detections(self, head_outputs, anchors, image_shapes):  # type: ignore[override]
        def with_centerness(scores: Tensor, outputs: dict, level: int, index: int) -> Tensor:
            return torch.sqrt(scores * torch.sigmoid(outputs["bbox_ctrness"][level][index]))

        return self._postprocess(head_outputs, anchors, image_shapes, self.box_coder.decode, with_centerness)


# ----------------------------------------------------------------------------------------------
# builders


_Detector = TypeVar("_Detector", bound=nn.Module)


def _one_stage_detector(
    detector_cls: Callable[..., _Detector],
    net: nn.Module,
    cls_loss: ClassificationLoss,
    generator: AnchorGenerator,
    *,
    head_norm: str | None,
    image_mean: Sequence[float] | None,
    image_std: Sequence[float] | None,
    **kwargs: Any,
) -> _Detector:
    """``detector_cls(net, cls_loss, ...)`` as every one-stage builder makes it: the head norm layer
    from ``head_norm``, ``image_mean``/``image_std`` as lists, ``kwargs`` passed on unchanged."""
    return detector_cls(
        net,
        cls_loss,
        anchor_generator=generator,
        head_norm_layer=_head_norm(head_norm, net.out_channels),
        image_mean=list(image_mean) if image_mean is not None else None,
        image_std=list(image_std) if image_std is not None else None,
        **kwargs,
    )


def build_retinanet(
    num_classes: int,
    *,
    backbone: str | nn.Module = "tiny",
    backbone_weights: Any = None,
    backbone_kwargs: dict | None = None,
    trainable_backbone_layers: int | None = None,
    norm: str = "bn",
    loss: str | ClassificationLoss = "sigmoid_focal",
    loss_kwargs: dict | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    anchor_sizes: Sequence[Sequence[int]] | None = None,
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = (0.5, 1.0, 2.0),
    head_norm: str | None = None,
    score_thresh: float = 1e-4,
    nms_thresh: float = 0.5,
    detections_per_img: int = 300,
    topk_candidates: int = 1000,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.4,
    logit_transform: nn.Module | None = None,
) -> TailRetinaNet:
    """Build a :class:`TailRetinaNet` for ``num_classes`` foreground classes.

    Args:
        backbone: a name for :func:`taildet.models.backbones.build_backbone` (with ``norm``,
            ``backbone_weights`` and ``backbone_kwargs``) or a module with ``out_channels``.
        trainable_backbone_layers: stages of a named backbone that train, counted from the last
            (as the two-stage builders' key; ``backbone_kwargs.trainable_layers`` says the same).
        loss: a loss name for :func:`taildet.losses.build_loss` (with ``loss_kwargs``) or a
            one-stage loss object.
        min_size, max_size: torchvision's resize; ``min_size = max_size = S`` leaves ``S x S``
            images unresized.
        anchor_sizes: per-level sizes; None derives them from the measured feature strides.
        aspect_ratios: one tuple for all levels, or one tuple per level.
        head_norm: None / ``"none"`` (torchvision's v1 head), ``"gn"`` or ``"bn"`` in the towers.
        logit_transform: optional inference-time module on raw logits.
        Others: as torchvision's ``RetinaNet``.
    """
    cls_loss = _resolve_loss(loss, num_classes, loss_kwargs)
    net = _resolve_backbone(backbone, backbone_weights, norm, backbone_kwargs, trainable_backbone_layers)
    generator = _anchor_generator(net, anchor_sizes, aspect_ratios, "retinanet")
    if not 0.0 <= bg_iou_thresh <= fg_iou_thresh <= 1.0:
        raise ConfigError(f"need 0 <= bg_iou_thresh <= fg_iou_thresh <= 1, got {bg_iou_thresh}, {fg_iou_thresh}")
    return _one_stage_detector(
        TailRetinaNet, net, cls_loss, generator, head_norm=head_norm, image_mean=image_mean, image_std=image_std,
        logit_transform=logit_transform, min_size=min_size, max_size=max_size, score_thresh=score_thresh,
        nms_thresh=nms_thresh, detections_per_img=detections_per_img, topk_candidates=topk_candidates,
        fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh,
    )


def build_fcos(
    num_classes: int,
    *,
    backbone: str | nn.Module = "tiny",
    backbone_weights: Any = None,
    backbone_kwargs: dict | None = None,
    trainable_backbone_layers: int | None = None,
    norm: str = "bn",
    loss: str | ClassificationLoss = "sigmoid_focal",
    loss_kwargs: dict | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    anchor_sizes: Sequence[Sequence[int]] | None = None,
    head_norm: str | None = "gn",
    num_convs: int = 4,
    center_sampling_radius: float = 1.5,
    score_thresh: float = 1e-4,
    nms_thresh: float = 0.6,
    detections_per_img: int = 300,
    topk_candidates: int = 1000,
    logit_transform: nn.Module | None = None,
) -> TailFCOS:
    """Build a :class:`TailFCOS` for ``num_classes`` foreground classes.

    Args as :func:`build_retinanet`; ``anchor_sizes`` must have one size per level (FCOS uses one
    point per location; ``None`` = the measured strides). ``head_norm="gn"`` is torchvision's
    GroupNorm with the group count reduced to divide narrow towers (at most 32 groups).
    ``nms_thresh`` 0.6 as torchvision's FCOS.
    """
    cls_loss = _resolve_loss(loss, num_classes, loss_kwargs)
    net = _resolve_backbone(backbone, backbone_weights, norm, backbone_kwargs, trainable_backbone_layers)
    generator = _anchor_generator(net, anchor_sizes, (1.0,), "fcos")
    if generator.num_anchors_per_location()[0] != 1:
        raise ConfigError("FCOS needs exactly one anchor size per level")
    return _one_stage_detector(
        TailFCOS, net, cls_loss, generator, head_norm=head_norm, image_mean=image_mean, image_std=image_std,
        logit_transform=logit_transform, num_convs=num_convs, min_size=min_size, max_size=max_size,
        center_sampling_radius=center_sampling_radius, score_thresh=score_thresh, nms_thresh=nms_thresh,
        detections_per_img=detections_per_img, topk_candidates=topk_candidates,
    )

