"""Starting a run from another run's weights: the stage 2 of a decoupled recipe (cRT / LOCE style).

:func:`taildet.engine.train.train` calls these for any config; they do nothing unless the config
asks (``model.init_from``, ``train.freeze``, ``train.mfs.enabled``):

1. :func:`init_from_checkpoint` loads the weights of ``model.init_from`` (not on a resume that
   has a checkpoint: those weights come from it): strict, except that the classifier may be
   re-initialised (``model.reset_classifier``) and buffers of the loss may be new or gone (a new
   loss). Every key not loaded is reported; any other mismatch is a ConfigError. It then freezes
   the parameters whose names match one of the ``train.freeze`` regular expressions
   (``re.search`` on names like ``backbone.body.conv1.weight``; presets in
   :data:`taildet.config.FREEZE_PRESETS`); BatchNorm layers inside frozen parts stay in eval mode.
   With ``train.mfs.enabled`` it checks that backbone, FPN and shared box FCs are frozen
   (ConfigError otherwise, unless ``train.mfs.allow_stale_features``).
2. :func:`setup_mfs` attaches LOCE's memory-augmented feature sampling as
   ``model.roi_heads.mfs`` and pre-fills its memory with a class-balanced pass (also after a
   resume: the memory is not checkpointed; the loss's mean score is, and the resumed run
   continues from the checkpointed value).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch

from taildet.engine.checkpoint import check_finite_weights, last_checkpoint, load_checkpoint
from taildet.errors import ConfigError
from taildet.losses.base import ClassificationLoss
from taildet.models.heads import remap_legacy_keys
from taildet.sampling.mfs import MemoryAugmentedSampling, attach_mfs, check_frozen_features
from taildet.sampling.prefill import prefill_memory
from taildet.utils.comm import get_rank

__all__ = ["init_from_checkpoint", "setup_mfs", "load_stage1_weights", "freeze_parameters", "CLASSIFIER_PATTERNS"]

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
        raise ConfigError(f"{source}: the weights of model.init_from do not fit the model: {shown}. "
                          "Use the same model.arch/backbone/num_classes (model.reset_classifier "
                          "re-initialises only the classifier)")
    model.load_state_dict(to_load, strict=False)
    if not_loaded:
        log.info("model.init_from: not loaded from %s (kept as initialised): %s", source, ", ".join(not_loaded))
    if ignored:
        log.info("model.init_from: ignored from %s: %s", source, ", ".join(ignored))
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
        raise ConfigError(f"train.freeze: pattern(s) {unused} match no parameter of the model "
                          f"(names look like {next(iter(dict(model.named_parameters())), '?')})")
    return frozen


def init_from_checkpoint(cfg, model: torch.nn.Module, run_dir: str, resume: bool) -> dict | None:
    """Stage 2 of ``cfg`` on the freshly built ``model``: load ``model.init_from`` (unless a
    resume continues from a checkpoint of ``run_dir``), re-initialise the classifier
    (``model.reset_classifier``), freeze ``train.freeze``, check MFS's frozen features. Returns
    ``{"not_loaded", "trainable_parameters"}``, or None when the config asks for none of it."""

    mc, tc = cfg.model, cfg.train
    if mc.init_from is None and not (tc.freeze or tc.mfs.enabled or mc.reset_classifier):
        return None
    if mc.reset_classifier and mc.init_from is None:
        raise ConfigError("model.reset_classifier: re-initialises the classifier of the weights loaded from "
                          "model.init_from: set model.init_from (e.g. taildet finetune CONFIG --from CKPT)")
    report = {"not_loaded": [], "ignored": []}
    if mc.init_from is not None and not (resume and last_checkpoint(run_dir) is not None):
        state = load_checkpoint(mc.init_from)
        report = load_stage1_weights(model, state["model"], reset_classifier=mc.reset_classifier,
                                     source=str(mc.init_from))
        if mc.reset_classifier:
            _reinit_classifier(model)
    frozen = freeze_parameters(model, tc.freeze)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("train.freeze: %d of %d parameters trainable (%d tensors frozen by %s)", trainable, total,
             len(frozen), tc.freeze)
    if tc.mfs.enabled:
        check_frozen_features(model, tc.mfs.allow_stale_features)
    return {"not_loaded": report["not_loaded"], "trainable_parameters": trainable}



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


def setup_mfs(cfg, model: torch.nn.Module, train_dataset, device: torch.device, resume_dir: str | None,
               seed: int, progress: bool) -> None:
    """Attach MFS (``cfg.train.mfs``) to ``model`` and pre-fill its memory.

    On a resume the newest checkpoint's weights are loaded first, so the pre-fill sees the
    fine-tuned model (``run_training`` loads the same checkpoint again, which also restores the
    loss's mean score exactly as it was saved).
    """

    mc = cfg.train.mfs
    check_frozen_features(model, mc.allow_stale_features)  # before allocating the memory
    instance_counts = None
    if mc.prior == "instance_counts":
        instance_counts = getattr(train_dataset, "instance_counts", None)
        if instance_counts is None:
            raise ConfigError("train.mfs.prior: 'instance_counts' needs a training set with instance_counts")
    mfs = MemoryAugmentedSampling.from_model(
        model, capacity=mc.capacity, classes_per_iter=mc.classes_per_iter, samples_per_class=mc.samples_per_class,
        boxes_per_gt=mc.boxes_per_gt, jitter=mc.jitter, dtype=mc.dtype,
        device=device if mc.device == "auto" else "cpu", prior=mc.prior, instance_counts=instance_counts,
        seed=seed * 1000 + get_rank() + 1)
    attach_mfs(model, mfs, allow_stale_features=mc.allow_stale_features)
    ckpt = last_checkpoint(resume_dir) if resume_dir is not None else None
    if ckpt is not None:
        model.load_state_dict(load_checkpoint(ckpt)["model"])
    log.info("train.mfs: %r", mfs)
    prefill_memory(model, train_dataset, images_per_class=mc.prefill_images_per_class,
                   batch_size=cfg.data.batch_size, device=device, seed=seed, num_workers=cfg.data.num_workers,
                   progress=progress)
