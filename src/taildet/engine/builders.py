"""What the engine builds from a :class:`taildet.config.Config`, for training, fine-tuning,
evaluation and calibration alike: datasets, the training sampler, the model (also the one a
checkpoint holds), the optimizer; and the run-time set-up (device, seeds, logging).
"""

from __future__ import annotations

import logging
import random
import sys

import numpy as np
import torch

from taildet.data.lvis import check_same_categories, load_lvis
from taildet.data.samplers import build_sampler
from taildet.data.synthetic import make_dataset
from taildet.data.transforms import build_transforms
from taildet.engine.pretrain import resolve_backbone_weights
from taildet.errors import ConfigError
from taildet.losses import dataset_statistics_needed, fill_dataset_statistics
from taildet.models import build_model
from taildet.utils.comm import broadcast_object, is_main_process

__all__ = [
    "setup_logging",
    "resolve_device",
    "seed_all",
    "build_datasets",
    "build_sampler",
    "build_model_from_cfg",
    "build_model_for_checkpoint",
    "loss_needs_train_statistics",
    "build_optimizer",
]

log = logging.getLogger("taildet.engine")


# ----------------------------------------------------------------------------- run-time set-up


def setup_logging() -> None:
    """Show taildet's INFO lines on stderr (rank 0) unless the application configured logging."""
    logger = logging.getLogger("taildet")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s taildet] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)


def resolve_device(device: str = "auto") -> torch.device:
    """``train.device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda`` (the current device)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda requested but no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- building blocks


def build_datasets(cfg, need_train: bool = True):
    """``(train_set | None, val_set | None, val_json | None)`` from ``cfg.data``.

    The annotation files are read and checked and every image file must exist (DataError listing
    the missing ones). ``need_train="annotations"``: the training set's annotations only (its
    statistics), its images are not needed.

    With ``data.synthetic`` the embedded dataset is generated (rank 0; others wait) or reused
    under ``data.root``. Val images are loaded without masks (inference needs none).
    """
    d = cfg.data
    if d.synthetic is not None:
        info = None
        if is_main_process():
            info = make_dataset(d.root, seed=d.synthetic.seed, scale=d.synthetic.scale,
                                vocabulary=d.synthetic.vocabulary, progress=False)
        info = broadcast_object(info)
        train_json, val_json = info["train_json"], info["val_json"]
        train_root = val_root = info["image_dir"]
    else:
        train_json, val_json = d.train_json, d.val_json
        train_root = d.image_root
        val_root = d.val_image_root or d.image_root
    train_set = val_set = None
    if need_train:
        train_set = load_lvis(train_json, train_root,
                              transforms=build_transforms(True, d.min_sizes, d.max_size, d.flip_prob),
                              with_masks=d.with_masks, skip_invalid=d.skip_invalid)
        if need_train != "annotations":
            train_set.check_image_files()  # at start-up, not as a DataError mid-run
    if val_json:
        val_set = load_lvis(val_json, val_root, transforms=build_transforms(False, d.min_sizes, d.max_size, 0.0),
                            with_masks=False, skip_invalid=d.skip_invalid)
        val_set.check_image_files()
        if train_set is not None:
            check_same_categories(train_set, val_set)  # a model's label j must mean one class in both
    elif not need_train:
        raise ConfigError("data.val_json: required for evaluation")
    return train_set, val_set, val_json


def build_model_from_cfg(cfg, num_classes: int, *, loss: str | None = None, loss_kwargs: dict | None = None,
                         train_dataset=None):
    """``taildet.models.build_model(arch, num_classes, **model kwargs)`` (loss optionally replaced).

    Losses whose constructor takes training-set statistics (``instance_counts``,
    ``image_counts``, ``image_frequency``: Balanced Softmax/Sigmoid, EQL, ...) get them from
    ``train_dataset`` unless the config's ``loss_kwargs`` sets them. ``model.backbone_weights:
    synthetic-pretrained`` becomes the cached pretrained tiny backbone's path (built on first use;
    see :mod:`taildet.engine.pretrain`).
    """
    if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} does not match the dataset's "
                          f"{num_classes} classes")
    kwargs = resolve_backbone_weights(cfg, dict(cfg.model.kwargs))
    if loss is not None:
        kwargs["loss"] = loss
    if loss_kwargs is not None:
        kwargs["loss_kwargs"] = dict(loss_kwargs)
    loss_name = kwargs.get("loss")
    if isinstance(loss_name, str) and dataset_statistics_needed(loss_name):
        kwargs["loss_kwargs"] = fill_dataset_statistics(loss_name, kwargs.get("loss_kwargs"), train_dataset)
    return build_model(cfg.model.arch, num_classes=num_classes, **kwargs)


def loss_needs_train_statistics(cfg, loss: str | None = None) -> bool:
    """True when the configured loss takes training-set statistics (see build_model_from_cfg)."""
    name = loss or cfg.model.kwargs.get("loss")
    given = (cfg.model.kwargs.get("loss_kwargs") or {}) if name == cfg.model.kwargs.get("loss") else {}
    return isinstance(name, str) and any(k not in given for k in dataset_statistics_needed(name))


_NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def build_optimizer(model: torch.nn.Module, tcfg) -> torch.optim.SGD:
    """SGD with momentum over trainable parameters; ``weight_decay_norm`` for norm/bias params."""
    decay, no_decay = [], []
    seen: set[int] = set()
    wd_norm = tcfg.weight_decay if tcfg.weight_decay_norm is None else tcfg.weight_decay_norm
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, _NORM_TYPES) or name == "bias":
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": wd_norm})
    if not decay and not no_decay:
        raise ConfigError("no trainable parameters (check train.freeze)")
    return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum)


def build_model_for_checkpoint(cfg, num_classes: int, train_set=None):
    """The model a checkpoint of ``cfg`` holds (a stage-2 config's loss is its ``model.loss``)."""
    return build_model_from_cfg(cfg, num_classes, train_dataset=train_set)
