"""Run configuration: nested dataclasses loaded from YAML, validated, with ``_base_`` inheritance.

A config file has up to five sections (every key optional, defaults below)::

    _base_: demo_faster_tiny_ce.yaml      # optional; path relative to this file
    model:    {arch, num_classes, init_from, reset_classifier, <builder kwargs: backbone, loss, ...>}
    data:     {synthetic: {seed, scale} | train_json/val_json/image_root/val_image_root, sampler, ...}
    train:    {iterations | epochs, lr, schedule, steps, warmup_iters, grad_clip, amp, seed, ...,
               freeze: [regexes] | preset name,
               mfs: {enabled, capacity, classes_per_iter, samples_per_class, boxes_per_gt, jitter,
                     dtype, device, prior, allow_stale_features, prefill_images_per_class}}
    eval:     {enabled, max_dets, score_thresh, iou_types, fixed, fixed_dets_per_img, batch_size}
    output_dir: runs/my_run

A decoupled stage 2 (cRT, Balanced Softmax, LOCE, ...) is an ordinary config: ``_base_:`` its
stage-1 config, ``model.init_from:`` the stage-1 checkpoint (``taildet finetune CONFIG --from
CKPT`` sets it), ``train.freeze:`` what stays fixed, and its loss, schedule and sampler in
``model:``, ``train:`` and ``data:``. The ``finetune:`` section of earlier versions is gone: a
file that has one is a ConfigError that shows the same settings written the new way
(:func:`stage2_from_finetune_section`); run directories written with one still resume
(:func:`upgrade_saved_config`).

A derived file is merged onto its base key by key (dicts recursively, everything else replaced),
then validated as a whole. Every problem is a :class:`taildet.errors.ConfigError` that names the
dotted key and the file, e.g. ``configs/x.yaml: train.lr: expected a positive number, got -1``.

Command-line overrides (``apply_overrides(cfg, ["train.lr=0.01"])``) parse each value as YAML
and go through the same validation. Numbers in exponent notation without a dot (``1e-3``) are
numbers, as in YAML 1.2 (PyYAML alone would read them as strings); a key given twice in one
section is an error; YAML syntax errors are one line naming the file, line and column.

The package, in import order: :mod:`~taildet.config.validators` (value checks),
:mod:`~taildet.config.schema` (the section dataclasses), :mod:`~taildet.config.merge` (``_base_``
merging), :mod:`~taildet.config.validate` (keys, values and cross-section checks, names read from
the registries), :mod:`~taildet.config.upgrade` (the former ``finetune:`` section),
:mod:`~taildet.config.loading` (YAML files, overrides, saving).
"""

from __future__ import annotations

from taildet.config.loading import apply_overrides, config_from_dict, load_config, save_config
from taildet.config.schema import (
    DEFAULT_FREEZE, FREEZE_PRESETS, MODEL_KWARG_CHECKS, Config, DataConfig, EvalConfig, MFSConfig, ModelConfig,
    SyntheticConfig, TrainConfig,
)
from taildet.config.schema import _to_dict as _to_dict  # tests compare saved configs with it
from taildet.config.upgrade import stage2_from_finetune_section, upgrade_saved_config
from taildet.config.validators import MAX_LR

__all__ = [
    "Config",
    "ModelConfig",
    "DataConfig",
    "SyntheticConfig",
    "TrainConfig",
    "MFSConfig",
    "EvalConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "save_config",
    "DEFAULT_FREEZE",
    "FREEZE_PRESETS",
    "stage2_from_finetune_section",
    "upgrade_saved_config",
    "MODEL_KWARG_CHECKS",
    "MAX_LR",
]
