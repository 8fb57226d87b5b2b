"""One place that maps an architecture name to its builder: :data:`ARCHITECTURES`.

Every builder is called as ``builder(num_classes, **options)``; its signature lists the options
(the config accepts exactly those under ``model:``, see :func:`architecture_info`). A builder
declares what it builds with attributes read by the config checks: ``cls_stage`` -- the
``model.cls_head.stage`` of its models (``"roi_heads"``: a two-stage detector with RoI features
and a RoI box predictor; default ``"head"``, a dense one-stage head), ``with_masks`` (it trains
on instance masks; default False) and ``cls_stages`` (how many classification stages its models
have, each with its own head: 3 for a cascade; default 1).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from taildet.errors import ConfigError
from taildet.models.atss import build_atss
from taildet.models.cascade import build_cascade_mask_rcnn, build_cascade_rcnn
from taildet.models.one_stage import build_fcos, build_retinanet
from taildet.models.two_stage import build_faster_rcnn, build_mask_rcnn

__all__ = ["ARCHITECTURES", "ArchitectureInfo", "architecture_info", "build_model"]


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "faster_rcnn": build_faster_rcnn,
    "mask_rcnn": build_mask_rcnn,
    "retinanet": build_retinanet,
    "fcos": build_fcos,
    "atss": build_atss,
    "cascade_rcnn": build_cascade_rcnn,
    "cascade_mask_rcnn": build_cascade_mask_rcnn,
}


@dataclass(frozen=True)
class ArchitectureInfo:
    """What the config needs to know of a registered architecture, read from its builder."""

    name: str
    #: ``model.cls_head.stage`` of its models: ``"roi_heads"`` (two-stage) or ``"head"``.
    stage: str
    #: it trains on instance masks (``data.with_masks`` required).
    masks: bool
    #: the options its builder takes (``None``: the builder takes ``**kwargs``, anything goes).
    options: frozenset[str] | None
    #: classification stages, each with its own head (a cascade: 3).
    stages: int = 1


def architecture_info(arch: str) -> ArchitectureInfo:
    """The :class:`ArchitectureInfo` of ``ARCHITECTURES[arch]`` (a KeyError for an unknown name)."""
    builder = ARCHITECTURES[arch]
    params = inspect.signature(builder).parameters
    options = None
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        options = frozenset(k for k, p in params.items()
                            if k != "num_classes" and p.kind is not inspect.Parameter.VAR_POSITIONAL)
    return ArchitectureInfo(arch, getattr(builder, "cls_stage", "head"), bool(getattr(builder, "with_masks", False)),
                            options, int(getattr(builder, "cls_stages", 1)))


def _call_checked(builder: Callable[..., nn.Module], arch: str, num_classes: int, kwargs: dict[str, Any]):
    """Call ``builder(num_classes, **kwargs)``; a keyword it does not take is a ConfigError naming it."""
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(k for k in kwargs if k not in params or k == "num_classes")
        if unknown:
            valid = sorted(k for k, p in params.items() if k != "num_classes" and p.kind is not p.VAR_POSITIONAL)
            raise ConfigError(
                f"architecture {arch!r}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
            )
    return builder(num_classes, **kwargs)


def build_model(arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the detector named ``arch`` (a key of :data:`ARCHITECTURES`) for ``num_classes`` classes."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; valid names: {', '.join(sorted(ARCHITECTURES))}")
    return _call_checked(ARCHITECTURES[arch], arch, num_classes, kwargs)
