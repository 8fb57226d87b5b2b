"""Post-hoc rows of ``taildet compare``: a training-free method (:data:`taildet.calibration.CALIBRATORS`)
fitted on a stage-1 checkpoint and evaluated, its statistics pass (cached per checkpoint), and
LOCE's mean-score plot."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from taildet import engine
from taildet.analysis.plots import plot_mean_score_vs_instances
from taildet.calibration import (CALIBRATORS, apply_logit_normalization, build_calibrator,
                                 plot_logit_statistics)
from taildet.calibration.stages import fit_stages, last_stage_normalizer
from taildet.recipes import Recipe, _config_path
from taildet.compare.summary import _bbox
from taildet.config import apply_overrides, load_config
from taildet.engine.builders import build_datasets, build_model_for_checkpoint
from taildet.errors import ConfigError
from taildet.sampling.prefill import observe_mean_score


def _statistics_input(cfg, checkpoint: str, out_dir: Path, method) -> str:
    """The ``"statistics"`` input of a post-hoc method: the statistics pass over the training set
    with the method's ``pass_options``, written for the row by ``method.write_statistics`` as
    ``out_dir/logit_stats.json`` (with the paper's Fig. 2 beside it); returns its path.

    The pass is made once per checkpoint and pass setting (cached beside the checkpoint as
    ``logit_stats_pass*.json``); rows that differ only in how the statistics are applied (the
    ablations' ``mode``, ``beta``) reuse it.
    """
    pass_kw = method.pass_options
    tag = hashlib.sha1(json.dumps(pass_kw, sort_keys=True, default=str).encode()).hexdigest()[:8] if pass_kw else ""
    cached = Path(checkpoint).parent / f"logit_stats_pass{'-' + tag if tag else ''}.json"
    if not cached.exists():
        engine.calibrate_checkpoint(cfg, checkpoint, str(cached), progress=False, **pass_kw)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = method.write_statistics(cached, out_dir / "logit_stats.json")
    # the paper's Fig. 2: per-class logit mean and std against training instance count
    train_set, _, _ = build_datasets(cfg, need_train=True)
    plot_logit_statistics(last_stage_normalizer(path), train_set.instance_counts, out_dir / "logit_stats.png",
                          class_names=train_set.class_names)
    return path


def posthoc_calibration(name: str, cfg, checkpoint: str, out_dir: Path, **options):
    """What ``evaluate_checkpoint(calibration=...)`` takes for the post-hoc method ``name`` (a key
    of :data:`taildet.calibration.CALIBRATORS`) with ``options``: None for the identity, else a
    function ``model -> model`` that fits the method on each classification head and installs the
    transform. The method's inputs (statistics pass, training set) are gathered here."""
    method = build_calibrator(name, **options)
    if method.identity:
        return None
    inputs: dict = {}
    if "statistics" in method.inputs:
        inputs["statistics"] = _statistics_input(cfg, checkpoint, out_dir, method)
    if "train_set" in method.inputs:
        inputs["train_set"] = build_datasets(cfg, need_train=True)[0]

    def calibrate(model):
        # one transform per classification stage (one for most detectors, three for a cascade)
        return apply_logit_normalization(model, fit_stages(method, model, **inputs))

    return calibrate


def _run_posthoc(name: str, recipe: Recipe, stage1_cfg_path: Path, opts: list[str], checkpoint: str,
                 out_dir: Path) -> dict:
    """Apply a training-free method (:data:`taildet.calibration.CALIBRATORS`) to a checkpoint and
    evaluate it."""
    if recipe.posthoc not in CALIBRATORS:
        raise ConfigError(f"recipe {name}: unknown post-hoc method {recipe.posthoc!r} "
                          f"(known: {', '.join(CALIBRATORS) or 'none'})")
    cfg = apply_overrides(load_config(stage1_cfg_path), opts)
    calibration = posthoc_calibration(recipe.posthoc, cfg, checkpoint, out_dir, **dict(recipe.posthoc_kwargs))
    return _bbox(engine.evaluate_checkpoint(cfg, checkpoint, calibration=calibration, out_dir=str(out_dir)))


def _plot_mean_scores(out: Path, ce: str, loce: str, specs: dict, run_opts, train_json: Path) -> None:
    """LOCE's Fig. 4: per-class mean classification score vs training instances, CE and LOCE.

    LOCE's scores are its Equilibrium Loss buffer; the CE model's are observed with the same EMA
    rule over the training set (no training).
    """
    state = torch.load(out / loce / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    loce_score = next((v for k, v in state.items() if k.endswith("mean_score")), None)
    if loce_score is None:
        return
    cfg = apply_overrides(load_config(_config_path(specs[ce])), run_opts(ce))
    train_set, _, _ = build_datasets(cfg, need_train=True)
    model = build_model_for_checkpoint(cfg, train_set.num_classes, train_set)
    model.load_state_dict(torch.load(out / ce / "model_final.pth", map_location="cpu",
                                     weights_only=False)["model"])
    ce_score = observe_mean_score(model, train_set, progress=False)
    png = plot_mean_score_vs_instances({ce: ce_score, loce: loce_score}, train_set.instance_counts,
                                       out / "mean_score_vs_instances.png",
                                       title="mean classification score (LOCE Fig. 4)")
    print(f"mean classification score plot: {png}")
