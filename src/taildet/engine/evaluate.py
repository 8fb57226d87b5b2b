"""Evaluation entry points: the evaluation caps of ``cfg.eval``, scoring result dicts against the
GT, a trained checkpoint's evaluation (``taildet eval``) and the one at the end of a run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from taildet.calibration import apply_calibration
from taildet.engine.builders import build_datasets, build_model_for_checkpoint, loss_needs_train_statistics, resolve_device
from taildet.engine.checkpoint import load_checkpoint, load_model_weights
from taildet.engine.distributed import init_distributed
from taildet.engine.inference import inference
from taildet.engine.rundir import check_val_gt, run_inputs
from taildet.evaluation import evaluate_lvis
from taildet.evaluation.lvis_eval import AP_FIXED_DETS_PER_CLASS
from taildet.evaluation.results_io import save_metrics, save_results
from taildet.fileio import check_not_inputs, check_output_path
from taildet.utils.comm import broadcast_object, is_main_process, main_process_check, unwrap_model

__all__ = ["eval_caps", "evaluate_results", "evaluate_checkpoint", "post_eval"]

log = logging.getLogger("taildet.engine")


def eval_caps(cfg) -> dict:
    """:func:`inference`'s caps for ``cfg.eval``: the per-image cap (``max_dets``), or for AP-fixed
    none, each class's 10,000 best over the dataset and the detector's cap raised to
    ``eval.fixed_dets_per_img``."""
    if not cfg.eval.fixed:
        return {"max_dets": cfg.eval.max_dets}
    return {"max_dets": None, "per_class_top_k": AP_FIXED_DETS_PER_CLASS,
            "detector_dets_per_img": cfg.eval.fixed_dets_per_img}


def evaluate_results(results: list[dict], gt_json: str, run_dir: str | None, iou_types, fixed: bool = False,
                     ) -> dict:
    """Evaluate with ``taildet.evaluation.evaluate_lvis`` per IoU type; saves results/metrics when
    ``run_dir`` is given. Returns ``{iou_type: metrics}``. Call on rank 0 only."""
    metrics: dict[str, Any] = {}
    if run_dir is not None:
        save_results(results, os.path.join(run_dir, "results_bbox.json"))
    for iou in iou_types:
        if iou == "segm" and not any("segmentation" in r for r in results[:1]) and results:
            log.warning("eval: segm requested but the model returns no masks; skipped")
            continue
        metrics[iou] = evaluate_lvis(gt_json, results, iou_type=iou, fixed=fixed)
    if run_dir is not None:
        save_metrics(metrics, os.path.join(run_dir, "metrics.json"))
    return metrics


def _apply_calibration(model: torch.nn.Module, calibration, class_names=None) -> torch.nn.Module:
    if calibration is None:
        return model
    if callable(calibration):
        out = calibration(model)
        return model if out is None else out
    out = apply_calibration(model, calibration, class_names=class_names)
    return model if out is None else out


def evaluate_checkpoint(cfg, checkpoint_path: str, calibration: Any = None, progress: bool = True,
                        out_dir: str | None = None) -> dict:
    """Build the model of ``cfg``, load ``checkpoint_path``, run inference on the val set, evaluate.

    ``calibration``: ``None``; a callable ``model -> model | None`` (applied before inference);
    or a statistics file passed to ``taildet.calibration.apply_calibration(model, path)``.
    Results and metrics are written to ``out_dir`` (default: the checkpoint's directory, as
    ``results_bbox.json`` / ``metrics.json``; with a calibration, into ``<dir>/eval_calibrated``).
    Returns ``{iou_type: metrics}`` (on every rank).
    """
    init_distributed(cfg.train.device)
    device = resolve_device(cfg.train.device)
    if out_dir is None:
        out_dir = os.path.dirname(os.path.abspath(checkpoint_path))
        if calibration is not None:
            out_dir = os.path.join(out_dir, "eval_calibrated")
    # outputs checked before the work: nothing is written when one is bad
    main_process_check(check_output_path, out_dir, directory=True, what="evaluation output")
    check_not_inputs({f"evaluation output {n}": os.path.join(out_dir, n) for n in ("results_bbox.json", "metrics.json")},
                     {**run_inputs(cfg), "checkpoint": str(checkpoint_path), "config": cfg.source,
                      "calibration file": calibration if isinstance(calibration, (str, os.PathLike)) else None})
    # a loss built from training-set statistics needs the training annotations (not its images)
    train_set, val_set, val_json = build_datasets(
        cfg, need_train="annotations" if loss_needs_train_statistics(cfg) else False)
    check_val_gt(cfg, val_json)  # before the inference pass, not after it
    state = load_checkpoint(checkpoint_path)
    model = build_model_for_checkpoint(cfg, val_set.num_classes, train_set)
    load_model_weights(model, state["model"], checkpoint_path, state.get("config"))
    model.to(device)
    model = _apply_calibration(model, calibration, class_names=val_set.class_names)
    results = inference(model, val_set, cfg.eval.batch_size or cfg.data.batch_size, device,
                        score_thresh=cfg.eval.score_thresh, progress=progress,
                        num_workers=cfg.data.num_workers, **eval_caps(cfg))
    metrics = None
    if is_main_process():
        metrics = evaluate_results(results, val_json, out_dir, cfg.iou_types(), fixed=cfg.eval.fixed)
    return broadcast_object(metrics)


def post_eval(cfg, model, val_set, val_json, run_dir, device, progress) -> dict:
    """The evaluation at the end of a training / fine-tuning run (``{iou_type: metrics}`` on every rank)."""
    core = unwrap_model(model)
    results = inference(core, val_set, cfg.eval.batch_size or cfg.data.batch_size, device,
                        score_thresh=cfg.eval.score_thresh, progress=progress,
                        num_workers=min(cfg.data.num_workers, 2), **eval_caps(cfg))
    metrics = None
    if is_main_process():
        metrics = evaluate_results(results, val_json, run_dir, cfg.iou_types(), fixed=cfg.eval.fixed)
    return broadcast_object(metrics)
