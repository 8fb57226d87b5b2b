"""Detectors for long-tailed detection: torchvision models with a pluggable classification head.

``build_model(arch, num_classes, **kwargs)`` is the entry point; ``ARCHITECTURES`` (in
:mod:`taildet.models.build`) maps the names to builders, and the config validates ``model.arch``
and the options under ``model:`` against it (:func:`~taildet.models.build.architecture_info`).
"""

from taildet.models.backbones import build_backbone
from taildet.models.cascade import build_cascade_mask_rcnn, build_cascade_rcnn
from taildet.models.build import ARCHITECTURES, architecture_info, build_model
from taildet.models.classifiers import build_classifier
from taildet.models.two_stage import build_faster_rcnn, build_mask_rcnn

__all__ = [
    "ARCHITECTURES",
    "build_model",
    "architecture_info",
    "build_backbone",
    "build_classifier",
    "build_faster_rcnn",
    "build_mask_rcnn",
    "build_cascade_rcnn",
    "build_cascade_mask_rcnn",
]
