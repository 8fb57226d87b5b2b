"""``taildet classify train|eval``: the detection engine's loop on a classifier.

Training is :func:`taildet.engine.train.run_training` itself -- the same atomic checkpoints and
exact resume, DDP, tqdm progress, ``metrics.jsonl``, divergence checks -- with a
:class:`taildet.classify.models.Classifier` (which returns ``{"loss_cls": ...}`` like a detector)
and a :class:`taildet.classify.data.ClassificationDataset`. The run directory is prepared as a
detection run's (:func:`taildet.engine.rundir.prepare_run_dir`: ``config.yaml``, an earlier run's
files set aside, ``--resume`` only with the same config).

cRT (``model.stage: crt``): the ``features.*`` weights of ``model.init_from`` are loaded and
frozen (their BatchNorm layers stay in eval mode), ``fc`` is re-initialised and trained alone,
usually with ``data.sampler: class_balanced``.

After training the model is evaluated (:func:`evaluate`) unless ``evaluate=False``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from taildet.classify.config import ClassifyConfig
from taildet.classify.data import ClassificationDataset, load_split
from taildet.classify.logn_stats import check_posthoc_splits
from taildet.classify.models import Classifier, build_classifier
from taildet.classify.posthoc import evaluate_model
from taildet.classify.splits import read_manifest
from taildet.engine.builders import resolve_device, seed_all, setup_logging
from taildet.engine.checkpoint import load_checkpoint, load_model_weights
from taildet.engine.distributed import init_distributed
from taildet.engine.rundir import check_run_dir, prepare_run_dir
from taildet.engine.train import run_training
from taildet.data.samplers import build_sampler
from taildet.errors import ConfigError
from taildet.utils.comm import get_world_size, is_main_process

__all__ = ["train_classifier", "build_for_config", "load_data", "evaluate_classifier"]

log = logging.getLogger("taildet.engine")


def load_data(cfg: ClassifyConfig, augment: bool = True) -> tuple[dict, ClassificationDataset]:
    """``(manifest, training split)`` of ``cfg.data.manifest``."""
    manifest = read_manifest(cfg.data.manifest)
    aug = tuple(cfg.data.augment) if augment else ()
    train_set = load_split(manifest, "train", aug, cfg.data.pad)
    return manifest, train_set


def build_for_config(cfg: ClassifyConfig, train_set: ClassificationDataset) -> Classifier:
    """The classifier of ``cfg`` (loss statistics from ``train_set``)."""
    return build_classifier(cfg.model.arch, train_set.num_classes, cfg.model.loss, cfg.model.loss_kwargs,
                            train_set=train_set, **cfg.model.arch_kwargs)


def _init_crt(cfg: ClassifyConfig, model: Classifier) -> None:
    """cRT: ``features.*`` from ``model.init_from``, frozen; ``fc`` fresh."""
    state = load_checkpoint(cfg.model.init_from)
    feats = {k[len("features."):]: v for k, v in state["model"].items() if k.startswith("features.")}
    if not feats:
        raise ConfigError(f"model.init_from: {cfg.model.init_from} holds no classifier features (features.*)")
    try:
        model.features.load_state_dict(feats)
    except RuntimeError as e:
        raise ConfigError(f"model.init_from: {cfg.model.init_from} does not fit model.arch "
                          f"{cfg.model.arch!r}: {str(e).splitlines()[0]}") from None
    for p in model.features.parameters():
        p.requires_grad_(False)
    model.reset_classifier()


def train_classifier(cfg: ClassifyConfig, resume: bool = False, progress: bool = True, *,
                     evaluate: bool = True, hooks=()) -> dict[str, Any]:
    """Train the classifier of ``cfg``; returns ``{"run_dir", "checkpoint", "metrics"}``."""
    init_distributed(cfg.train.device)
    setup_logging()
    device = resolve_device(cfg.train.device)
    inputs = {"data.manifest": cfg.data.manifest, "model.init_from": cfg.model.init_from}
    run_dir = check_run_dir(cfg, resume, inputs)
    manifest, train_set = load_data(cfg)
    check_posthoc_splits(cfg.eval.posthoc, manifest, cfg.data.manifest)  # before training, not after
    seed_all(cfg.train.seed)
    model = build_for_config(cfg, train_set)
    if cfg.model.stage == "crt":
        _init_crt(cfg, model)
    sampler = build_sampler(train_set, cfg.data.sampler, seed=cfg.train.seed)
    run_dir = prepare_run_dir(cfg, resume)
    model.to(device)
    log.info("training %s (%s) on %d images, %d classes (%s sampler), %d process(es) x batch %d, device %s",
             cfg.model.arch, cfg.model.loss, len(train_set), train_set.num_classes, cfg.data.sampler,
             get_world_size(), cfg.data.batch_size, device)
    ckpt = run_training(model, train_set, cfg.train, run_dir, sampler=sampler, batch_size=cfg.data.batch_size,
                        num_workers=cfg.data.num_workers, device=device, resume=resume, progress=progress,
                        config_dict=cfg.to_dict(), hooks=hooks)
    metrics: dict = {}
    if evaluate and is_main_process():  # one process evaluates and writes (the model is the same on all)
        metrics = evaluate_classifier(cfg, ckpt, model=model, out_dir=run_dir, progress=progress)
    return {"run_dir": run_dir, "checkpoint": ckpt, "metrics": metrics}


def model_from_checkpoint(cfg: ClassifyConfig, checkpoint: str, train_set: ClassificationDataset,
                          device: torch.device) -> Classifier:
    """The classifier of ``cfg`` with the weights of ``checkpoint`` (clear error if they do not fit)."""
    state = load_checkpoint(checkpoint)
    model = build_for_config(cfg, train_set)
    load_model_weights(model, state["model"], checkpoint, None)
    return model.to(device)


def evaluate_classifier(cfg: ClassifyConfig, checkpoint: str, *, model: Classifier | None = None,
                        out_dir: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (raw logits and the post-hoc methods of ``eval.posthoc``); writes
    ``metrics.json`` and ``per_class_accuracy.png`` to ``out_dir`` (default: the checkpoint's
    directory). See :func:`taildet.classify.posthoc.evaluate_features`."""
    device = resolve_device(cfg.train.device)
    manifest, train_set = load_data(cfg, augment=False)
    if model is None:
        model = model_from_checkpoint(cfg, checkpoint, train_set, device)
    out_dir = out_dir or os.path.dirname(os.path.abspath(checkpoint))
    return evaluate_model(cfg, model, manifest, train_set, out_dir, device, checkpoint=checkpoint)
