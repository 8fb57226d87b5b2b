"""Classification losses, selected by name through the plain dict :data:`LOSSES`.

Each entry maps a config name to a callable ``(num_classes, **kwargs) -> ClassificationLoss``.
Losses that live in files written separately are imported on first use, so this module imports
cleanly whatever subset of them exists.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from taildet.errors import ConfigError
from taildet.losses.balanced import BalancedSigmoidLoss, BalancedSoftmaxLoss
from taildet.losses.base import DATASET_STATISTICS, ClassificationLoss
from taildet.losses.eql import EQLLoss, EQLv2Loss
from taildet.losses.equalized_focal import EqualizedFocalLoss, EqualizedQualityFocalLoss
from taildet.losses.equilibrium import EquilibriumLoss
from taildet.losses.federated import FederatedLoss
from taildet.losses.focal import SigmoidFocalLoss
from taildet.losses.mean_score import MeanScoreTracker
from taildet.losses.online_logn import OnlineLogitNormalization, OnlineLogNLoss
from taildet.losses.quality_focal import QualityFocalLoss
from taildet.losses.seesaw import SeesawLoss
from taildet.losses.sigmoid_bce import SigmoidBCELoss
from taildet.losses.softmax_ce import SoftmaxCrossEntropyLoss

__all__ = [
    "LOSSES", "build_loss", "ClassificationLoss", "DATASET_STATISTICS", "dataset_statistics_needed",
    "fill_dataset_statistics", "SoftmaxCrossEntropyLoss", "SigmoidBCELoss", "BalancedSoftmaxLoss",
    "BalancedSigmoidLoss", "EquilibriumLoss", "MeanScoreTracker", "OnlineLogitNormalization", "OnlineLogNLoss",
    "online_logn_loss", "EQLLoss", "EQLv2Loss", "SeesawLoss", "EqualizedFocalLoss",
    "EqualizedQualityFocalLoss", "QualityFocalLoss", "FederatedLoss",
]


def _sigmoid_focal(num_classes: int, **kwargs: Any) -> ClassificationLoss:
    """Entry of :class:`taildet.losses.focal.SigmoidFocalLoss`."""
    return _construct(SigmoidFocalLoss, "sigmoid_focal", num_classes, kwargs)


def online_logn_loss(num_classes: int, base: str = "softmax_ce", momentum: float = 0.01,
                     beta: str | float = "min_fg", **base_kwargs: Any) -> OnlineLogNLoss:
    """LogN's online inverse variant around a base loss (:mod:`taildet.losses.online_logn`):
    ``OnlineLogNLoss(build_loss(base, num_classes, **base_kwargs), momentum, beta)``."""
    return OnlineLogNLoss(build_loss(base, num_classes, **base_kwargs), momentum=momentum, beta=beta)


def _online_logn(num_classes: int, **kwargs: Any) -> ClassificationLoss:
    return online_logn_loss(num_classes, **kwargs)


LOSSES: dict[str, Callable[..., ClassificationLoss]] = {
    "softmax_ce": SoftmaxCrossEntropyLoss,
    "sigmoid_bce": SigmoidBCELoss,
    "sigmoid_focal": _sigmoid_focal,
    "balanced_softmax": BalancedSoftmaxLoss,
    "balanced_sigmoid": BalancedSigmoidLoss,
    "equilibrium": EquilibriumLoss,
    "ebl": EquilibriumLoss,
    "eql": EQLLoss,
    "eqlv2": EQLv2Loss,
    "seesaw": SeesawLoss,
    "equalized_focal": EqualizedFocalLoss,
    "efl": EqualizedFocalLoss,
    "equalized_quality_focal": EqualizedQualityFocalLoss,
    "eqfl": EqualizedQualityFocalLoss,
    "quality_focal": QualityFocalLoss,
    "qfl": QualityFocalLoss,
    "online_logn": _online_logn,
    "federated": FederatedLoss,
}


def _construct(cls: Callable[..., Any], name: str, num_classes: int, kwargs: dict[str, Any]) -> Any:
    """Call ``cls(num_classes, **kwargs)``, turning a bad keyword into a ConfigError naming it."""
    try:
        inspect.signature(cls).bind(num_classes, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"loss {name!r}: invalid arguments {sorted(kwargs)}: {exc}") from None
    try:
        return cls(num_classes, **kwargs)
    except (ValueError, TypeError) as exc:  # a bad value (e.g. p: abc, p: -1): name the config keys
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"model.loss_kwargs of loss {name!r} ({kwargs}): {exc}") from None


def build_loss(name: str, num_classes: int, **kwargs: Any) -> ClassificationLoss:
    """Build the loss registered as ``name`` in :data:`LOSSES` for ``num_classes`` classes."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    factory = LOSSES[name]
    if inspect.isclass(factory):
        return _construct(factory, name, num_classes, kwargs)
    return factory(num_classes, **kwargs)


def dataset_statistics_needed(name: str) -> tuple[str, ...]:
    """The training-set statistics the loss ``name`` declares it needs (its class's
    :attr:`~taildet.losses.base.ClassificationLoss.needs`, names in :data:`DATASET_STATISTICS`);
    ``()`` for an unknown name and for the factories that are not a loss class."""
    factory = LOSSES.get(name)
    if factory is None or not inspect.isclass(factory):
        return ()
    return tuple(factory.needs)


def fill_dataset_statistics(name: str, loss_kwargs: dict[str, Any] | None, dataset: Any) -> dict[str, Any]:
    """``loss_kwargs`` with the training-set statistics the loss needs and the config left out.

    ``dataset`` has ``instance_counts``, ``image_counts`` and ``image_frequency`` (a
    :class:`taildet.data.LVISDataset`). A needed statistic with no dataset to take it from is a
    :class:`ConfigError`.
    """
    out = dict(loss_kwargs or {})
    for key in dataset_statistics_needed(name):
        if out.get(key) is not None:
            continue
        if dataset is None:
            raise ConfigError(f"loss {name!r} needs {key} of the training set: give it in loss_kwargs "
                              f"or build the model with the training dataset")
        out[key] = [float(v) for v in getattr(dataset, key)]
    return out
