"""``finetune(cfg, ckpt)``: a decoupled stage 2 (cRT / LOCE style) from a stage-1 checkpoint.

A stage-2 config is an ordinary config (``_base_:`` its stage 1, ``model.init_from``,
``train.freeze``, its loss / schedule / sampler / ``train.mfs`` in the normal sections; see
:mod:`taildet.config`), trained by :func:`taildet.engine.train.train`. ``finetune`` is that with
``model.init_from`` set to ``from_checkpoint`` (``taildet finetune CONFIG --from CKPT``); the
stage-2 steps themselves are in :mod:`taildet.engine.stage2`.
"""

from __future__ import annotations

import copy

from taildet.engine.stage2 import CLASSIFIER_PATTERNS, freeze_parameters, load_stage1_weights
from taildet.engine.train import train

__all__ = ["finetune", "load_stage1_weights", "freeze_parameters", "CLASSIFIER_PATTERNS"]


def finetune(cfg, from_checkpoint: str, resume: bool = False, progress: bool = True, **kwargs) -> dict:
    """``train(cfg with model.init_from = from_checkpoint, ...)``: returns ``{"run_dir",
    "checkpoint", "metrics", "trainable_parameters", "not_loaded"}``. ``resume`` continues an
    interrupted fine-tune from ``cfg.output_dir`` (the stage-1 weights are then not read again).
    Keyword arguments (``evaluate``, ``model``, ``train_dataset``, ``hooks``, ...) go to ``train``."""
    cfg = copy.deepcopy(cfg)
    cfg.model.init_from = str(from_checkpoint)
    return train(cfg, resume=resume, progress=progress, **kwargs)
