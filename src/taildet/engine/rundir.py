"""The run directory (``output_dir``) of a training or fine-tuning run: what may be checked
before anything is written (:func:`check_run_dir`), the first write (:func:`prepare_run_dir`:
``config.yaml``, an earlier run's files set aside), the resume-config check, and the start-up
check of the validation GT that the final evaluation will need.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import yaml

from taildet.config import save_config, upgrade_saved_config
from taildet.engine.checkpoint import LAST_CHECKPOINT_FILE, last_checkpoint
from taildet.errors import ConfigError, OutputError
from taildet.evaluation.lvis_eval import check_gt
from taildet.fileio import check_not_inputs, check_output_path, remove_stale_temp_files
from taildet.utils.comm import barrier, is_main_process, main_process_check

__all__ = [
    "RESUME_MAY_CHANGE",
    "RUN_FILES",
    "check_resume_config",
    "check_run_dir",
    "run_inputs",
    "prepare_run_dir",
    "check_val_gt",
]

log = logging.getLogger("taildet.engine")


#: Config keys that may differ between a run and its resume (where output goes, logging, data
#: loading, paths, evaluation); any other difference makes ``--resume`` an error.
RESUME_MAY_CHANGE = re.compile(
    r"^(output_dir|eval\..*|train\.(log_period|checkpoint_period|device)|data\.num_workers|model\.init_from"
    r"|.*(root|_json|_weights))$")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_resume_config(saved: dict, cfg, run_dir: str) -> None:
    """ConfigError when ``cfg`` differs from the config ``run_dir`` was started with (its
    ``config.yaml``) in a key outside :data:`RESUME_MAY_CHANGE`: a resume continues the optimizer,
    schedule, sampler and RNG of the saved run, so e.g. a new lr would be silently ignored and a
    new schedule length would change the run mid-way."""
    # a run directory of an earlier version (finetune: section) compares in the current shape
    saved = yaml.safe_load(yaml.safe_dump(upgrade_saved_config(saved, stage2=cfg.model.init_from is not None)))
    old = _flatten(saved)
    new = _flatten(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))  # as config.yaml has it
    changed = sorted(k for k in set(old) | set(new)
                     if old.get(k) != new.get(k) and not RESUME_MAY_CHANGE.match(k))
    if changed:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:8])
        more = f"; ... ({len(changed)} in all)" if len(changed) > 8 else ""
        raise ConfigError(
            f"resume: {run_dir} was started with a different config ({shown}{more}). Resume with the "
            f"run's own config ({os.path.join(run_dir, 'config.yaml')}), or start a new run without "
            "--resume / in another output_dir")


#: Files a run writes into its directory (besides ``checkpoint_<iteration>.pth``).
RUN_FILES = ("config.yaml", "metrics.jsonl", "model_final.pth", LAST_CHECKPOINT_FILE, "results_bbox.json",
             "metrics.json")
_CHECKPOINT_NAME = re.compile(r"checkpoint_\d+\.pth$")


def _old_run_files(run_dir: str, config_text: str | None) -> list[str]:
    """The files of an earlier run in ``run_dir`` that a new run would overwrite or remove: its
    checkpoints, metrics, results and config (a ``config.yaml`` alone only when it differs from
    ``config_text``, the one the new run writes)."""
    if not os.path.isdir(run_dir):
        return []
    names = [n for n in os.listdir(run_dir) if n in RUN_FILES or _CHECKPOINT_NAME.match(n)]
    if names == ["config.yaml"] and config_text is not None:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8", errors="replace") as fh:
            if fh.read() == config_text:
                return []
    return sorted(names)


def _set_aside_old_run(run_dir: str, config_text: str | None = None) -> str | None:
    """Move an earlier run's files (checkpoints, config, metrics, results) out of the way of a new
    run in the same directory: nothing of it is overwritten, and a later ``--resume`` of the new
    run can never pick its checkpoints up. Returns the folder used."""
    old = _old_run_files(run_dir, config_text)
    if not old:
        return None
    aside = os.path.join(run_dir, "superseded-" + time.strftime("%Y%m%d-%H%M%S"))
    k = 1
    while os.path.exists(aside):
        aside = os.path.join(run_dir, "superseded-" + time.strftime("%Y%m%d-%H%M%S") + f"-{k}")
        k += 1
    os.makedirs(aside)
    for n in old:
        os.replace(os.path.join(run_dir, n), os.path.join(aside, n))
    return aside


def check_run_dir(cfg, resume: bool, inputs: dict[str, str | None] | None = None) -> str:
    """Everything about ``cfg.output_dir`` that can be checked without writing to it; returns its
    absolute path. Called before the data are read, so a bad output directory fails at once:

    * it can be created / written (not a file, no file among its parents, writable);
    * with ``resume``, the config matches the one the run was started with
      (:func:`check_resume_config`);
    * no file the run writes is one of its ``inputs`` (``{description: path}``: annotation
      files, a stage-1 checkpoint, ...). The config file itself may be the run's ``config.yaml``
      (re-running a run from its saved config): an earlier run's files are set aside, not lost.
    """
    run_dir = os.path.abspath(cfg.output_dir)
    main_process_check(check_output_path, run_dir, directory=True, what="run (output_dir)")
    saved_cfg = os.path.join(run_dir, "config.yaml")
    if resume and os.path.isfile(saved_cfg) and last_checkpoint(run_dir) is not None:
        with open(saved_cfg, encoding="utf-8") as fh:  # every rank: all raise alike
            check_resume_config(yaml.safe_load(fh) or {}, cfg, run_dir)
    outputs = {f"run file {n}": os.path.join(run_dir, n) for n in RUN_FILES if n != "config.yaml"}
    if os.path.isdir(run_dir):
        outputs.update({f"run file {n}": os.path.join(run_dir, n) for n in os.listdir(run_dir)
                        if _CHECKPOINT_NAME.match(n)})
    check_not_inputs(outputs, dict(inputs or {}))
    return run_dir


def run_inputs(cfg) -> dict[str, str | None]:
    """The files a run of ``cfg`` reads (for :func:`check_run_dir`)."""
    d = cfg.data
    init = {"--from checkpoint (model.init_from)": cfg.model.init_from} if cfg.model.init_from else {}
    if d.synthetic is not None:
        return init
    return {"data.train_json": d.train_json, "data.val_json": d.val_json, **init}


def prepare_run_dir(cfg, resume: bool) -> str:
    """Create ``cfg.output_dir`` and write ``config.yaml`` (rank 0). Call it only once the data,
    config and model have been checked (:func:`check_run_dir`, datasets, model): it is the first
    write to the run directory.

    Removes temporary files of interrupted writes. With ``resume``, the config must match the one
    the run was started with (:func:`check_resume_config`); without it, the files of an earlier
    run in the directory (checkpoints, config, metrics, results) are moved to
    ``superseded-<time>/`` (nothing is overwritten, and a later ``--resume`` of this run must not
    continue the old one).
    """
    run_dir = check_run_dir(cfg, resume)
    if is_main_process():
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create the run directory {run_dir}: {err.strerror or err}") from None
        stale = remove_stale_temp_files(run_dir)
        if stale:
            log.info("removed %d temporary file(s) of interrupted writes from %s", len(stale), run_dir)
        if not resume:
            text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            aside = _set_aside_old_run(run_dir, text)
            if aside is not None:
                log.warning("%s held an earlier run: its files moved to %s (use --resume to continue a "
                            "run instead)", run_dir, aside)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    barrier()
    return run_dir


def check_val_gt(cfg, val_json) -> None:
    """The final evaluation's checks of the validation GT (:func:`taildet.evaluation.lvis_eval.check_gt`),
    at start-up (rank 0; the others wait for its verdict)."""
    main_process_check(check_gt, val_json, cfg.iou_types())
