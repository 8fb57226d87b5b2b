"""A nested dict (one YAML file with its ``_base_`` merged) validated into a :class:`Config`:
each section's keys and values, then the checks across sections."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from taildet.config.registries import arch_info, builder_options, two_stage_architectures
from taildet.config.schema import (
    _SECTIONS, MODEL_KWARG_CHECKS, Config, DataConfig, MFSConfig, ModelConfig, SyntheticConfig, TrainConfig,
)
from taildet.config.validators import _err, _fmt, _Invalid, v_any, v_path



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
    arch = arch_info(cfg.model.arch)
    if "logit_bn" in mk or "logit_bn_momentum" in mk:
        key = "model.logit_bn" if "logit_bn" in mk else "model.logit_bn_momentum"
        if arch.stage != "roi_heads":
            raise _err(file, key, f"the BatchNorm on the RoI classifier's logits needs a two-stage detector "
                                  f"({_two_stage()}), got model.arch {cfg.model.arch!r}")
        if "logit_bn_momentum" in mk and not mk.get("logit_bn"):
            raise _err(file, "model.logit_bn_momentum", "set model.logit_bn: true too (it is the momentum of "
                                                        "that BatchNorm's running statistics)")
        if mk.get("logit_bn") and cfg.train.mfs.enabled:
            raise _err(file, "train.mfs.enabled", "memory-augmented feature sampling runs the memory samples "
                                                     "through the classifier in a call of their own, which would "
                                                     "batch-normalise them apart: not supported with model.logit_bn")
    if arch.masks and not d.with_masks:
        raise _err(file, "data.with_masks", f"model.arch {cfg.model.arch} trains on instance masks: set "
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
    if cfg.train.mfs.enabled and arch.stage != "roi_heads":
        raise _err(file, "train.mfs.enabled",
                   f"memory-augmented feature sampling needs a two-stage detector ({_two_stage()}), "
                   f"got model.arch {cfg.model.arch!r}")
    stage2 = [k for k, on in (("train.mfs.enabled", cfg.train.mfs.enabled),
                              ("model.reset_classifier", cfg.model.reset_classifier),
                              ("train.freeze", bool(cfg.train.freeze) and cfg.model.init_from is not None)) if on]
    if arch.stages > 1 and stage2:
        raise _err(file, stage2[0], f"model.arch {cfg.model.arch!r} has {arch.stages} classification stages: decoupled "
                   "stage-2 fine-tunes (MFS, classifier re-initialisation, freezing parts of a stage-1 model: the "
                   "freeze presets name the one-stage RoI head's parameters) are not supported on a cascade")
    accepted = builder_options()  # per architecture, build_model checks again
    unknown = [k for k in mk if accepted is not None and k not in accepted]
    if unknown:
        raise _err(file, f"model.{unknown[0]}", "not an option of any registered architecture (the builders of "
                   f"ARCHITECTURES take: {', '.join(sorted(accepted or ()))})")
    return cfg


def _two_stage() -> str:
    return " or ".join(two_stage_architectures())


def validate_sections(raw: dict, file: str | None = None) -> Config:
    """The sections of a nested dict (no ``_base_``, no ``finetune:``) validated into a :class:`Config`."""
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


