"""One place that maps an architecture name to its builder: :data:`ARCHITECTURES`.

Every builder is called as ``builder(num_classes, **kwargs)``. The one-stage builders live in
``taildet.models.one_stage`` and are imported on first use.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from taildet.errors import ConfigError
from taildet.models.atss import build_atss
from taildet.models.one_stage import build_fcos, build_retinanet
from taildet.models.two_stage import build_faster_rcnn, build_mask_rcnn

__all__ = ["ARCHITECTURES", "build_model"]


def _retinanet(num_classes: int, **kwargs: Any) -> nn.Module:
    """Entry of ``taildet.models.one_stage.build_retinanet``."""
    return _call_checked(build_retinanet, "retinanet", num_classes, kwargs)


def _fcos(num_classes: int, **kwargs: Any) -> nn.Module:
    """Entry of ``taildet.models.one_stage.build_fcos``."""
    return _call_checked(build_fcos, "fcos", num_classes, kwargs)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "faster_rcnn": build_faster_rcnn,
    "mask_rcnn": build_mask_rcnn,
    "retinanet": _retinanet,
    "fcos": _fcos,
    "atss": build_atss,
}

_LAZY = {_retinanet, _fcos}


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
    builder = ARCHITECTURES[arch]
    if builder in _LAZY:
        return builder(num_classes, **kwargs)
    return _call_checked(builder, arch, num_classes, kwargs)
