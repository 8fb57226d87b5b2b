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
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from taildet.errors import ConfigError
from taildet.fileio import atomic_write_text

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
]

# ----------------------------------------------------------------------------- validators
# A validator takes (value, dotted_key) and returns the normalised value or raises ConfigError.


class _Invalid(Exception):
    """Raised by validators; turned into a ConfigError naming key and file."""


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def v_any(v):
    return v


def v_bool(v):
    if not isinstance(v, bool):
        raise _Invalid(f"expected true or false, got {_fmt(v)}")
    return v


def v_str(v):
    if not isinstance(v, str) or not v:
        raise _Invalid(f"expected a non-empty string, got {_fmt(v)}")
    return v


def v_opt(inner):
    def check(v):
        return None if v is None else inner(v)

    return check


def v_enum(*choices):
    def check(v):
        if v not in choices:
            raise _Invalid(f"expected one of {', '.join(map(str, choices))}, got {_fmt(v)}")
        return v

    return check


def v_pos_num(v):
    if not _is_num(v) or v <= 0:
        raise _Invalid(f"expected a positive number, got {_fmt(v)}")
    return float(v)


def v_nonneg_num(v):
    if not _is_num(v) or v < 0:
        raise _Invalid(f"expected a non-negative number, got {_fmt(v)}")
    return float(v)


def v_fraction(v):
    if not _is_num(v) or not 0 <= v <= 1:
        raise _Invalid(f"expected a number in [0, 1], got {_fmt(v)}")
    return float(v)


def v_open_fraction(v):
    if not _is_num(v) or not 0 < v <= 1:
        raise _Invalid(f"expected a number in (0, 1], got {_fmt(v)}")
    return float(v)


def _int(v, minimum):
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise _Invalid(f"expected an integer >= {minimum}, got {_fmt(v)}")
    if v < minimum:
        raise _Invalid(f"expected an integer >= {minimum}, got {_fmt(v)}")
    return v


def v_pos_int(v):
    return _int(v, 1)


def v_nonneg_int(v):
    return _int(v, 0)


def v_int(v):
    return _int(v, -(2**63))


def v_list(inner, min_len=0):
    def check(v):
        if isinstance(v, tuple):
            v = list(v)
        if not isinstance(v, list):
            v = [v]
        if len(v) < min_len:
            raise _Invalid(f"expected a list of at least {min_len} item(s), got {_fmt(v)}")
        out = []
        for i, item in enumerate(v):
            try:
                out.append(inner(item))
            except _Invalid as e:
                raise _Invalid(f"item {i}: {e}") from None
        return out

    return check


def v_dict(v):
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _Invalid(f"expected a mapping, got {_fmt(v)}")
    return dict(v)


def v_regex(v):
    v = v_str(v)
    try:
        re.compile(v)
    except re.error as e:
        raise _Invalid(f"invalid regular expression {v!r}: {e}") from None
    return v


def v_rfs_threshold(v):
    if v == "auto":
        return v
    if not _is_num(v) or not 0 < v <= 1:
        raise _Invalid(f'expected "auto" or a number in (0, 1], got {_fmt(v)}')
    return float(v)


def v_steps(v):
    v = v_list(lambda x: x)(v)
    out = []
    for i, s in enumerate(v):
        if not _is_num(s) or s <= 0:
            raise _Invalid(f"item {i}: expected a fraction in (0, 1) or an iteration >= 1, got {_fmt(s)}")
        if isinstance(s, float) and s >= 1 and not s.is_integer():
            raise _Invalid(f"item {i}: expected a fraction in (0, 1) or a whole iteration, got {_fmt(s)}")
        out.append(s if s < 1 else int(s))
    if out != sorted(out):
        raise _Invalid(f"expected increasing values, got {_fmt(out)}")
    return out


def v_sizes(v):
    return v_list(v_pos_int, min_len=1)(v)


def v_int_or_ints(v):
    if isinstance(v, (list, tuple)):
        return v_list(v_pos_int, min_len=1)(v)
    return v_pos_int(v)


def v_path(v):
    return v_str(v)


def v_lr(v):
    """A learning rate: finite, > 0 and at most :data:`MAX_LR` (a larger one overflows inside the
    optimizer or diverges on the first step)."""
    v = v_pos_num(v)
    if v > MAX_LR:
        raise _Invalid(f"expected a learning rate of at most {MAX_LR:g} (a larger one overflows or diverges "
                       f"at once), got {_fmt(v)}")
    return v


#: Largest learning rate the config accepts.
MAX_LR = 10.0


def v_pos_num_list(v):
    if isinstance(v, tuple):
        v = list(v)
    if not isinstance(v, list) or not v:
        raise _Invalid(f"expected a non-empty list of positive numbers, got {_fmt(v)}")
    for i, x in enumerate(v):
        if not _is_num(x) or x <= 0:
            raise _Invalid(f"item {i}: expected a positive number, got {_fmt(x)}")
    return list(v)


def v_anchor_sizes(v):
    """``null`` or one list of positive integer sizes per feature level, e.g. ``[[32], [64]]``."""
    if v is None:
        return None
    if isinstance(v, tuple):
        v = list(v)
    if not isinstance(v, list) or not v or not all(isinstance(level, (list, tuple)) for level in v):
        raise _Invalid(f"expected one list of anchor sizes per feature level, e.g. [[32], [64, 128]], got {_fmt(v)}")
    out = []
    for i, level in enumerate(v):
        try:
            out.append(v_list(v_pos_int, min_len=1)(list(level)))
        except _Invalid as e:
            raise _Invalid(f"level {i}: {e}") from None
    return out


def v_aspect_ratios(v):
    """Positive numbers, or one list of them per feature level."""
    if isinstance(v, (list, tuple)) and v and all(isinstance(level, (list, tuple)) for level in v):
        out = []
        for i, level in enumerate(v):
            try:
                out.append(v_pos_num_list(level))
            except _Invalid as e:
                raise _Invalid(f"level {i}: {e}") from None
        return out
    return v_pos_num_list(v)


def v_rgb(v):
    if v is None:
        return None
    out = v_pos_num_list(v) if isinstance(v, (list, tuple)) else None
    if out is None or len(out) != 3:
        raise _Invalid(f"expected null or 3 positive numbers (R, G, B), got {_fmt(v)}")
    return out


def v_rgb_mean(v):
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(_is_num(x) for x in v):
        raise _Invalid(f"expected null or 3 numbers (R, G, B), got {_fmt(v)}")
    return list(v)


def v_trainable_layers(v):
    v = v_nonneg_int(v)
    if v > 5:
        raise _Invalid(f"expected an integer in 0..5 (stages that train, counted from the last; "
                       f"5 = all, tiny: 4 or more = all), got {_fmt(v)}")
    return v


def _f(default, check, help=""):
    """A dataclass field with a validator (and a default; lists/dicts are copied)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"check": check, "help": help})
    return field(default=default, metadata={"check": check, "help": help})


# ----------------------------------------------------------------------------- sections

#: Builder kwargs of ``taildet.models.build_model`` that the config knows and checks. Other keys
#: under ``model:`` are passed on unchecked; ``build_model`` raises ConfigError for unknown ones.
MODEL_KWARG_CHECKS: dict[str, Callable[[Any], Any]] = {
    "backbone": v_str,
    "backbone_weights": v_opt(v_str),
    "norm": v_opt(v_str),
    "loss": v_str,
    "loss_kwargs": v_dict,
    "classifier": v_enum("linear", "cosine"),
    "logit_bn": v_bool,
    "logit_bn_momentum": v_open_fraction,
    "min_size": v_int_or_ints,
    "max_size": v_pos_int,
    "fixed_size": v_bool,
    "score_thresh": v_fraction,
    "nms_thresh": v_fraction,
    "detections_per_img": v_pos_int,
    "box_batch_size_per_image": v_pos_int,
    "box_positive_fraction": v_open_fraction,
    "box_detections_per_img": v_pos_int,
    "box_score_thresh": v_fraction,
    "box_nms_thresh": v_fraction,
    "rpn_batch_size_per_image": v_pos_int,
    "rpn_positive_fraction": v_open_fraction,
    "anchor_sizes": v_anchor_sizes,
    "aspect_ratios": v_aspect_ratios,
    "anchor_scales": v_pos_num_list,
    "rpn_pre_nms_top_n_train": v_pos_int,
    "rpn_post_nms_top_n_train": v_pos_int,
    "rpn_pre_nms_top_n_test": v_pos_int,
    "rpn_post_nms_top_n_test": v_pos_int,
    "representation_size": v_pos_int,
    "class_agnostic_box_reg": v_bool,
    "fpn": v_opt(v_bool),
    "mask_layers": v_opt(v_list(v_pos_int, min_len=1)),
    "backbone_kwargs": v_opt(v_dict),
    "image_mean": v_rgb_mean,
    "image_std": v_rgb,
    "head_norm": v_opt(v_enum("none", "gn", "bn")),
    "topk_candidates": v_pos_int,
    "fg_iou_thresh": v_fraction,
    "bg_iou_thresh": v_fraction,
    "num_convs": v_nonneg_int,
    "center_sampling_radius": v_nonneg_num,
    "topk": v_pos_int,
    "quality_branch": v_bool,
    "pre_nms_top_n": v_pos_int,
    "giou_weight": v_nonneg_num,
    "trainable_backbone_layers": v_trainable_layers,
}


@dataclass
class ModelConfig:
    """``model:`` -- the detector. ``kwargs`` holds every builder keyword (flat in the YAML)."""

    arch: str = _f("faster_rcnn", v_enum("faster_rcnn", "mask_rcnn", "retinanet", "fcos", "atss"))
    num_classes: int | None = _f(None, v_opt(v_pos_int), "default: the training set's")
    init_from: str | None = _f(None, v_opt(v_path), "checkpoint whose weights start the run (stage 2)")
    reset_classifier: bool = _f(False, v_bool, "with init_from: re-initialise the classifier")
    kwargs: dict = field(default_factory=dict)


@dataclass
class SyntheticConfig:
    """``data.synthetic:`` -- the embedded long-tail generator (taildet.data.synthetic)."""

    seed: int = _f(0, v_nonneg_int)
    scale: float = _f(1.0, v_pos_num)
    vocabulary: str = _f("default", v_enum("default", "lvis"),
                         "default: 48 classes; lvis: 150 with LVIS v1's r/c/f shares (use scale ~0.25)")


@dataclass
class DataConfig:
    """``data:`` -- datasets, sampler, transforms and loader."""

    synthetic: SyntheticConfig | None = None
    root: str = _f("runs/data/synthetic", v_path, "output directory of the synthetic generator")
    train_json: str | None = _f(None, v_opt(v_path))
    val_json: str | None = _f(None, v_opt(v_path))
    image_root: str | None = _f(None, v_opt(v_path))
    val_image_root: str | None = _f(None, v_opt(v_path))
    sampler: str = _f("random", v_enum("random", "rfs", "class_balanced"))
    # "auto" = 100 / number of training images: LVIS's t = 0.001 on ~100k images means "classes
    # seen in fewer than ~100 images get repeated"; on a 1k-image set t = 0.001 repeats nothing.
    rfs_threshold: float | str = _f(0.001, v_rfs_threshold)
    rfs_rounding: str = _f("stochastic", v_enum("stochastic", "ceil"))
    min_sizes: list = _f([800], v_sizes)
    max_size: int = _f(1333, v_pos_int)
    flip_prob: float = _f(0.5, v_fraction)
    with_masks: bool = _f(False, v_bool)
    batch_size: int = _f(2, v_pos_int, "images per process")
    num_workers: int = _f(2, v_nonneg_int)
    skip_invalid: bool = _f(False, v_bool)


#: Named ``train.freeze`` values. ``loce``: LOCE's fine-tuning policy, freeze the backbone (incl.
#: FPN, ``backbone.fpn``) and the shared box FCs; train the RPN, box regressor and classifier.
#: ``classifier_only``: everything but the box classifier (cRT, Balanced Sigmoid).
FREEZE_PRESETS = {
    "loce": [r"^backbone\.", r"^roi_heads\.box_head\."],
    "classifier_only": [r"^(?!roi_heads\.box_predictor\.cls_score\.)"],
}

#: LOCE's policy (``train.freeze: loce``), the freeze list of the former ``finetune:`` section.
DEFAULT_FREEZE = list(FREEZE_PRESETS["loce"])


def v_freeze(v):
    """Regular expressions of frozen parameter names; an item that is a key of
    :data:`FREEZE_PRESETS` (or the whole value) stands for that preset's patterns."""
    out = []
    for item in v_list(lambda x: x)(v):
        if isinstance(item, str) and item in FREEZE_PRESETS:
            out.extend(FREEZE_PRESETS[item])
        else:
            out.append(item)
    return v_list(v_regex)(out)


def v_jitter(v):
    if not _is_num(v) or not 0 < v < 0.5:
        raise _Invalid(f"expected a number in (0, 0.5), got {_fmt(v)}")
    return float(v)


@dataclass
class MFSConfig:
    """``train.mfs:`` -- LOCE's memory-augmented feature sampling (taildet.sampling)."""

    enabled: bool = _f(False, v_bool)
    capacity: int = _f(80, v_pos_int, "M: entries per class (LVIS, 256x7x7 fp16: ~2.4 GB at 80)")
    classes_per_iter: int = _f(8, v_pos_int, "k: classes drawn per iteration")
    samples_per_class: int = _f(4, v_pos_int, "m: entries drawn per drawn class")
    boxes_per_gt: int = _f(16, v_pos_int, "jittered boxes per GT (16 = one per sign pattern)")
    jitter: float = _f(1.0 / 6.0, v_jitter, "offset scale, fraction of the box size")
    dtype: str = _f("float16", v_enum("float16", "bfloat16", "float32"), "memory storage")
    device: str = _f("auto", v_enum("auto", "cpu"), "auto = the training device")
    prior: str = _f("mean_score", v_enum("mean_score", "instance_counts"), "sampler: 1/s_c or 1/n_c")
    allow_stale_features: bool = _f(False, v_bool, "allow trainable backbone/FPN/box FCs")
    prefill_images_per_class: int | None = _f(None, v_opt(v_pos_int), "null = ceil(capacity / 16)")


@dataclass
class TrainConfig:
    """``train:`` -- optimisation. Exactly one of ``iterations`` / ``epochs``."""

    iterations: int | None = _f(None, v_opt(v_pos_int))
    epochs: int | None = _f(None, v_opt(v_pos_int))
    lr: float = _f(0.02, v_lr)
    momentum: float = _f(0.9, v_fraction)
    weight_decay: float = _f(1e-4, v_nonneg_num)
    weight_decay_norm: float | None = _f(None, v_opt(v_nonneg_num), "wd of norm/bias params (null = same)")
    warmup_iters: int = _f(1000, v_nonneg_int)
    warmup_factor: float = _f(0.001, v_open_fraction)
    schedule: str = _f("step", v_enum("step", "cosine"))
    steps: list = _f([0.667, 0.889], v_steps, "fractions of the run (<1) or iterations (>=1)")
    gamma: float = _f(0.1, v_pos_num)
    grad_clip: float | None = _f(None, v_opt(v_pos_num), "max gradient norm; null = off")
    amp: bool = _f(False, v_bool, "CUDA only")
    seed: int = _f(0, v_nonneg_int)
    log_period: int = _f(20, v_pos_int)
    checkpoint_period: int | None = _f(None, v_opt(v_pos_int), "iterations; null = every epoch")
    device: str = _f("auto", v_enum("auto", "cpu", "cuda"))
    find_unused_parameters: bool = _f(False, v_bool, "DDP only")
    freeze: list = _f([], v_freeze, "regexes of parameter names kept fixed, or a FREEZE_PRESETS name")
    mfs: MFSConfig = field(default_factory=MFSConfig)


@dataclass
class EvalConfig:
    """``eval:`` -- evaluation after training and for ``taildet eval``."""

    enabled: bool = _f(True, v_bool)
    max_dets: int = _f(300, v_pos_int)
    score_thresh: float = _f(1e-4, v_fraction)
    iou_types: list | None = _f(None, v_opt(v_list(v_enum("bbox", "segm"), min_len=1)),
                                "null = bbox, plus segm with masks")
    fixed: bool = _f(False, v_bool, "AP-fixed (Dave et al.): no per-image cap, each class's 10,000 best")
    fixed_dets_per_img: int = _f(10000, v_pos_int, "with fixed: the detector's own per-image cap during inference")
    batch_size: int | None = _f(None, v_opt(v_pos_int), "null = data.batch_size")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = _f("runs/default", v_path)
    #: the file it was loaded from (not serialised)
    source: str | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """A plain nested dict that :func:`config_from_dict` turns back into this config."""
        return _to_dict(self)

    def iou_types(self) -> list[str]:
        if self.eval.iou_types:
            return list(self.eval.iou_types)
        return ["bbox", "segm"] if (self.data.with_masks or self.model.arch == "mask_rcnn") else ["bbox"]


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def _to_dict(obj) -> Any:
    if isinstance(obj, ModelConfig):
        d = {"arch": obj.arch, "num_classes": obj.num_classes, "init_from": obj.init_from,
             "reset_classifier": obj.reset_classifier}
        d.update(copy.deepcopy(obj.kwargs))
        return d
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "source"}
    return copy.deepcopy(obj)


# ----------------------------------------------------------------------------- building


def _err(file: str | None, key: str, msg: str) -> ConfigError:
    where = f"{file}: " if file else ""
    return ConfigError(f"{where}{key}: {msg}")


def _build_section(cls, raw: Any, prefix: str, file: str | None):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _err(file, prefix, f"expected a mapping, got {_fmt(raw)}")
    if cls is ModelConfig:
        return _build_model(raw, prefix, file)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}"
        if key not in names or key == "source":
            known = ", ".join(n for n in names if n != "source")
            raise _err(file, dotted, f"unknown key (known keys: {known})")
        f = names[key]
        if cls is DataConfig and key == "synthetic":
            kwargs[key] = None if value is None or value is False else _build_section(
                SyntheticConfig, {} if value is True else value, dotted, file)
            continue
        if cls is TrainConfig and key == "mfs":
            kwargs[key] = _build_section(MFSConfig, value, dotted, file)
            continue
        try:
            kwargs[key] = f.metadata["check"](value)
        except _Invalid as e:
            raise _err(file, dotted, str(e)) from None
    return cls(**kwargs)


def _build_model(raw: dict, prefix: str, file: str | None) -> ModelConfig:
    out = ModelConfig()
    for key, value in raw.items():
        dotted = f"{prefix}.{key}"
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise _err(file, dotted, "not a valid keyword name")
        try:
            if key in ("arch", "num_classes", "init_from", "reset_classifier"):
                setattr(out, key, ModelConfig.__dataclass_fields__[key].metadata["check"](value))
            elif key == "kwargs":
                raise _Invalid("put builder keywords directly under model:, not under model.kwargs")
            else:
                out.kwargs[key] = MODEL_KWARG_CHECKS.get(key, v_any)(value)
        except _Invalid as e:
            raise _err(file, dotted, str(e)) from None
    return out


def _check_whole(cfg: Config, file: str | None) -> Config:
    t = cfg.train
    if (t.iterations is None) == (t.epochs is None):
        both = "both are set" if t.iterations is not None else "neither is set"
        raise _err(file, "train.iterations", f"set exactly one of train.iterations and train.epochs ({both})")
    d = cfg.data
    if d.synthetic is not None and (d.train_json or d.val_json):
        raise _err(file, "data.synthetic", "set either data.synthetic or data.train_json/val_json, not both")
    if d.synthetic is None and not d.train_json:
        raise _err(file, "data.train_json", "required unless data.synthetic is set")
    mk = cfg.model.kwargs
    if "min_size" in mk and "max_size" in mk:
        smallest = min(mk["min_size"]) if isinstance(mk["min_size"], list) else mk["min_size"]
        if mk["max_size"] < smallest:
            raise _err(file, "model.max_size", f"must be >= model.min_size ({mk['min_size']}), got {mk['max_size']}")
    if "logit_bn" in mk or "logit_bn_momentum" in mk:
        key = "model.logit_bn" if "logit_bn" in mk else "model.logit_bn_momentum"
        if cfg.model.arch not in ("faster_rcnn", "mask_rcnn"):
            raise _err(file, key, f"the BatchNorm on the RoI classifier's logits needs a two-stage detector "
                                  f"(faster_rcnn or mask_rcnn), got model.arch {cfg.model.arch!r}")
        if "logit_bn_momentum" in mk and not mk.get("logit_bn"):
            raise _err(file, "model.logit_bn_momentum", "set model.logit_bn: true too (it is the momentum of "
                                                        "that BatchNorm's running statistics)")
        if mk.get("logit_bn") and cfg.train.mfs.enabled:
            raise _err(file, "train.mfs.enabled", "memory-augmented feature sampling runs the memory samples "
                                                     "through the classifier in a call of their own, which would "
                                                     "batch-normalise them apart: not supported with model.logit_bn")
    if cfg.model.arch == "mask_rcnn" and not d.with_masks:
        raise _err(file, "data.with_masks", "model.arch mask_rcnn trains on instance masks: set "
                   "data.with_masks: true (or use arch faster_rcnn for boxes only)")
    if mk.get("backbone_weights") == "synthetic-pretrained" and mk.get("backbone", "tiny") != "tiny":
        raise _err(file, "model.backbone_weights",
                   f"'synthetic-pretrained' is the pretrained tiny backbone (taildet pretrain-backbone); "
                   f"model.backbone is {mk.get('backbone')!r}: give a path to its weights instead")
    if mk.get("backbone_weights") is not None and mk.get("norm") == "gn":
        raise _err(file, "model.norm", "pretrained backbone weights hold BatchNorm statistics: use norm "
                   "'bn' (frozen when weights are given) or 'frozen_bn', not 'gn'")
    tbl = mk.get("trainable_backbone_layers")
    btl = (mk.get("backbone_kwargs") or {}).get("trainable_layers") if isinstance(
        mk.get("backbone_kwargs"), dict) else None
    if tbl is not None and btl is not None:
        raise _err(file, "model.trainable_backbone_layers",
                   "set model.trainable_backbone_layers or model.backbone_kwargs.trainable_layers, not both")
    if cfg.train.mfs.enabled and cfg.model.arch not in ("faster_rcnn", "mask_rcnn"):
        raise _err(file, "train.mfs.enabled",
                   f"memory-augmented feature sampling needs a two-stage detector (faster_rcnn or "
                   f"mask_rcnn), got model.arch {cfg.model.arch!r}")
    return cfg


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("loss_kwargs",):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _exclusive_fix(base: dict, over: dict) -> dict:
    """A derived file that sets train.epochs drops the base's train.iterations (and vice versa)."""
    bt, ot = base.get("train"), over.get("train")
    if isinstance(bt, dict) and isinstance(ot, dict):
        bt = dict(bt)
        if "epochs" in ot and "iterations" not in ot:
            bt.pop("iterations", None)
        if "iterations" in ot and "epochs" not in ot:
            bt.pop("epochs", None)
        base = {**base, "train": bt}
    bd, od = base.get("data"), over.get("data")
    if isinstance(bd, dict) and isinstance(od, dict):
        bd = dict(bd)
        if "train_json" in od and "synthetic" not in od:
            bd.pop("synthetic", None)
        if "synthetic" in od and "train_json" not in od:
            for k in ("train_json", "val_json", "image_root", "val_image_root"):
                bd.pop(k, None)
        base = {**base, "data": bd}
    return base


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping (PyYAML keeps the last
    silently, e.g. ``lr: 0.5`` and ``lr: 0.01`` on two lines of the same section)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)

# YAML 1.1 (PyYAML) reads ``1e-3`` as the string "1e-3" (its floats need a dot: ``1.0e-3``);
# YAML 1.2 and every other reader take it as a number. taildet does too: a config value written
# ``1e-3`` is the float 0.001, in files and in ``--opts`` overrides alike.
_FLOAT_RE = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789"))


def _yaml_error_text(e: yaml.YAMLError) -> str:
    """One line for a PyYAML error: the problem and where it is (PyYAML's own text spans lines
    and quotes the file)."""
    if isinstance(e, yaml.MarkedYAMLError):
        problem = " ".join(str(e.problem or e.context or "syntax error").split())
        mark = e.problem_mark or e.context_mark
        if "'\\t'" in problem or "\t" in problem:
            problem += " (YAML indents with spaces, not tabs)"
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return problem + where
    return " ".join(str(e).split())


def _yaml_load(text_or_stream):
    """``yaml.load`` with taildet's loader: safe, duplicate keys rejected, ``1e-3`` a number."""
    return yaml.load(text_or_stream, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: str, chain: tuple[str, ...] = ()) -> dict:
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"{path}: _base_: inheritance cycle ({' -> '.join(chain + (path,))})")
    if not os.path.isfile(path):
        where = f"{chain[-1]}: _base_: " if chain else ""
        raise ConfigError(f"{where}config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = _yaml_load(fh)  # safe: SafeLoader + duplicate-key check
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_error_text(e)}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    base = raw.pop("_base_", None)
    if base is None:
        return raw
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        if not isinstance(b, str):
            raise ConfigError(f"{path}: _base_: expected a file name, got {_fmt(b)}")
        bpath = b if os.path.isabs(b) else os.path.join(os.path.dirname(path), b)
        merged = _merge(merged, _read_yaml(bpath, chain + (path,)))
    return _merge(_exclusive_fix(merged, raw), raw)


# ----------------------------------------------------------------------------- the former finetune: section


def _old_finetune_defaults() -> dict:
    """The ``finetune:`` section as earlier versions saved it into every run's config.yaml (all
    defaults; ``taildet train`` never read it)."""
    return {"freeze": list(DEFAULT_FREEZE), "reset_classifier": False, "loss": None, "loss_kwargs": None,
            "sampler": None, "train": {}, "mfs": _to_dict(MFSConfig())}


def stage2_from_finetune_section(ft: dict | None) -> dict:
    """The settings of a former ``finetune:`` section written in the normal sections, as
    ``taildet finetune`` ran them: ``finetune.{loss, loss_kwargs, reset_classifier}`` ->
    ``model.*`` (``finetune.from_checkpoint``, which checkpoints recorded, -> ``model.init_from``),
    ``finetune.freeze`` (default: LOCE's policy) -> ``train.freeze``, ``finetune.train.*`` ->
    ``train.*``, ``finetune.mfs`` -> ``train.mfs``, ``finetune.sampler`` -> ``data.sampler``.
    Merged onto the stage-1 sections like a derived file onto its ``_base_``."""
    ft = dict(ft or {})
    model: dict = {"init_from": ft.get("from_checkpoint")}
    if ft.get("loss") is not None:
        model["loss"] = ft["loss"]
    if ft.get("loss_kwargs") is not None:
        model["loss_kwargs"] = ft["loss_kwargs"]
    if ft.get("reset_classifier"):
        model["reset_classifier"] = True
    freeze = ft["freeze"] if ft.get("freeze") is not None else list(DEFAULT_FREEZE)
    freeze = next((name for name, pats in FREEZE_PRESETS.items() if list(freeze) == pats), freeze)
    train = {"freeze": freeze, **(ft.get("train") or {})}
    if ft.get("mfs"):
        train["mfs"] = ft["mfs"]
    out = {"model": model, "train": train}
    if ft.get("sampler") is not None:
        out["data"] = {"sampler": ft["sampler"]}
    return out


def _with_stage2(raw: dict, ft: dict | None) -> dict:
    rest = {k: v for k, v in raw.items() if k != "finetune"}
    new = stage2_from_finetune_section(ft)
    return _merge(_exclusive_fix(rest, new), new)


def _finetune_section(raw: dict, file: str | None) -> dict:
    """A config with a ``finetune:`` section: the unused default section of an earlier run's
    config.yaml is dropped (with a warning); any other is a ConfigError showing the new spelling."""
    ft = raw["finetune"]
    if isinstance(ft, dict) and {k: v for k, v in ft.items() if k != "from_checkpoint"} == _old_finetune_defaults() \
            and not ft.get("from_checkpoint"):
        logging.getLogger("taildet.config").warning(
            "%s: ignoring its finetune: section (all defaults, as earlier versions saved it into every run's "
            "config; the section is gone: a stage 2 is an ordinary config with model.init_from)", file or "config")
        return {k: v for k, v in raw.items() if k != "finetune"}
    if not isinstance(ft, (dict, type(None))):
        raise _err(file, "finetune", f"expected a mapping, got {_fmt(ft)}")
    new = stage2_from_finetune_section(ft)
    new["model"]["init_from"] = new["model"]["init_from"] or "<the stage-1 model_final.pth>"
    text = yaml.safe_dump(new, sort_keys=False, default_flow_style=None, width=100)
    raise _err(file, "finetune", "the finetune: section is gone: a stage 2 is an ordinary config now. Keep "
               "_base_: <the stage-1 config> and write the finetune: settings in the normal sections "
               "(finetune.loss/loss_kwargs/reset_classifier -> model.*, finetune.train.* -> train.*, "
               "finetune.freeze -> train.freeze, finetune.mfs -> train.mfs, finetune.sampler -> data.sampler) "
               "with model.init_from, the stage-1 checkpoint (`taildet finetune CONFIG --from CKPT` sets it). "
               "This section (of the file or one of its _base_ files) becomes:\n" + text.rstrip())


def upgrade_saved_config(saved: dict, stage2: bool = False) -> dict:
    """A run's saved config (its config.yaml, a checkpoint's ``config``) in the current shape, for
    comparisons (the resume check). A ``finetune:`` section of an earlier version is merged into
    the normal sections when the run was a stage 2 (``stage2``, or the section names its
    ``from_checkpoint``), else dropped (the unused default every run saved). The result is
    validated and written back out, so keys added since compare equal to their defaults; a dict
    that does not validate any more is returned unchanged."""
    raw = copy.deepcopy(saved)
    if not isinstance(raw, dict):
        return raw
    if "finetune" in raw:
        ft = raw["finetune"] if isinstance(raw["finetune"], dict) else {}
        if stage2 or ft.get("from_checkpoint"):
            raw = _with_stage2(raw, ft)
        else:
            raw = {k: v for k, v in raw.items() if k != "finetune"}
    try:
        return config_from_dict(raw).to_dict()
    except ConfigError:
        return raw


def config_from_dict(raw: dict, file: str | None = None) -> Config:
    """Validate a nested dict (as in a YAML file, no ``_base_``) into a :class:`Config`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{file or 'config'}: expected a mapping at the top level")
    if "finetune" in raw:
        raw = _finetune_section(raw, file)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            kwargs[key] = _build_section(_SECTIONS[key], value, key, file)
        elif key == "output_dir":
            try:
                kwargs[key] = v_path(value)
            except _Invalid as e:
                raise _err(file, key, str(e)) from None
        else:
            known = ", ".join(list(_SECTIONS) + ["output_dir", "_base_"])
            raise _err(file, str(key), f"unknown key (known top-level keys: {known})")
    cfg = Config(**kwargs, source=file)
    return _check_whole(cfg, file)


def load_config(path: str | os.PathLike) -> Config:
    """Load and validate a YAML config (following ``_base_``). Errors name the key and the file."""
    path = os.fspath(path)
    raw = _read_yaml(path)
    return config_from_dict(raw, file=path)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=0.01")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key {key!r}")
    try:
        value = _yaml_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {_yaml_error_text(e)}") from None
    return key.split("."), value


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A new config with ``KEY=VALUE`` overrides applied (values parsed as YAML) and validated.

    Setting ``train.epochs`` clears ``train.iterations`` and vice versa; ``data.train_json``
    clears ``data.synthetic`` and vice versa, so a single override switches the mode.
    """
    raw = cfg.to_dict()
    for item in overrides or []:
        parts, value = _parse_override(item)
        over: dict = {}
        node = over
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        raw = _exclusive_fix(raw, over)
        node = raw
        for i, p in enumerate(parts[:-1]):
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = node[p]
        node[parts[-1]] = value
    src = f"{cfg.source} (with overrides)" if cfg.source else "overrides"
    out = config_from_dict(raw, file=src)
    out.source = cfg.source
    return out


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg.to_dict()`` as YAML (atomically: temp file + rename)."""
    atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), path)
