"""The LogN statistics pass over a training set (``taildet calibrate``).

One pass of the trained detector over the training data in *training-time sampling mode*
(two-stage: RPN proposals + GT boxes, the RoI sampler's ``box_batch_size_per_image`` per image with
its positive fraction, the training augmentation; one-stage: every non-ignored anchor), with no
backward and no parameter or BatchNorm-statistics change (see
:func:`taildet.calibration.collect_logit_statistics`). Under torchrun every rank sees its shard and
the statistics are merged exactly across ranks; rank 0 writes the file.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger("taildet")

__all__ = ["calibrate_checkpoint", "build_model_for_checkpoint"]


def build_model_for_checkpoint(cfg, num_classes: int, train_set=None):
    """The model a checkpoint of ``cfg`` holds: a fine-tune config's stage-2 loss when it has one."""
    from taildet.engine.train import build_model_from_cfg

    ft = getattr(cfg, "finetune", None)
    loss = getattr(ft, "loss", None)
    loss_kwargs = getattr(ft, "loss_kwargs", None) if loss else None
    return build_model_from_cfg(cfg, num_classes, loss=loss, loss_kwargs=loss_kwargs, train_dataset=train_set)


def calibrate_checkpoint(cfg, checkpoint_path: str, out: str | None = None, *, momentum: float | None = None,
                         max_batches: int | None = None, progress: bool = True, **normalizer_kwargs: Any) -> str:
    """Collect LogN statistics of ``checkpoint_path`` over ``cfg``'s training set; returns the file.

    ``out`` defaults to ``logit_stats.json`` beside the checkpoint. ``momentum`` switches from exact
    streaming statistics to the reference's EMA. Other keyword arguments go to
    :class:`taildet.calibration.LogitNormalizer` (e.g. ``mode``, ``beta``; they are saved with the
    statistics and used when the file is applied).
    """
    from taildet.calibration import collect_logit_statistics
    from taildet.data.samplers import TrainingSampler
    from taildet.engine.checkpoint import load_checkpoint, load_model_weights
    from taildet.engine.distributed import (barrier, get_rank, get_world_size, init_distributed, is_main_process,
                                            main_process_check)
    from taildet.engine.inference import list_collate, resolve_device
    from taildet.engine.train import _seed_all, build_datasets, setup_logging

    from taildet.engine.train import run_inputs
    from taildet.fileio import check_not_inputs, check_output_path

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
    _seed_all(cfg.train.seed)
    sampler = TrainingSampler(len(train_set), shuffle=True, seed=cfg.train.seed,
                              num_replicas=get_world_size(), rank=get_rank())
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.data.batch_size, sampler=sampler,
                                         num_workers=cfg.data.num_workers, collate_fn=list_collate)
    if momentum is not None:
        normalizer_kwargs["momentum"] = momentum
    normalizer = collect_logit_statistics(model, loader, device=device, progress=progress and is_main_process(),
                                          max_batches=max_batches, class_names=train_set.class_names,
                                          **normalizer_kwargs)
    if is_main_process():
        from taildet.calibration.statistics import model_kind

        stage = "head" if model_kind(model) == "one_stage" else "roi_heads"
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        normalizer.save(out, stage=stage, extra={"checkpoint": os.path.abspath(checkpoint_path)})
        log.info("calibrate: statistics of %d sampled logits over %d training images -> %s",
                 int(normalizer.count.max().item()) if normalizer.count.numel() else 0, len(train_set), out)
    barrier()
    return out
