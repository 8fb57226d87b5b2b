"""Installing a logit transform (LogN's normalizer, logit adjustment) on a detector's classification
head(s): :func:`apply_logit_normalization` (one head, or ``{stage: transform}`` for a cascade),
:func:`apply_stage_transforms` (every stage of a multi-stage detector) and
:func:`remove_logit_normalization`. Each transform is checked against its head's column count and
background column before it is installed."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from taildet.calibration.heads import Head, _unwrap, classification_head, classification_heads
from taildet.errors import ConfigError

__all__ = ["apply_logit_normalization", "apply_stage_transforms", "remove_logit_normalization"]


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def remove_logit_normalization(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_logit_normalization` (any logit transform, every stage); returns the model."""
    for head in classification_heads(model).values():
        head.logit_transform = None
    return _unwrap(model)


def apply_logit_normalization(model: nn.Module,
                              normalizer: nn.Module | Mapping[str, nn.Module | None] | None) -> nn.Module:
    """Make ``model`` use ``normalizer`` on its class logits at inference; returns the model.

    * taildet detectors: ``model.cls_head.logit_transform = normalizer``;
    * plain torchvision Faster/Mask R-CNN: the normalizer becomes
      ``model.roi_heads.box_predictor.logit_transform`` and a forward hook on the box predictor
      transforms the class logits in eval mode, i.e. right before torchvision's
      ``postprocess_detections`` (softmax, background column 0 dropped, NMS). Training is
      unaffected. The existing state-dict keys are unchanged (the normalizer's are added).

    The normalizer (any module with ``num_outputs`` and ``background_index``, e.g. a
    :class:`LogitNormalizer` or a :class:`~taildet.calibration.LogitAdjuster`) is moved to the
    model's device and checked against the head's class count and background column. ``None``
    removes it. A cascade takes ``{stage name: transform}`` with every stage (see
    :func:`apply_stage_transforms`).
    """
    model = _unwrap(model)
    if isinstance(normalizer, Mapping) or len(classification_heads(model)) > 1:  # a cascade: one per stage
        return apply_stage_transforms(model, normalizer)
    head = classification_head(model)
    if normalizer is None:
        return remove_logit_normalization(model)
    return _install(model, head, normalizer)


def _install(model: nn.Module, head: Head, normalizer: nn.Module) -> nn.Module:
    """Check ``normalizer`` against ``head`` (columns, background) and make it its transform."""
    k_norm, bg_norm = normalizer.num_outputs, normalizer.background_index
    k, bg = head.num_outputs, head.background_index
    if int(k_norm) != k:
        raise ConfigError(f"the logit transform expects {k_norm} logit columns, the model's classifier has {k}")
    if bg_norm != bg:
        raise ConfigError(
            f"the logit transform's background column is {bg_norm}, the model's is {bg} "
            "(torchvision detectors: background_index=0; taildet softmax heads: last; sigmoid heads: none)"
        )
    normalizer.to(_model_device(model))
    head.logit_transform = normalizer
    return model


def apply_stage_transforms(model: nn.Module, transforms: Mapping[str, nn.Module | None] | None) -> nn.Module:
    """Install ``transforms[stage]`` as the logit transform of each stage's head (checked against
    that head as :func:`~taildet.calibration.apply_logit_normalization` does; None removes it);
    ``transforms=None`` removes every stage's. Every stage must be given: a transform for some
    stages only, or for a stage the model lacks, is a ConfigError naming them."""
    model = _unwrap(model)
    heads = classification_heads(model)
    if transforms is None:
        transforms = dict.fromkeys(heads)
    if not isinstance(transforms, Mapping):
        raise ConfigError(f"{type(model).__name__} has {len(heads)} classification stages ({', '.join(heads)}): "
                          "give one logit transform per stage, {stage: transform}")
    unknown = sorted(set(transforms) - set(heads))
    missing = [k for k in heads if k not in transforms]
    if unknown or missing:
        raise ConfigError(f"logit transforms per stage: the model's stages are {', '.join(heads)}"
                          + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                          + (f"; missing: {', '.join(missing)}" if missing else ""))
    for k, head in heads.items():
        t = transforms[k]
        if t is None:
            head.logit_transform = None
        else:
            _install(model, head, t)
    return model
