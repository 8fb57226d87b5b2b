"""The ``taildet classify`` config: ``data:``, ``model:``, ``train:`` (the detection engine's
:class:`taildet.config.TrainConfig`, same keys and checks) and ``eval:``. Errors name the file and
the key (the validators of :mod:`taildet.config.validators`).

Example (``configs/classify/digits_ce.yaml``)::

    data: {manifest: runs/classify/digits_lt100/manifest.json, batch_size: 32}
    model: {arch: resnet32, loss: softmax_ce}
    train: {epochs: 30, lr: 0.1, warmup_iters: 20, schedule: cosine, weight_decay: 5.0e-4}
    output_dir: runs/classify/digits_ce

cRT (Kang et al. 2020) is a second config with ``model.init_from`` (the stage-1 checkpoint),
``model.stage: crt`` (freeze ``features``, re-initialise ``fc``) and ``data.sampler: class_balanced``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from taildet.classify.data import AUGMENTATIONS
from taildet.classify.losses import CLASSIFY_LOSSES
from taildet.config.loading import _parse_override, _read_yaml
from taildet.config.schema import TrainConfig
from taildet.config.validate import _build_section
from taildet.config.validators import (_err, _f, _Invalid, v_dict, v_enum, v_list, v_nonneg_int, v_nonneg_num, v_opt, v_path,
                                       v_pos_int, v_pos_num, v_str)
from taildet.errors import ConfigError
from taildet.fileio import atomic_write_text

__all__ = ["ClassifyConfig", "load_classify_config", "classify_config_from_dict", "POSTHOC_METHODS"]

#: Post-hoc methods ``eval.posthoc`` may list (besides the raw logits, always reported).
POSTHOC_METHODS = ("logn", "logit_adjust", "tau_norm", "logn_balanced", "logn_val")
#: The default ``eval.posthoc`` (the LogN statistics variants of :mod:`taildet.classify.logn_stats` are opt-in).
DEFAULT_POSTHOC = ("logn", "logit_adjust", "tau_norm")


def v_loss_name(v):
    if v not in CLASSIFY_LOSSES:
        raise _Invalid(f"expected one of {', '.join(CLASSIFY_LOSSES)}, got {v!r}")
    return v


@dataclass
class CDataConfig:
    """``data:``"""

    manifest: str = _f("", v_path, "manifest.json written by `taildet classify split`")
    batch_size: int = _f(32, v_pos_int, "images per process")
    num_workers: int = _f(0, v_nonneg_int)
    sampler: str = _f("random", v_enum("random", "class_balanced"), "class_balanced: cRT's sampling")
    augment: list = _f([], v_list(v_enum(*AUGMENTATIONS)), "training augmentation: flip, pad_crop")
    pad: int = _f(4, v_nonneg_int, "pad_crop's padding in px")


@dataclass
class CModelConfig:
    """``model:``"""

    arch: str = _f("resnet32", v_str, "resnet32 or a torchvision classifier name")
    loss: str = _f("softmax_ce", v_loss_name, "a taildet loss with a classification form")
    loss_kwargs: dict = _f({}, v_dict)
    arch_kwargs: dict = _f({}, v_dict, "keyword arguments of the torchvision builder")
    init_from: str | None = _f(None, v_opt(v_path), "stage-1 checkpoint (cRT)")
    stage: str = _f("joint", v_enum("joint", "crt"), "crt: frozen features, fc re-initialised")


@dataclass
class CEvalConfig:
    """``eval:``"""

    split: str = _f("test", v_enum("test", "val"), "split evaluated")
    posthoc: list = _f(list(DEFAULT_POSTHOC), v_list(v_enum(*POSTHOC_METHODS)),
                        "post-hoc methods reported (logn_balanced, logn_val: LogN with class-balanced training "
                        "statistics / with the val split's statistics)")
    la_tau: float = _f(1.0, v_pos_num, "logit adjustment's tau")
    tau_grid: list = _f([round(0.1 * i, 1) for i in range(21)], v_list(v_nonneg_num, min_len=1),
                        "tau-normalisation: candidates, the best mean per-class accuracy on the val split wins")
    batch_size: int = _f(256, v_pos_int)


@dataclass
class ClassifyConfig:
    data: CDataConfig = field(default_factory=CDataConfig)
    model: CModelConfig = field(default_factory=CModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=0.1, warmup_iters=20,
                                                                   schedule="cosine", weight_decay=5e-4,
                                                                   log_period=10))
    eval: CEvalConfig = field(default_factory=CEvalConfig)
    output_dir: str = _f("runs/classify/default", v_path)
    source: str | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        d["train"].pop("mfs", None)
        return d

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), path)


_SECTIONS = {"data": CDataConfig, "model": CModelConfig, "eval": CEvalConfig}


def classify_config_from_dict(raw: dict, file: str | None = None) -> ClassifyConfig:
    """Validate a nested dict into a :class:`ClassifyConfig` (ConfigError naming file and key)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{file or 'config'}: expected a mapping at the top level")
    cfg = ClassifyConfig()
    for key, value in raw.items():
        if key in _SECTIONS:
            setattr(cfg, key, _build_section(_SECTIONS[key], value, key, file))
        elif key == "train":
            tv = dict(value or {}) if isinstance(value, dict) else value
            if isinstance(tv, dict):
                if "mfs" in tv:
                    raise _err(file, "train.mfs", "not used by classification")
                base = {k: v for k, v in dataclasses.asdict(ClassifyConfig().train).items() if k != "mfs"}
                if "iterations" in tv and tv["iterations"] is not None and "epochs" not in tv:
                    base["epochs"] = None
                tv = {**base, **tv}
            cfg.train = _build_section(TrainConfig, tv, "train", file)
        elif key == "output_dir":
            try:
                cfg.output_dir = v_path(value)
            except _Invalid as e:
                raise _err(file, "output_dir", str(e)) from None
        else:
            raise _err(file, key, "unknown key (known keys: data, model, train, eval, output_dir)")
    t = cfg.train
    if (t.iterations is None) == (t.epochs is None):
        raise _err(file, "train.iterations", "set exactly one of train.iterations and train.epochs")
    if not cfg.data.manifest:
        raise _err(file, "data.manifest", "required (write one with `taildet classify split`)")
    if cfg.model.stage == "crt" and not cfg.model.init_from:
        raise _err(file, "model.init_from", "model.stage crt re-trains the classifier of a stage-1 checkpoint: "
                                            "give its path")
    if file:
        base = os.path.dirname(os.path.abspath(file))
        if not os.path.isabs(cfg.data.manifest) and not os.path.exists(cfg.data.manifest):
            cand = os.path.join(base, cfg.data.manifest)
            cfg.data.manifest = cand if os.path.exists(cand) else cfg.data.manifest
    cfg.source = file
    return cfg


def load_classify_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> ClassifyConfig:
    """Read a YAML classify config (``_base_`` allowed) and apply ``KEY=VALUE`` overrides."""
    path = os.fspath(path)
    raw = _read_yaml(path)
    for item in overrides or ():
        parts, value = _parse_override(item)
        node: Any = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        if parts == ["train", "iterations"]:
            raw["train"]["epochs"] = None
        elif parts == ["train", "epochs"]:
            raw["train"]["iterations"] = None
    return classify_config_from_dict(raw, file=path)
