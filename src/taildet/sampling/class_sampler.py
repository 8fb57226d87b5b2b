"""MFS probabilistic class sampler (LOCE, methods.md section 2).

Draws ``k = 8`` classes with replacement, ``P(c) ~ 1 / (s_c + 1e-7)`` over the foreground entries
of the mean classification score ``s`` (:class:`~taildet.losses.mean_score.MeanScoreTracker`),
or ``P(c) ~ 1 / n_c`` from training instance counts (the "dataset prior" variant; classes without
instances get 0); then ``m = 4`` entries with replacement per drawn class; drawn classes whose
queue is empty are skipped. Seeded ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from taildet.sampling.memory_bank import ClassMemory

__all__ = ["ProbabilisticSampler"]


class ProbabilisticSampler:
    """Which memory entries join an iteration: ``k`` classes, then ``m`` entries per class.

    Args:
        num_classes: ``C``.
        classes_per_iter: ``k`` classes drawn with replacement per iteration (8).
        samples_per_class: ``m`` entries drawn with replacement per drawn class (4).
        prior: ``"mean_score"`` -- ``P(c) ~ 1 / (s_c + eps)`` from the foreground mean
            classification score; ``"instance_counts"`` -- ``P(c) ~ 1 / n_c`` from training
            instance counts (given here; classes with ``n_c = 0`` get probability 0).
        instance_counts: ``[C]`` for ``prior="instance_counts"``.
        eps: 1e-7. seed: of the sampler's own ``torch.Generator`` (host).
    """

    def __init__(self, num_classes: int, classes_per_iter: int = 8, samples_per_class: int = 4, *,
                 prior: str = "mean_score", instance_counts: Sequence[int] | np.ndarray | Tensor | None = None,
                 eps: float = 1e-7, seed: int = 0):
        if prior not in ("mean_score", "instance_counts"):
            raise ValueError(f"ProbabilisticSampler: prior must be 'mean_score' or 'instance_counts', got {prior!r}")
        if int(classes_per_iter) < 1 or int(samples_per_class) < 1:
            raise ValueError("ProbabilisticSampler: classes_per_iter and samples_per_class must be >= 1")
        self.num_classes = int(num_classes)
        self.k = int(classes_per_iter)
        self.m = int(samples_per_class)
        self.prior = prior
        self.eps = float(eps)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._count_probs: Tensor | None = None
        if prior == "instance_counts":
            if instance_counts is None:
                raise ValueError("ProbabilisticSampler: prior='instance_counts' needs instance_counts")
            n = torch.as_tensor(np.asarray(instance_counts), dtype=torch.float64).flatten()
            if n.numel() != self.num_classes or bool((n < 0).any()):
                raise ValueError(f"ProbabilisticSampler: instance_counts must be {self.num_classes} "
                                 f"non-negative counts, got {n.numel()} values")
            w = torch.where(n > 0, 1.0 / n.clamp(min=1.0), torch.zeros_like(n))
            if float(w.sum()) <= 0:
                raise ValueError("ProbabilisticSampler: every instance count is 0")
            self._count_probs = w / w.sum()

    def class_probabilities(self, mean_score: Tensor | None = None) -> Tensor:
        """``[C]`` float64 probabilities (host). ``mean_score``: the foreground scores ``[C]``
        (needed for ``prior="mean_score"``; ``[C + 1]`` with background last is sliced)."""
        if self._count_probs is not None:
            return self._count_probs
        if mean_score is None:
            raise ValueError("ProbabilisticSampler: prior='mean_score' needs the mean score")
        s = mean_score.detach().to("cpu", torch.float64).flatten()
        if s.numel() == self.num_classes + 1:
            s = s[: self.num_classes]
        if s.numel() != self.num_classes:
            raise ValueError(f"ProbabilisticSampler: expected {self.num_classes} mean scores, got {s.numel()}")
        w = 1.0 / (s.clamp(min=0.0) + self.eps)
        return w / w.sum()

    def draw_classes(self, probs: Tensor) -> Tensor:
        """``k`` classes drawn with replacement from ``probs`` (int64, host)."""
        return torch.multinomial(probs, self.k, replacement=True, generator=self.generator)

    def draw(self, memory: ClassMemory, mean_score: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(classes, slots)`` (host int64, ``m`` per drawn class with a non-empty queue)."""
        classes = self.draw_classes(self.class_probabilities(mean_score))
        u = torch.rand(classes.numel(), self.m, generator=self.generator)
        cnt = memory.count[classes]
        keep = cnt > 0
        classes, cnt, u = classes[keep], cnt[keep], u[keep]
        slots = torch.minimum((u * cnt[:, None]).long(), (cnt - 1)[:, None])
        return classes.repeat_interleave(self.m), slots.flatten()
