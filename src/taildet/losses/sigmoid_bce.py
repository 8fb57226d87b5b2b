"""Sigmoid binary cross-entropy over ``C`` outputs (no background column).

``K = C``. Targets are one-hot over the ``C`` foreground classes; background RoIs (label ``C``)
have an all-zero target row. Loss: ``sum_{i,j} w_i * BCE(z_ij, t_ij) / N`` with ``N`` the number
of RoIs (``w = 1`` when no weight is given). Test-time scores: ``sigmoid(z)``. The classifier
bias starts at the prior ``-log((1 - p) / p)`` with ``p = 0.01`` by default, so every class
starts with a score of about ``p`` instead of 0.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from taildet.losses.base import SigmoidClassificationLoss, check_prior, reduce_loss
from taildet.losses.softmax_ce import check_logits

__all__ = ["SigmoidBCELoss", "one_hot_targets"]


def one_hot_targets(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``[N, C]`` one-hot targets; rows of background labels (``== C``) are all zero."""
    targets = torch.zeros(labels.shape[0], num_classes + 1, dtype=dtype, device=labels.device)
    targets[torch.arange(labels.shape[0], device=labels.device), labels] = 1.0
    return targets[:, :num_classes]


class SigmoidBCELoss(SigmoidClassificationLoss):
    """Binary cross-entropy on ``C`` sigmoid logits (background = all-zero target)."""

    kind = "two_stage"

    def __init__(self, num_classes: int, prior: float = 0.01):
        super().__init__(num_classes)
        self.prior = check_prior(prior)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        check_logits(self, logits, labels, weight)
        n = logits.shape[0]
        if n == 0:
            return logits.sum() * 0.0
        targets = one_hot_targets(labels, self.num_classes, logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return reduce_loss(bce, n, None if weight is None else weight.to(bce.dtype))
