"""The config's sections as dataclasses (``model:``, ``data:``, ``train:`` with ``train.mfs:``,
``eval:``), their defaults and validators, and the named ``train.freeze`` presets."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from taildet.config.registries import (
    arch_info, v_arch, v_backbone, v_classifier, v_head_norm, v_loss, v_norm, v_sampler,
)
from taildet.config.validators import (
    _f, _fmt, _Invalid, _is_num, v_anchor_sizes, v_aspect_ratios, v_bool, v_dict, v_enum, v_fraction,
    v_int_or_ints, v_list, v_lr, v_nonneg_int, v_nonneg_num, v_open_fraction, v_opt, v_path, v_pos_int,
    v_pos_num, v_pos_num_list, v_regex, v_rfs_threshold, v_rgb, v_rgb_mean, v_sizes, v_steps, v_str,
    v_trainable_layers,
)


#: Value checks of builder options under ``model:``. Which options a ``model.arch`` takes is read
#: from its builder's signature (:func:`taildet.models.build.architecture_info`): an option the
#: builder does not take is a ConfigError; an option with no entry here is passed on as it is
#: (the builder checks it). Names come from the registries (``v_loss``, ``v_classifier``,
#: ``v_backbone``, ``v_norm``, ``v_head_norm``).
MODEL_KWARG_CHECKS: dict[str, Callable[[Any], Any]] = {
    "backbone": v_backbone,
    "backbone_weights": v_opt(v_str),
    "norm": v_norm,
    "loss": v_loss,
    "loss_kwargs": v_dict,
    "classifier": v_classifier,
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
    "head_norm": v_opt(v_head_norm),
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

    arch: str = _f("faster_rcnn", v_arch, "a name in taildet.models.build.ARCHITECTURES")
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
    sampler: str = _f("random", v_sampler, "a name in taildet.data.samplers.SAMPLERS")
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
        return ["bbox", "segm"] if (self.data.with_masks or arch_info(self.model.arch).masks) else ["bbox"]


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
