"""Where the classification track's LogN takes its logit statistics from (``eval.posthoc``).

LogN (:class:`taildet.calibration.LogitNormalizer`, ``background=False``) transforms every column
``c`` of the test logits with a mean ``mu_c`` and variance ``var_c``: ``(z_c - mu_c) / sqrt(var_c + eps)``.
The post-hoc variants differ only in the rows those moments are taken over:

``logn``
    every image of the training split once (no augmentation, eval mode) -- the spec's pass. Each
    column's moments are then a mixture of the per-class moments *weighted by the training label
    distribution*: on a long-tailed split the few head classes' images make up most of ``mu_c``
    even for a tail column ``c``, so ``mu_c`` measures how class ``c`` scores on head-class
    images (a matter of which classes look alike) as much as the frequency bias LogN targets.
    With ten classes this is what makes it erratic from seed to seed.
``logn_balanced``
    the training split with every class weighted equally (:func:`class_balanced_moments`) --
    the expected statistics of a pass with a class-balanced sampler; no extra data.
``logn_val``
    every image of the manifest's ``val`` split once (held out; balanced in the splits
    :func:`taildet.classify.splits.make_split` writes). The test split is never used.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from taildet.calibration.logit_norm import LogitNormalizer
from taildet.calibration.moments import batch_moments, merge_moments
from taildet.errors import ConfigError

__all__ = ["LOGN_VARIANTS", "check_posthoc_splits", "class_balanced_moments", "logn_with_moments", "sample_moments", "logn_variant"]

#: post-hoc method name -> (split the statistics are taken on, class-balanced weighting)
LOGN_VARIANTS = {"logn": ("train", False), "logn_balanced": ("train", True), "logn_val": ("val", False)}


def check_posthoc_splits(posthoc: list, manifest: dict, manifest_file: str) -> None:
    """ConfigError when a LogN variant of ``posthoc`` takes its statistics from a split the
    manifest lacks (``logn_val`` without a ``val`` split)."""
    for name in posthoc:
        split = LOGN_VARIANTS.get(name, ("train",))[0]
        if not manifest.get("splits", {}).get(split):
            raise ConfigError(f"eval.posthoc: {name} takes its statistics from the {split!r} split, "
                              f"but the manifest {manifest_file} has no {split!r} split (remove {name}, "
                              "or make the split with a val part: taildet classify split --val-per-class)")


def sample_moments(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean [K], population variance [K])`` of the rows of ``logits [N, K]``, float64."""
    n, mean, m2 = batch_moments(logits)
    return mean, m2 / n.clamp(min=1.0)


def class_balanced_moments(logits: Tensor, labels: Any, num_classes: int) -> tuple[Tensor, Tensor]:
    """Mean and variance ``[K]`` (float64) of ``logits [N, K]`` with each class present in
    ``labels [N]`` weighted equally: ``mean = avg_k mean_k``, ``var = avg_k (var_k + (mean_k - mean)^2)``
    over the classes ``k`` with at least one row (``mean_k`` / ``var_k``: that class's rows'
    mean and population variance). Equal class counts give the plain moments."""
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if y.shape[0] != logits.shape[0]:
        raise ValueError(f"class_balanced_moments: {logits.shape[0]} logit rows but {y.shape[0]} labels")
    present = [k for k in range(num_classes) if bool((y == k).any())]
    if not present:
        raise ValueError("class_balanced_moments: no rows")
    parts = [batch_moments(logits[y == k]) for k in present]
    means = torch.stack([m for _, m, _ in parts])
    variances = torch.stack([m2 / n for n, _, m2 in parts])
    n, mean, m2 = merge_moments(torch.ones(len(present)), means, variances)  # every class counts once
    return mean, m2 / n


def logn_with_moments(logits: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """LogN without background with given column moments: ``(z - mean) / sqrt(var + eps)`` through
    :class:`LogitNormalizer` (the same formula and ``eps`` as :func:`taildet.classify.posthoc.logn`)."""
    norm = LogitNormalizer(logits.shape[1], background=False)
    norm.count.fill_(1.0)
    norm.mean.copy_(mean.to(torch.float64))
    norm.m2.copy_(var.to(torch.float64))
    return norm(logits)


def logn_variant(name: str, logits: Tensor, stats_logits: Tensor, stats_labels: Any) -> tuple[Tensor, dict]:
    """``(transformed logits, {"split", "class_balanced", "mean", "std"})`` of the LogN variant
    ``name`` (:data:`LOGN_VARIANTS`); ``stats_logits`` / ``stats_labels``: that variant's split."""
    split, balanced = LOGN_VARIANTS[name]
    num_classes = logits.shape[1]
    if balanced:
        mean, var = class_balanced_moments(stats_logits.double(), stats_labels, num_classes)
    else:
        mean, var = sample_moments(stats_logits.double())
    out = logn_with_moments(logits, mean, var)
    info = {"split": split, "class_balanced": balanced, "mean": [float(v) for v in mean],
            "std": [float(v) for v in torch.sqrt(var + LogitNormalizer(num_classes, background=False).eps)]}
    return out, info
