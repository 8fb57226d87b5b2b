"""Config values that name an entry of a registry, validated against the registry itself (no second
list of names): ``model.arch`` (:data:`taildet.models.build.ARCHITECTURES`, whose builders also
give the options accepted under ``model:`` and what the cross-section checks need, see
:func:`taildet.models.build.architecture_info`), ``model.loss`` (:data:`taildet.losses.LOSSES`),
``model.classifier`` (:data:`taildet.models.classifiers.CLASSIFIERS`), ``model.backbone`` and
``model.norm`` (:data:`taildet.models.backbones.BACKBONES` / :data:`~taildet.models.backbones.NORMS`),
``model.head_norm`` (:data:`taildet.models.one_stage_heads.HEAD_NORMS`) and ``data.sampler``
(:data:`taildet.data.samplers.SAMPLERS`). The registries are read at validation time: a name
registered at run time is accepted at once (so is a name list the models module is given anew). (Post-hoc calibration methods are named by ``taildet compare``
recipes, checked against :data:`taildet.calibration.CALIBRATORS` when a recipe runs.)
"""

from __future__ import annotations

from typing import Any, Callable

from taildet.config.validators import _fmt, _Invalid, v_str
from taildet.data.samplers import SAMPLERS
from taildet.losses import LOSSES
from taildet.models import backbones, one_stage_heads
from taildet.models.build import ARCHITECTURES, ArchitectureInfo, architecture_info
from taildet.models.classifiers import CLASSIFIERS

__all__ = ["v_arch", "v_loss", "v_classifier", "v_sampler", "v_backbone", "v_norm", "v_head_norm", "arch_info",
           "builder_options", "two_stage_architectures"]


def _key_of(registry: Callable[[], Any] | dict[str, Any]) -> Callable[[Any], Any]:
    """A validator: a key of ``registry`` (a dict, or a function returning the names), read when called."""
    def check(v):
        names = registry() if callable(registry) else registry
        if not isinstance(v, str) or v not in names:
            raise _Invalid(f"expected one of {', '.join(map(str, names))}, got {_fmt(v)}")
        return v

    return check


v_arch = _key_of(ARCHITECTURES)
v_classifier = _key_of(CLASSIFIERS)
v_sampler = _key_of(SAMPLERS)
#: ``model.backbone`` / ``model.norm`` / ``model.head_norm``: the names the models module builds
#: (looked up there when called, so a module that extends its tuple is followed).
v_backbone = _key_of(lambda: backbones.BACKBONES)
v_norm = _key_of(lambda: backbones.NORMS)
v_head_norm = _key_of(lambda: one_stage_heads.HEAD_NORMS)


def v_loss(v):
    """A name in :data:`taildet.losses.LOSSES` (the message as ``build_loss`` words it)."""
    v = v_str(v)
    if v not in LOSSES:
        raise _Invalid(f"unknown loss {v!r}; valid names: {', '.join(sorted(LOSSES))}")
    return v


def arch_info(arch: str) -> ArchitectureInfo:
    """:func:`taildet.models.build.architecture_info` of a validated ``model.arch``."""
    return architecture_info(arch)


def two_stage_architectures() -> list[str]:
    """The registered architectures with RoI heads (``cls_stage == "roi_heads"``), for messages."""
    return [name for name in ARCHITECTURES if architecture_info(name).stage == "roi_heads"]


def builder_options() -> frozenset[str] | None:
    """The options some registered builder takes (None when one takes ``**kwargs``): the keys the
    config accepts under ``model:``; ``build_model`` checks them against ``model.arch``'s builder."""
    out: set[str] = set()
    for name in ARCHITECTURES:
        options = architecture_info(name).options
        if options is None:
            return None
        out |= options
    return frozenset(out)
