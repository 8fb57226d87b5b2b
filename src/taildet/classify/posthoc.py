"""Evaluation of a trained classifier, raw and with the post-hoc methods.

Methods (each a function of the trained model's features / logits; nothing is re-trained):

``raw``
    ``argmax`` of the logits ``z = W f + b``.
``logit_adjust``
    Menon et al. 2021: ``z_c - tau * log(pi_c)`` with the training prior ``pi``
    (:class:`taildet.calibration.LogitAdjuster`, ``background=False``; ``eval.la_tau``).
``logn``
    LogN without background (:class:`taildet.calibration.LogitNormalizer`, ``background=False``):
    the mean and variance of each logit column over the images of the training split (eval mode,
    no augmentation), then ``(z_c - mu_c) / sqrt(var_c + eps)``.
``logn_balanced`` / ``logn_val`` (opt-in)
    the same transform with the columns' moments taken with every training class weighted equally /
    over the ``val`` split (:mod:`taildet.classify.logn_stats`, which says why).
``tau_norm``
    Kang et al. 2020: ``w_c / ||w_c||^tau`` (bias dropped). ``tau`` is chosen from ``eval.tau_grid``
    by the mean per-class accuracy on the manifest's balanced ``val`` split (the test split is
    never used to choose it); without a val split, ``tau = 1``.

Metrics (:func:`taildet.evaluation.long_tail_accuracy`): top-1, many (> 100 training images) /
medium (20-100) / few (< 20) shot and mean per-class accuracy, plus per-class accuracies.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from taildet.calibration.logit_adjust import LogitAdjuster
from taildet.calibration.logit_norm import LogitNormalizer
from taildet.classify.data import ClassificationDataset, load_split
from taildet.classify.logn_stats import LOGN_VARIANTS, check_posthoc_splits, logn_variant
from taildet.classify.report import plot_per_class
from taildet.evaluation.classification import long_tail_accuracy
from taildet.fileio import atomic_write_text

__all__ = ["extract_features", "logit_adjust", "logn", "tau_normalized_logits", "choose_tau", "method_metrics",
           "evaluate_model", "per_class_accuracy"]


@torch.no_grad()
def extract_features(model, dataset: ClassificationDataset, device: torch.device, batch_size: int = 256) -> Tensor:
    """``[N, D]`` features of every image of ``dataset`` in order (eval mode, float32 on CPU)."""
    was = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    out = [model.features(x.to(device)).float().cpu() for x, _ in loader]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, model.fc.in_features)


def logit_adjust(logits: Tensor, train_counts: Any, tau: float = 1.0) -> Tensor:
    """``z_c - tau * log(pi_c)`` (post-hoc logit adjustment, no background column)."""
    return LogitAdjuster.from_counts(np.asarray(train_counts, dtype=np.float64), tau=tau, background=False)(logits)


def logn(logits: Tensor, train_logits: Tensor) -> Tensor:
    """LogN without background: statistics of ``train_logits`` ``[M, C]`` applied to ``logits``."""
    norm = LogitNormalizer(logits.shape[1], background=False)
    norm.update(train_logits.double())
    return norm(logits)


def tau_normalized_logits(features: Tensor, weight: Tensor, tau: float) -> Tensor:
    """``f @ (w_c / ||w_c||^tau)^T`` -- tau-normalised classifier, bias dropped. ``[N, C]``."""
    norms = weight.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return features @ (weight / norms.pow(tau)).t()


def per_class_accuracy(logits: Tensor | np.ndarray, labels: Any, num_classes: int) -> list[float]:
    """Accuracy in percent of each class's test samples (NaN for a class without one)."""
    pred = np.asarray(logits.argmax(1) if isinstance(logits, Tensor) else np.argmax(logits, 1))
    y = np.asarray(labels)
    return [float(100.0 * (pred[y == c] == c).mean()) if (y == c).any() else float("nan") for c in range(num_classes)]


def choose_tau(features: Tensor, weight: Tensor, labels: Any, grid: list[float]) -> tuple[float, list[float]]:
    """The ``tau`` of ``grid`` with the best mean per-class accuracy of ``features`` / ``labels``
    (the first on ties), and that accuracy for every candidate."""
    c = weight.shape[0]
    scores = [float(np.nanmean(per_class_accuracy(tau_normalized_logits(features, weight, t), labels, c)))
              for t in grid]
    return float(grid[int(np.argmax(scores))]), scores


def method_metrics(logits: Tensor, labels: Any, train_counts: Any) -> dict[str, Any]:
    """:func:`long_tail_accuracy` plus ``per_class`` accuracies."""
    m = long_tail_accuracy(logits, np.asarray(labels, dtype=np.int64), train_counts)
    m["per_class"] = per_class_accuracy(logits, labels, len(train_counts))
    return m


def evaluate_model(cfg, model, manifest: dict, train_set: ClassificationDataset, out_dir: str,
                   device: torch.device, checkpoint: str | None = None) -> dict[str, Any]:
    """Raw and post-hoc metrics of ``model`` on ``cfg.eval.split``; writes ``metrics.json`` and
    ``per_class_accuracy.png`` to ``out_dir``. Returns the ``metrics.json`` content."""
    ecfg = cfg.eval
    check_posthoc_splits(ecfg.posthoc, manifest, cfg.data.manifest)
    counts = train_set.counts
    test = load_split(manifest, ecfg.split)
    bs = ecfg.batch_size
    w, b = model.fc.weight.detach().float().cpu(), model.fc.bias.detach().float().cpu()
    f_test = extract_features(model, test, device, bs)
    z_test = f_test @ w.t() + b
    y_test = test.labels
    methods: dict[str, dict] = {"raw": method_metrics(z_test, y_test, counts)}
    extra: dict[str, Any] = {}
    if "logit_adjust" in ecfg.posthoc:
        methods["logit_adjust"] = method_metrics(logit_adjust(z_test, counts, ecfg.la_tau), y_test, counts)
        extra["la_tau"] = ecfg.la_tau
    logn_runs = [m for m in LOGN_VARIANTS if m in ecfg.posthoc]
    if logn_runs:  # LogN: statistics of the training split (or of val: logn_val), taildet.classify.logn_stats
        z_stats = {}
        extra["logn_statistics"] = {}
        for name in logn_runs:
            split = LOGN_VARIANTS[name][0]
            if split not in z_stats:
                ds = train_set if split == "train" else load_split(manifest, split)
                z_stats[split] = (extract_features(model, ds, device, bs) @ w.t() + b, ds.labels)
            z, extra["logn_statistics"][name] = logn_variant(name, z_test, *z_stats[split])
            methods[name] = method_metrics(z, y_test, counts)
    if "tau_norm" in ecfg.posthoc:
        if manifest["splits"].get("val"):
            val = load_split(manifest, "val")
            tau, curve = choose_tau(extract_features(model, val, device, bs), w, val.labels, list(ecfg.tau_grid))
            extra["tau_norm"] = {"tau": tau, "grid": list(ecfg.tau_grid), "val_mean_class_acc": curve}
        else:
            tau = 1.0
            extra["tau_norm"] = {"tau": tau, "grid": None, "note": "no val split in the manifest: tau = 1"}
        methods["tau_norm"] = method_metrics(tau_normalized_logits(f_test, w, tau), y_test, counts)
    out = {"split": ecfg.split, "checkpoint": checkpoint, "loss": cfg.model.loss, "arch": cfg.model.arch,
           "stage": cfg.model.stage, "train_counts": [int(v) for v in counts],
           "classes": list(train_set.class_names), "methods": methods, **extra}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(json.dumps(out, indent=1, allow_nan=True) + "\n", os.path.join(out_dir, "metrics.json"))
    plot_per_class({k: v["per_class"] for k, v in methods.items()}, counts,
                   os.path.join(out_dir, "per_class_accuracy.png"))
    return out
