"""The classification head of any detector LogN can calibrate.

A taildet detector's head is its ``model.cls_head``
(:class:`~taildet.models.heads.ClassificationHead`); a plain torchvision ``FasterRCNN`` /
``MaskRCNN`` is read through :class:`TorchvisionRoIHead`, an adapter with the attributes the
calibration code uses (``num_outputs``, ``num_classes``, ``background_index``, ``stage``,
``logit_bn``, ``logit_transform``). :func:`classification_head` returns the one or the other.

A cascade has one head per stage: :func:`classification_heads` gives every head of any detector
by its LogN stage name (``{"roi_heads.0": ..., "roi_heads.1": ..., "roi_heads.2": ...}``; a
one-head detector: ``{head.stage: head}``); :func:`classification_head` refuses a cascade.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads

from taildet.calibration.logit_norm import DEFAULT_STAGE, LogitNormalizer
from taildet.errors import ConfigError, DataError
from taildet.models.heads import ClassificationHead, SampledLogits

__all__ = ["TorchvisionRoIHead", "Head", "classification_head", "classification_heads", "select_stage"]


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _torchvision_predictor_hook(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook on a torchvision box predictor: eval-mode class logits go through LogN."""
    if module.training:
        return None
    cls_logits, box = output
    return module.logit_transform(cls_logits), box


class TorchvisionRoIHead:
    """A plain torchvision ``FasterRCNN`` / ``MaskRCNN`` seen as a classification head: ``K`` logits
    with background column 0, stage ``"roi_heads"``. Setting ``logit_transform`` makes the box
    predictor's eval-mode class logits go through it (a forward hook; the transform becomes
    ``roi_heads.box_predictor.logit_transform``, adding its keys to the state dict)."""

    stage = DEFAULT_STAGE
    background_index = 0
    logit_bn = None

    def __init__(self, model: nn.Module):
        self.model = model
        self.predictor = model.roi_heads.box_predictor
        self.num_outputs = int(self.predictor.cls_score.out_features)
        self.num_classes = self.num_outputs - 1

    @property
    def logit_transform(self) -> nn.Module | None:
        return self.predictor._modules.get("logit_transform")

    @logit_transform.setter
    def logit_transform(self, transform: nn.Module | None) -> None:
        pred = self.predictor
        for key, fn in list(pred._forward_hooks.items()):
            if fn is _torchvision_predictor_hook:
                del pred._forward_hooks[key]
        if "logit_transform" in pred._modules:
            del pred._modules["logit_transform"]
        if transform is not None:
            pred.logit_transform = transform
            pred.register_forward_hook(_torchvision_predictor_hook)

    def sampled(self, images: list[Tensor], targets: list[dict]) -> SampledLogits:
        """Class logits ``[R, K]`` of the RoIs torchvision samples for training (its own code path,
        step by step) with their labels ``[R]`` (torchvision's: 0 = background)."""
        model = self.model
        image_list, targets = model.transform(images, targets)
        features = model.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = model.rpn(image_list, features, targets)
        rh = model.roi_heads
        proposals, _, labels, _ = rh.select_training_samples(proposals, targets)
        box_features = rh.box_head(rh.box_roi_pool(features, proposals, image_list.image_sizes))
        class_logits, _ = rh.box_predictor(box_features)
        return SampledLogits(class_logits, torch.cat(labels))


Head = ClassificationHead | TorchvisionRoIHead


def classification_head(model: nn.Module) -> Head:
    """The classification head of ``model`` (DDP unwrapped): a taildet detector's ``cls_head``, or
    a :class:`TorchvisionRoIHead` over a plain torchvision Faster/Mask R-CNN."""
    model = _unwrap(model)
    stages = _stage_heads(model)
    if stages is not None:
        if len(stages) == 1:
            return next(iter(stages.values()))
        raise ConfigError(
            f"{type(model).__name__} has {len(stages)} classification stages ({', '.join(stages)}), each with its "
            "own head and LogN statistics: use taildet.calibration.classification_heads(model), "
            "collect_stage_statistics and apply_logit_normalization(model, {stage: transform})"
        )
    head = dict(model.named_children()).get("cls_head")
    if isinstance(head, ClassificationHead):
        return head
    if isinstance(model, GeneralizedRCNN) and isinstance(model.roi_heads, RoIHeads):
        return TorchvisionRoIHead(model)
    raise ConfigError(
        f"{type(model).__name__} is not a taildet detector nor a torchvision Faster/Mask R-CNN; "
        "LogN needs access to its classification logits"
    )


def _stage_heads(model: nn.Module) -> dict[str, ClassificationHead] | None:
    fn = getattr(model, "classification_heads", None)
    return dict(fn()) if callable(fn) else None


def classification_heads(model: nn.Module) -> dict[str, Head]:
    """Every classification head of ``model`` (DDP unwrapped) by its LogN stage name, in stage
    order: a cascade's ``model.classification_heads()`` (``"roi_heads.0"``, ...), else
    ``{head.stage: classification_head(model)}``."""
    model = _unwrap(model)
    stages = _stage_heads(model)
    if stages is not None:
        return stages
    head = classification_head(model)
    return {head.stage: head}


def select_stage(stages: dict[str, LogitNormalizer], head: Head, path: str | os.PathLike,
                 stage: str | None = None) -> LogitNormalizer:
    """The normalizer of a statistics file for ``head``: ``stage`` if given, else the head's own
    stage (``"roi_heads"`` for R-CNNs, ``"head"`` for one-stage models) or the file's only one."""
    if stage is None:
        want = head.stage
        stage = want if want in stages or len(stages) != 1 else next(iter(stages))
    if stage not in stages:
        raise DataError(path, f"stage {stage!r}", f"not in the file (stages: {sorted(stages)})")
    return stages[stage]
