"""The ``finetune:`` section of earlier versions: a ConfigError showing the new spelling in a config
file (:func:`stage2_from_finetune_section`), and run directories that saved one still resume
(:func:`upgrade_saved_config`)."""

from __future__ import annotations

import copy
import logging

import yaml

from taildet.config.merge import _exclusive_fix, _merge
from taildet.config.schema import DEFAULT_FREEZE, FREEZE_PRESETS, MFSConfig, _to_dict
from taildet.config.validate import validate_sections
from taildet.config.validators import _err, _fmt
from taildet.errors import ConfigError



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
        return validate_sections(raw).to_dict()
    except ConfigError:
        return raw


