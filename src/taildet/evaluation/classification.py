"""Long-tail classification metrics (methods.md section 6): top-1 accuracy overall and on the
many-shot (> 100 training images), medium-shot (20-100) and few-shot (< 20) classes.

For the classification form of the losses (e.g. ``BalancedSoftmaxLoss(background=False)`` on
ImageNet-LT-style data). The split accuracies are over the test samples whose true class is in the
split (on the usual class-balanced test sets that equals the mean of the split's per-class
accuracies, which is reported too as ``mean_class_acc``). Undefined numbers (no test sample in a
split) are NaN, as in :func:`taildet.evaluation.evaluate_lvis`.

Example::

    from taildet.evaluation import long_tail_accuracy
    m = long_tail_accuracy(logits, labels, train_image_counts)   # logits [N, C] or predictions [N]
    m["top1"], m["many"], m["medium"], m["few"]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["long_tail_accuracy", "shot_split", "MANY_SHOT_MIN", "FEW_SHOT_MAX"]

#: A class is many-shot with more than this many training images ...
MANY_SHOT_MIN = 100
#: ... and few-shot with fewer than this many (medium-shot: 20-100 inclusive).
FEW_SHOT_MAX = 20


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"long_tail_accuracy: {name} must be an array: {exc}") from None


def shot_split(train_counts: Any) -> np.ndarray:
    """Per class ``"many"`` (> 100 training images), ``"medium"`` (20-100) or ``"few"`` (< 20)."""
    n = _as_numpy(train_counts, "train_counts").astype(np.float64).reshape(-1)
    if not np.isfinite(n).all() or (n < 0).any():
        bad = int(np.nonzero(~np.isfinite(n) | (n < 0))[0][0])
        raise ValueError(f"long_tail_accuracy: train_counts must be finite and >= 0; class {bad} has {n[bad]}")
    return np.where(n > MANY_SHOT_MIN, "many", np.where(n < FEW_SHOT_MAX, "few", "medium"))


def long_tail_accuracy(scores_or_predictions: Any, labels: Any, train_counts: Any) -> dict[str, float]:
    """Top-1 accuracy overall and per shot split.

    Args:
        scores_or_predictions: ``[N, C]`` scores / logits (top-1 = argmax) or ``[N]`` predicted
            class indices.
        labels: ``[N]`` true class indices ``0..C-1``.
        train_counts: ``[C]`` training images per class (decides the split of each class).

    Returns:
        ``{"top1", "many", "medium", "few", "mean_class_acc", "num_samples", "num_classes": {split: n}}``
        with accuracies in percent (NaN where a split has no test sample).
    """
    y = _as_numpy(labels, "labels")
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"long_tail_accuracy: labels must be a 1-d integer array, got shape {y.shape} {y.dtype}")
    split = shot_split(train_counts)
    c = split.shape[0]
    s = _as_numpy(scores_or_predictions, "scores_or_predictions")
    if s.ndim == 2:
        if s.shape != (y.shape[0], c):
            raise ValueError(f"long_tail_accuracy: scores must be [N, C] = [{y.shape[0]}, {c}], got {s.shape}")
        pred = s.argmax(axis=1) if s.size else np.zeros(0, dtype=np.int64)
    elif s.ndim == 1:
        if s.shape != y.shape:
            raise ValueError(f"long_tail_accuracy: {s.shape[0]} predictions for {y.shape[0]} labels")
        if s.size and not np.issubdtype(s.dtype, np.integer):
            raise ValueError("long_tail_accuracy: 1-d predictions must be integer class indices")
        pred = s
    else:
        raise ValueError(f"long_tail_accuracy: expected [N, C] scores or [N] predictions, got shape {s.shape}")
    if y.size and (y.min() < 0 or y.max() >= c):
        bad = int(np.nonzero((y < 0) | (y >= c))[0][0])
        raise ValueError(f"long_tail_accuracy: labels must be in 0..{c - 1}; sample {bad} has label {int(y[bad])}")
    correct = pred == y
    out: dict[str, Any] = {"top1": 100.0 * correct.mean() if y.size else float("nan")}
    sample_split = split[y] if y.size else np.zeros(0, dtype=split.dtype)
    for name in ("many", "medium", "few"):
        m = sample_split == name
        out[name] = 100.0 * float(correct[m].mean()) if m.any() else float("nan")
    per_class = [correct[y == k].mean() for k in range(c) if (y == k).any()]
    out["mean_class_acc"] = 100.0 * float(np.mean(per_class)) if per_class else float("nan")
    out["top1"] = float(out["top1"])
    out["num_samples"] = int(y.size)
    out["num_classes"] = {name: int((split == name).sum()) for name in ("many", "medium", "few")}
    return out
