"""Post-hoc calibration of classification logits: LogN (logit normalization) and logit adjustment.

Typical use with a taildet detector::

    from taildet.calibration import collect_logit_statistics, apply_logit_normalization

    norm = collect_logit_statistics(model, train_loader)   # training-time RoI sampling, no backward
    norm.save("logn_stats.json")                            # statistics + class names
    apply_logit_normalization(model, norm)                  # eval scores now use LogN

With your own torchvision Faster R-CNN: ``calibrate_torchvision_model(model, train_loader)``.

A detector trained with BatchNorm on its logits (``model.logit_bn``, LogN's released recipe):
``collect_running_statistics(model, train_loader)`` continues that BatchNorm's running statistics
(momentum 5e-5, the authors' 0-lr fine-tune) instead of the exact pass.
``background_argmax_share(logits, labels, groups, normalizer)``: per frequency group, the share of
positive RoIs whose argmax is the background column after a transform (a diagnostic of beta).

Modules: :mod:`~taildet.calibration.logit_norm` (:class:`LogitNormalizer`),
:mod:`~taildet.calibration.stats_file` (the statistics file format), :mod:`~taildet.calibration.logit_adjust`
(:class:`LogitAdjuster`), :mod:`~taildet.calibration.calibrators` (:data:`CALIBRATORS`, the
post-hoc methods by name: ``logn``, ``loga``, ``none``), :mod:`~taildet.calibration.heads` (the
classification head of a detector: ``model.cls_head``, or an adapter over a plain torchvision
R-CNN), :mod:`~taildet.calibration.statistics` (the statistics pass and
applying a transform to a model), :mod:`~taildet.calibration.plots` (the per-class statistics figure),
:mod:`~taildet.calibration.diagnostics` (the background-argmax diagnostic),
:mod:`~taildet.calibration.stages` (per-stage statistics and transforms of a cascade). The online inverse
variant (a training loss) is :class:`taildet.losses.online_logn.OnlineLogNLoss`.
"""

from taildet.calibration.calibrators import CALIBRATORS, Calibrator, build_calibrator
from taildet.calibration.diagnostics import (
    PositiveLogitSample,
    background_argmax_report,
    background_argmax_share,
    format_background_argmax_share,
)
from taildet.calibration.logit_adjust import LogitAdjuster
from taildet.calibration.logit_norm import (
    LogitNormalizer,
    batch_moments,
    load_normalizers,
    merge_moments,
    save_normalizers,
)
from taildet.calibration.statistics import (
    apply_calibration,
    apply_logit_normalization,
    calibrate_torchvision_model,
    collect_logit_statistics,
    collect_running_statistics,
    find_logit_batchnorm,
    remove_logit_normalization,
    training_sampling_mode,
)
from taildet.calibration.heads import classification_heads
from taildet.calibration.stages import apply_stage_transforms, collect_stage_statistics
from taildet.calibration.plots import plot_logit_statistics as _plot


def plot_logit_statistics(*args, **kwargs):
    """See :func:`taildet.calibration.plots.plot_logit_statistics` (imports matplotlib on use)."""
    return _plot(*args, **kwargs)


__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "build_calibrator",
    "LogitNormalizer",
    "LogitAdjuster",
    "merge_moments",
    "batch_moments",
    "save_normalizers",
    "load_normalizers",
    "collect_logit_statistics",
    "collect_running_statistics",
    "find_logit_batchnorm",
    "background_argmax_share",
    "background_argmax_report",
    "format_background_argmax_share",
    "PositiveLogitSample",
    "apply_logit_normalization",
    "remove_logit_normalization",
    "calibrate_torchvision_model",
    "apply_calibration",
    "training_sampling_mode",
    "plot_logit_statistics",
    "classification_heads",
    "collect_stage_statistics",
    "apply_stage_transforms",
]
