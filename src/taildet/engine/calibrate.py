"""LogN statistics of a trained detector over its training set (``taildet calibrate``).

Two sources, selected by ``stats``:

* ``"pass"`` (default; any detector): one pass of the trained detector over the training data in
  *training-time sampling mode* (two-stage: RPN proposals + GT boxes, the RoI sampler's
  ``box_batch_size_per_image`` per image with its positive fraction, the training augmentation;
  one-stage: every non-ignored anchor), with no backward and no parameter or
  BatchNorm-statistics change (see :func:`taildet.calibration.collect_logit_statistics`); the
  images come in uniform random order. Exact statistics, or an EMA with ``momentum``.
* ``"running"`` (a two-stage detector trained with ``model.logit_bn``, LogN's released recipe):
  the running statistics of the BatchNorm on the logits, continued over one epoch of the
  training data with ``running_momentum`` (the reference's 0-lr fine-tune, momentum 5e-5), with
  the training sampler of ``data.sampler`` (RFS models use RFS, as the reference's fine-tune
  does); see :func:`taildet.calibration.collect_running_statistics`. ``max_batches=0`` takes the
  checkpoint's running statistics as they are.

Both also keep the raw logits of up to ``diagnostic_rows`` positive RoIs and save, in the file's
``extra["background_argmax_share"]``, the share of them whose argmax is the background column per
frequency group (raw, after LogN, after LogN without beta; see
:mod:`taildet.calibration.diagnostics`); ``taildet calibrate`` prints it. Under torchrun every
rank sees its shard and the statistics are merged across ranks; rank 0 writes the file.

A cascade (``cascade_rcnn``, ``cascade_mask_rcnn``): the pass collects every stage's statistics
(:func:`taildet.calibration.collect_stage_statistics`), one file entry per stage
(``roi_heads.0``, ``roi_heads.1``, ``roi_heads.2``; ``--stats running``: each stage's logits'
BatchNorm continued, :func:`taildet.calibration.stages.collect_stage_running_statistics`); the
diagnostic is the last stage's.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from taildet.calibration import (classification_heads, collect_logit_statistics, collect_running_statistics,
                                 collect_stage_statistics, save_normalizers)
from taildet.calibration.stages import collect_stage_running_statistics
from taildet.calibration.diagnostics import (PositiveLogitSample, background_argmax_report,
                                             format_background_argmax_share)
from taildet.calibration.statistics import RUNNING_MOMENTUM
from taildet.data.loading import list_collate
from taildet.data.samplers import TrainingSampler
from taildet.engine.builders import (build_datasets, build_model_for_checkpoint, build_sampler, resolve_device,
                                     seed_all, setup_logging)
from taildet.engine.checkpoint import load_checkpoint, load_model_weights
from taildet.engine.distributed import init_distributed
from taildet.engine.rundir import run_inputs
from taildet.errors import ConfigError
from taildet.fileio import check_not_inputs, check_output_path
from taildet.utils.comm import barrier, get_rank, get_world_size, is_main_process, main_process_check

log = logging.getLogger("taildet")

__all__ = ["calibrate_checkpoint", "STATS_SOURCES"]

#: ``stats`` values of :func:`calibrate_checkpoint` (``taildet calibrate --stats``).
STATS_SOURCES = ("pass", "running")


def calibrate_checkpoint(cfg, checkpoint_path: str, out: str | None = None, *, stats: str = "pass",
                         running_momentum: float | None = None, momentum: float | None = None,
                         max_batches: int | None = None, progress: bool = True, diagnostic_rows: int = 20000,
                         **normalizer_kwargs: Any) -> str:
    """Collect LogN statistics of ``checkpoint_path`` over ``cfg``'s training set; returns the file.

    ``out`` defaults to ``logit_stats.json`` beside the checkpoint. ``stats``: ``"pass"`` (the
    statistics pass; ``momentum`` switches it from exact streaming statistics to an EMA) or
    ``"running"`` (the logits' BatchNorm running statistics of a ``model.logit_bn`` checkpoint,
    continued with ``running_momentum``, default 5e-5 as the reference; see the module doc).
    Other keyword arguments go to :class:`taildet.calibration.LogitNormalizer` (e.g. ``mode``,
    ``beta``; they are saved with the statistics and used when the file is applied).
    ``diagnostic_rows``: positive RoIs kept for the background-argmax diagnostic (0 = none).
    """
    if stats not in STATS_SOURCES:
        raise ConfigError(f"calibrate: stats must be one of {', '.join(STATS_SOURCES)}, got {stats!r}")
    if stats == "running":
        if momentum is not None or "ema_init" in normalizer_kwargs:
            raise ConfigError("calibrate: --momentum / --ema-init are options of the statistics pass; with "
                              "--stats running the continuation momentum is --running-momentum")
        running_momentum = RUNNING_MOMENTUM if running_momentum is None else running_momentum
    elif running_momentum is not None:
        raise ConfigError("calibrate: --running-momentum applies to --stats running")
    init_distributed(cfg.train.device)
    setup_logging()
    device = resolve_device(cfg.train.device)
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), "logit_stats.json")
    # before the pass: a bad --out is named at once, nothing is written
    main_process_check(check_output_path, out, what="statistics (--out)")
    check_not_inputs({"statistics file (--out)": out},
                     {**run_inputs(cfg), "checkpoint": str(checkpoint_path), "config": cfg.source})
    train_set, _, _ = build_datasets(cfg, need_train=True)
    state = load_checkpoint(checkpoint_path)
    model = build_model_for_checkpoint(cfg, train_set.num_classes, train_set)
    load_model_weights(model, state["model"], checkpoint_path, state.get("config"))
    model.to(device)
    cascade = len(classification_heads(model)) > 1  # one statistics entry per stage
    if stats == "running" and not all(isinstance(h.logit_bn, torch.nn.modules.batchnorm._BatchNorm)
                                      for h in classification_heads(model).values()):
        raise ConfigError(f"calibrate --stats running: {checkpoint_path} has no BatchNorm on its class logits "
                          "(train with model.logit_bn: true, LogN's released recipe), or use --stats pass")
    seed_all(cfg.train.seed)
    if stats == "running":  # the reference's fine-tune samples as stage 1 did
        sampler = build_sampler(train_set, cfg.data.sampler, seed=cfg.train.seed,
                                rfs_threshold=cfg.data.rfs_threshold, rfs_rounding=cfg.data.rfs_rounding)
    else:
        sampler = TrainingSampler(len(train_set), shuffle=True, seed=cfg.train.seed,
                                  num_replicas=get_world_size(), rank=get_rank())
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.data.batch_size, sampler=sampler,
                                         num_workers=cfg.data.num_workers, collate_fn=list_collate)
    positives = PositiveLogitSample(train_set.num_classes, diagnostic_rows) if diagnostic_rows else None
    show = progress and is_main_process()
    if stats == "running":
        collect = collect_stage_running_statistics if cascade else collect_running_statistics
        normalizer = collect(model, loader, momentum=running_momentum, device=device, progress=show,
                             max_batches=max_batches, class_names=train_set.class_names, positives=positives,
                             **normalizer_kwargs)
    else:
        if momentum is not None:
            normalizer_kwargs["momentum"] = momentum
        collect = collect_stage_statistics if cascade else collect_logit_statistics
        normalizer = collect(model, loader, device=device, progress=show, max_batches=max_batches,
                             class_names=train_set.class_names, positives=positives, **normalizer_kwargs)
    stages = normalizer if cascade else {model.cls_head.stage: normalizer}
    normalizer = list(stages.values())[-1]  # the diagnostic: the (last) stage whose scores are output
    if is_main_process():
        extra: dict[str, Any] = {"checkpoint": os.path.abspath(checkpoint_path), "stats": stats}
        if stats == "running":
            extra["running_momentum"] = running_momentum
        if positives is not None and positives.rows:
            bg = normalizer.background_index if normalizer.background else None
            report = background_argmax_report(positives, train_set.frequency_groups, normalizer, bg)
            extra["background_argmax_share"] = report
            log.debug("calibrate: %s", format_background_argmax_share(report))
            log.info("calibrate: positive RoIs whose argmax is the background column: %s",
                     ", ".join(f"{k} {100 * v['all']['share']:.1f} %" for k, v in report.items()
                               if isinstance(v, dict) and v["all"]["share"] is not None))
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_normalizers(out, stages, extra=extra)
        log.info("calibrate: statistics of %d sampled logits over %d training images -> %s",
                 int(normalizer.count.max().item()) if normalizer.count.numel() else 0, len(train_set), out)
    barrier()
    return out
