"""LogN for detectors with several classification stages (Cascade R-CNN): one statistics entry and
one logit transform per stage.

Each stage of a cascade (:mod:`taildet.models.cascade`) has its own
:class:`~taildet.models.heads.ClassificationHead` named ``"roi_heads.0"``, ``"roi_heads.1"``,
``"roi_heads.2"`` (:func:`~taildet.calibration.heads.classification_heads`), and each keeps its own
statistics (spec section 1):

* :func:`collect_stage_statistics` -- the statistics pass of
  :func:`~taildet.calibration.collect_logit_statistics` (training-time sampling mode, no backward,
  the model left as it was) accumulating every stage's sampled logits into that stage's
  :class:`~taildet.calibration.LogitNormalizer`; save them in one file with
  :func:`~taildet.calibration.save_normalizers` (one key per stage);
* :func:`collect_stage_running_statistics` -- LogN's released recipe on a cascade: every stage's
  BatchNorm on its logits continues its own running statistics (the reference's 0-lr fine-tune);
* :func:`apply_stage_transforms` -- install one transform per stage (each stage's logits are
  normalised with its own statistics before the cascade averages them);
* :func:`fit_stages` -- a post-hoc :class:`~taildet.calibration.calibrators.Calibrator` fitted per
  stage (LogN picks each stage's entry of the statistics file).

Every function also takes a one-head detector (one stage).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from taildet.calibration.heads import classification_heads
from taildet.calibration.logit_norm import LogitNormalizer, load_normalizers
from taildet.calibration.install import apply_stage_transforms
from taildet.calibration.statistics import (RUNNING_MOMENTUM, _accumulate_stages, _find_class_names, _new_normalizer,
                                            _progress_bar, _record_only_logits, _to_device, _unwrap,
                                            training_sampling_mode)
from taildet.errors import ConfigError

__all__ = ["collect_stage_statistics", "collect_stage_running_statistics", "apply_stage_transforms", "fit_stages",
           "last_stage_normalizer"]

log = logging.getLogger(__name__)


def collect_stage_statistics(
    model: nn.Module,
    data_loader: Iterable,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    max_batches: int | None = None,
    class_names: Sequence[str] | None = None,
    sync: bool = True,
    positives: Any = None,
    **normalizer_kwargs: Any,
) -> dict[str, LogitNormalizer]:
    """LogN statistics of every classification stage of ``model``: ``{stage name: normalizer}``.

    One pass over ``data_loader`` as :func:`~taildet.calibration.collect_logit_statistics` (same
    arguments; ``normalizer_kwargs`` apply to every stage); each training forward fills every
    stage head's ``record`` and each stage's normalizer accumulates its own stage's sampled
    logits (for a cascade: stage ``t``'s RoIs, sampled at its IoU threshold from the boxes
    refined by stage ``t - 1``). ``positives`` receives the **last** stage's logits.
    """
    device = torch.device(device)
    model = _unwrap(model)
    heads = classification_heads(model)
    model.to(device)
    if class_names is None:
        class_names = _find_class_names(data_loader)
    names = list(class_names) if class_names is not None else None
    norms = {k: _new_normalizer(h, names, **normalizer_kwargs).to(device) for k, h in heads.items()}
    batches = _accumulate_stages(model, heads, norms, data_loader, device, max_batches, progress, positives)
    for k, norm in norms.items():
        if sync:
            norm.sync()
        if float(norm.count) == 0:
            raise ValueError(f"collect_stage_statistics: stage {k!r} got no logits (empty loader?)")
    log.info("LogN statistics of %d stage(s): %d batches", len(norms), batches)
    return norms


def collect_stage_running_statistics(
    model: nn.Module,
    data_loader: Iterable,
    *,
    momentum: float = RUNNING_MOMENTUM,
    device: str | torch.device = "cpu",
    progress: bool = True,
    max_batches: int | None = None,
    class_names: Sequence[str] | None = None,
    sync: bool = True,
    positives: Any = None,
    **normalizer_kwargs: Any,
) -> dict[str, LogitNormalizer]:
    """:func:`~taildet.calibration.collect_running_statistics` for every stage: each stage's
    BatchNorm on its class logits (``model.logit_bn``, one per stage) continues its own running
    statistics with ``momentum`` over the pass, and becomes that stage's
    :class:`~taildet.calibration.LogitNormalizer` (EMA mode). ``positives`` receives the last
    stage's raw logits. The model is left as it was. A stage without such a BatchNorm is a
    ConfigError."""
    device = torch.device(device)
    model = _unwrap(model)
    heads = classification_heads(model)
    bns = {k: h.logit_bn for k, h in heads.items()}
    missing = [k for k, bn in bns.items() if not isinstance(bn, nn.modules.batchnorm._BatchNorm)]
    if missing:
        raise ConfigError(f"running statistics need a BatchNorm on every stage's class logits (model.logit_bn: "
                          f"true); stage(s) {', '.join(missing)} have none: use the statistics pass")
    for key in ("momentum", "ema_init"):
        if key in normalizer_kwargs:
            raise ConfigError(f"running statistics: {key!r} does not apply (the continuation momentum is "
                              "the 'momentum' argument)")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 < float(momentum) <= 1.0:
        raise ConfigError(f"running statistics: momentum must be in (0, 1], got {momentum!r}")
    momentum = float(momentum)
    model.to(device)
    if class_names is None:
        class_names = _find_class_names(data_loader)
    names = list(class_names) if class_names is not None else None
    norms = {k: _new_normalizer(h, names, momentum=momentum, **normalizer_kwargs).to(device)
             for k, h in heads.items()}
    raw: dict[str, list[Tensor]] = {k: [] for k in heads}

    def grabber(k: str):
        def grab(module: nn.Module, args: Any) -> None:
            raw[k].append(args[0].detach())  # the raw logits, before the BatchNorm
        return grab

    hooks = [bns[k].register_forward_pre_hook(grabber(k)) for k in heads]
    saved = {k: bn.momentum for k, bn in bns.items()}
    restores = [_record_only_logits(h) for h in heads.values()]
    last = list(heads)[-1]
    bar = _progress_bar(data_loader, max_batches, progress, "LogN running statistics")
    batches, rows = 0, dict.fromkeys(heads, 0)
    try:
        with training_sampling_mode(model, keep=[b for n in norms.values() for b in n.buffers()]):
            for bn in bns.values():  # the norm layers that update (their buffers are restored on exit)
                bn.train()
                bn.momentum = momentum
            for batch in data_loader:
                if max_batches is not None and batches >= max_batches:
                    break
                images, targets = _to_device(list(batch[0]), list(batch[1]), device)
                for k, h in heads.items():
                    raw[k].clear()
                    h.clear()
                model(images, targets)
                for k, h in heads.items():
                    z = raw[k][-1] if raw[k] else h.record.logits  # type: ignore[union-attr]
                    rows[k] += z.shape[0] if z.shape[0] > 1 else 0  # a 1-row call is not normalised
                    if k == last and positives is not None:
                        positives.add(z, h.record.labels)  # type: ignore[union-attr]
                batches += 1
                if bar is not None:
                    bar.update(1)
            running = {k: (bn.running_mean.detach().to(torch.float64).clone(),
                           bn.running_var.detach().to(torch.float64).clone()) for k, bn in bns.items()}
    finally:
        for hook in hooks:
            hook.remove()
        for k, bn in bns.items():
            bn.momentum = saved[k]
        for restore in restores:
            restore()
        if bar is not None:
            bar.close()
    for k, norm in norms.items():
        with torch.no_grad():
            norm.mean.copy_(running[k][0].to(norm.mean.device))
            norm.running_var.copy_(running[k][1].to(norm.mean.device))
            norm.count.fill_(float(max(rows[k], 1)))  # >= 1: the checkpoint's statistics count as data
        norm._cache = None
        if sync:
            norm._synced = False
            norm.sync()
    log.info("LogN running statistics of %d stage(s): %d batches (momentum %g)", len(norms), batches, momentum)
    return norms


def fit_stages(method: Any, model: nn.Module, **inputs: Any) -> dict[str, nn.Module | None]:
    """``{stage: method.fit(head, **inputs)}`` over every classification head of ``model`` (a
    :class:`~taildet.calibration.calibrators.Calibrator`; LogN reads each stage's own entry)."""
    return {k: method.fit(h, **inputs) for k, h in classification_heads(model).items()}


def last_stage_normalizer(path: str | os.PathLike) -> LogitNormalizer:
    """The statistics of a file's only stage, or of its last one (a cascade's final stage)."""
    stages = load_normalizers(path)
    return stages[list(stages)[-1]]
