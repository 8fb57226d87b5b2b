"""Decoupled stage-2 fine-tuning from a stage-1 checkpoint (cRT / LOCE style).

``finetune(cfg, from_checkpoint)``:

1. builds the model of ``cfg`` with ``finetune.loss`` / ``finetune.loss_kwargs`` when given;
2. loads the stage-1 weights: strict, except that the classifier may be re-initialised
   (``finetune.reset_classifier``) and buffers of the loss may be new or gone (a new loss). Every
   key not loaded is reported; any other mismatch is a ConfigError;
3. freezes parameters whose names match one of the ``finetune.freeze`` regular expressions
   (``re.search`` on names like ``backbone.body.conv1.weight``; default: LOCE's policy, backbone +
   FPN + shared box FCs). BatchNorm layers inside frozen parts stay in eval mode;
4. with ``finetune.mfs.enabled``: checks that backbone, FPN and shared box FCs are frozen
   (ConfigError otherwise, unless ``finetune.mfs.allow_stale_features``), attaches LOCE's
   memory-augmented feature sampling as ``model.roi_heads.mfs`` and pre-fills its memory with a
   class-balanced pass (also after a resume: the memory is not checkpointed; the loss's mean
   score is, and the resumed run continues from the checkpointed value);
5. trains with ``train:`` updated by ``finetune.train`` (and ``finetune.sampler``) through the same
   loop as :func:`taildet.engine.train.train`, into ``cfg.output_dir``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Sequence

import importlib

import torch

from taildet.engine.builders import (build_datasets, build_model_from_cfg, build_sampler, resolve_device,
                                     seed_all as _seed_all, setup_logging)
from taildet.engine.checkpoint import check_finite_weights, last_checkpoint, load_checkpoint
from taildet.engine.distributed import init_distributed
from taildet.engine.evaluate import post_eval as _post_eval
from taildet.engine.rundir import check_run_dir, check_val_gt, prepare_run_dir, run_inputs
from taildet.engine.train import frozen_norm_modules as _frozen_norm_modules
from taildet.errors import ConfigError
from taildet.losses.base import ClassificationLoss
from taildet.models.heads import remap_legacy_keys
from taildet.sampling.mfs import MemoryAugmentedSampling, attach_mfs, check_frozen_features
from taildet.sampling.prefill import prefill_memory
from taildet.utils.comm import get_rank, get_world_size

#: The trainer module (not ``taildet.engine.train``, the function): its ``run_training`` is looked
#: up when a fine-tune starts, so a replaced ``taildet.engine.train.run_training`` applies here too.
_trainer = importlib.import_module("taildet.engine.train")

__all__ = ["finetune", "load_stage1_weights", "freeze_parameters", "CLASSIFIER_PATTERNS"]

log = logging.getLogger("taildet.engine")

#: State-dict keys of the box classification layer (dropped by ``reset_classifier``): the R-CNN
#: box predictor's ``cls_score``, RetinaNet/FCOS's ``head.classification_head.cls_logits`` and
#: ATSS's ``head.cls_logits``. Anchored: the RPN's objectness layer (``rpn.head.cls_logits``) is
#: not a classifier and keeps its stage-1 weights.
CLASSIFIER_PATTERNS = [r"^roi_heads\.box_predictor\.cls_score\.", r"^head\.classification_head\.cls_logits\.",
                       r"^head\.cls_logits\."]

#: A key inside a loss module (by its name), for checkpoints whose loss differs from the model's.
_LOSS_KEY = re.compile(r"(^|\.)\w*loss\w*\.", re.IGNORECASE)


def _loss_prefixes(model: torch.nn.Module) -> list[str]:

    return [name + "." for name, m in model.named_modules() if isinstance(m, ClassificationLoss) and name]


def load_stage1_weights(model: torch.nn.Module, state_dict: dict, *, reset_classifier: bool = False,
                        source: str = "checkpoint") -> dict[str, list[str]]:
    """Load stage-1 weights into ``model``; returns ``{"not_loaded": [...], "ignored": [...]}``.

    Allowed gaps: classifier keys (when ``reset_classifier``) and loss buffers. Anything else
    missing, unexpected or of another shape raises ConfigError naming ``source`` and the keys.
    """

    check_finite_weights(state_dict, source)
    state_dict = dict(state_dict)
    remap_legacy_keys(state_dict)  # checkpoints saved before model.cls_head
    own = model.state_dict()
    loss_pre = _loss_prefixes(model)

    def is_loss(k: str) -> bool:
        return any(k.startswith(p) for p in loss_pre) or _LOSS_KEY.search(k) is not None

    def is_cls(k: str) -> bool:
        return any(re.search(p, k) for p in CLASSIFIER_PATTERNS)

    to_load, ignored, problems = {}, [], []
    for k, v in state_dict.items():
        if reset_classifier and is_cls(k):
            ignored.append(k)
        elif k not in own:
            if is_loss(k):
                ignored.append(k)
            else:
                problems.append(f"unexpected key {k}")
        elif own[k].shape != v.shape:
            if is_loss(k) or (reset_classifier and is_cls(k)):
                ignored.append(k)
            else:
                problems.append(f"{k}: shape {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model")
        else:
            to_load[k] = v
    not_loaded = [k for k in own if k not in to_load]
    for k in not_loaded:
        if not (is_loss(k) or (reset_classifier and is_cls(k))) and k not in ignored:
            problems.append(f"missing key {k}")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} in all)" if len(problems) > 10 else "")
        raise ConfigError(f"{source}: stage-1 weights do not fit the fine-tuning model: {shown}. "
                          "Use the same model.arch/backbone/num_classes (finetune.reset_classifier "
                          "re-initialises only the classifier)")
    model.load_state_dict(to_load, strict=False)
    if not_loaded:
        log.info("finetune: not loaded from %s (kept as initialised): %s", source, ", ".join(not_loaded))
    if ignored:
        log.info("finetune: ignored from %s: %s", source, ", ".join(ignored))
    return {"not_loaded": not_loaded, "ignored": ignored}


def freeze_parameters(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose name matches a pattern; returns their names.

    A pattern that matches no parameter is a ConfigError (a typo would silently train everything).
    """
    frozen, used = [], set()
    compiled = [(p, re.compile(p)) for p in patterns]
    for name, param in model.named_parameters():
        for pat, rx in compiled:
            if rx.search(name):
                param.requires_grad_(False)
                frozen.append(name)
                used.add(pat)
                break
    unused = [p for p, _ in compiled if p not in used]
    if unused:
        raise ConfigError(f"finetune.freeze: pattern(s) {unused} match no parameter of the model "
                          f"(names look like {next(iter(dict(model.named_parameters())), '?')})")
    return frozen


def _stage2_train_cfg(cfg):
    """``cfg.train`` updated with ``cfg.finetune.train``."""
    over = dict(cfg.finetune.train)
    if "iterations" in over and "epochs" not in over:
        over["epochs"] = None
    if "epochs" in over and "iterations" not in over:
        over["iterations"] = None
    return dataclasses.replace(copy.deepcopy(cfg.train), **over)


def finetune(cfg, from_checkpoint: str, resume: bool = False, progress: bool = True, *,
             evaluate: bool | None = None, model: torch.nn.Module | None = None, train_dataset=None,
             val_dataset=None, val_json: str | None = None, hooks=()) -> dict:
    """Stage-2 fine-tune of the model in ``from_checkpoint``; returns ``{"run_dir", "checkpoint",
    "metrics", "trainable_parameters", "not_loaded"}``. ``resume`` continues an interrupted
    fine-tune from ``cfg.output_dir`` (the stage-1 weights are then not needed again)."""

    ft = cfg.finetune
    tcfg = _stage2_train_cfg(cfg)
    init_distributed(tcfg.device)
    setup_logging()
    device = resolve_device(tcfg.device)
    # Checks first, the first write to the run directory last (see taildet.engine.train.train).
    run_dir = check_run_dir(cfg, resume, {**run_inputs(cfg), "--from checkpoint": str(from_checkpoint)})
    if train_dataset is None:
        train_dataset, built_val, built_json = build_datasets(cfg)
        val_dataset = val_dataset if val_dataset is not None else built_val
        val_json = val_json or built_json
    _seed_all(tcfg.seed)
    if model is None:
        model = build_model_from_cfg(cfg, train_dataset.num_classes, loss=ft.loss, loss_kwargs=ft.loss_kwargs,
                                     train_dataset=train_dataset)
    report = {"not_loaded": [], "ignored": []}
    if not (resume and last_checkpoint(run_dir) is not None):
        state = load_checkpoint(from_checkpoint)
        report = load_stage1_weights(model, state["model"], reset_classifier=ft.reset_classifier,
                                     source=str(from_checkpoint))
        if ft.reset_classifier:
            _reinit_classifier(model)
    frozen = freeze_parameters(model, ft.freeze)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("finetune: %d of %d parameters trainable (%d tensors frozen by %s)", trainable, total,
             len(frozen), ft.freeze)
    sampler_name = ft.sampler or cfg.data.sampler
    sampler = build_sampler(train_dataset, sampler_name, seed=tcfg.seed, rfs_threshold=cfg.data.rfs_threshold,
                            rfs_rounding=cfg.data.rfs_rounding)
    if ft.mfs.enabled:

        check_frozen_features(model, ft.mfs.allow_stale_features)
    do_eval = cfg.eval.enabled if evaluate is None else evaluate
    if do_eval and val_dataset is not None and val_json:
        check_val_gt(cfg, val_json)
    run_dir = prepare_run_dir(cfg, resume)
    model.to(device)
    if ft.mfs.enabled:
        _setup_mfs(cfg, model, train_dataset, device, run_dir if resume else None, tcfg.seed, progress)
    log.info("finetune on %d images (%s sampler), %d process(es)", len(train_dataset), sampler_name,
             get_world_size())
    cfg_dict = cfg.to_dict()
    cfg_dict["finetune"]["from_checkpoint"] = str(from_checkpoint)
    ckpt = _trainer.run_training(model, train_dataset, tcfg, run_dir, sampler=sampler, batch_size=cfg.data.batch_size,
                        num_workers=cfg.data.num_workers, device=device, resume=resume, progress=progress,
                        config_dict=cfg_dict, hooks=hooks, frozen_norms=_frozen_norm_modules(model))
    metrics: dict = {}
    if do_eval and val_dataset is not None and val_json:
        metrics = _post_eval(cfg, model, val_dataset, val_json, run_dir, device, progress)
    return {"run_dir": run_dir, "checkpoint": ckpt, "metrics": metrics, "trainable_parameters": trainable,
            "not_loaded": report["not_loaded"]}


def _reinit_classifier(model: torch.nn.Module) -> None:
    """Re-initialise classifier layers (normal(0, 0.01) weights; bias from the loss when it has
    ``init_bias``, else zeros)."""

    losses = [m for m in model.modules() if isinstance(m, ClassificationLoss)]
    for name, m in model.named_modules():
        if any(re.search(p, name + ".") for p in CLASSIFIER_PATTERNS):
            w = getattr(m, "weight", None)
            b = getattr(m, "bias", None)
            with torch.no_grad():
                if isinstance(w, torch.Tensor):
                    torch.nn.init.normal_(w, std=0.01)
                if isinstance(b, torch.Tensor):
                    if losses and b.numel() == losses[0].num_outputs():
                        losses[0].init_bias(b)
                    else:
                        b.zero_()


def _setup_mfs(cfg, model: torch.nn.Module, train_dataset, device: torch.device, resume_dir: str | None,
               seed: int, progress: bool) -> None:
    """Attach MFS (``cfg.finetune.mfs``) to ``model`` and pre-fill its memory.

    On a resume the newest checkpoint's weights are loaded first, so the pre-fill sees the
    fine-tuned model (``run_training`` loads the same checkpoint again, which also restores the
    loss's mean score exactly as it was saved).
    """

    mc = cfg.finetune.mfs
    check_frozen_features(model, mc.allow_stale_features)  # before allocating the memory
    instance_counts = None
    if mc.prior == "instance_counts":
        instance_counts = getattr(train_dataset, "instance_counts", None)
        if instance_counts is None:
            raise ConfigError("finetune.mfs.prior: 'instance_counts' needs a training set with instance_counts")
    mfs = MemoryAugmentedSampling.from_model(
        model, capacity=mc.capacity, classes_per_iter=mc.classes_per_iter, samples_per_class=mc.samples_per_class,
        boxes_per_gt=mc.boxes_per_gt, jitter=mc.jitter, dtype=mc.dtype,
        device=device if mc.device == "auto" else "cpu", prior=mc.prior, instance_counts=instance_counts,
        seed=seed * 1000 + get_rank() + 1)
    attach_mfs(model, mfs, allow_stale_features=mc.allow_stale_features)
    ckpt = last_checkpoint(resume_dir) if resume_dir is not None else None
    if ckpt is not None:
        model.load_state_dict(load_checkpoint(ckpt)["model"])
    log.info("finetune: %r", mfs)
    prefill_memory(model, train_dataset, images_per_class=mc.prefill_images_per_class,
                   batch_size=cfg.data.batch_size, device=device, seed=seed, num_workers=cfg.data.num_workers,
                   progress=progress)
