"""Softmax cross-entropy over ``C + 1`` outputs, background last (the plain two-stage baseline).

``K = C + 1``; labels ``0..C-1`` are foreground, ``C`` is background. Reduction:

* ``weight is None``: the mean of the per-RoI cross-entropy (``F.cross_entropy``'s default);
* with a per-RoI ``weight [N]``: ``sum_i w_i * ce_i / N`` -- the weighted *sum* divided by the number
  of RoIs (not by ``sum(w)``), so an all-ones weight equals the unweighted mean and a weight of 0
  removes a RoI without re-scaling the others.

An empty batch of RoIs gives a zero loss that is still connected to ``logits``. Test-time scores are
the softmax with the background column dropped (the base class's :meth:`scores`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from taildet.losses.base import ClassificationLoss, reduce_loss

__all__ = ["SoftmaxCrossEntropyLoss", "check_logits"]


def check_logits(loss: ClassificationLoss, logits: Tensor, labels: Tensor, weight: Tensor | None) -> None:
    """Shape checks shared by the basic two-stage losses (clear messages instead of torch's)."""
    k = loss.num_outputs()
    if logits.dim() != 2 or logits.shape[1] != k:
        raise ValueError(
            f"{type(loss).__name__}: expected logits of shape [N, {k}] for {loss.num_classes} classes, "
            f"got {tuple(logits.shape)}"
        )
    if labels.shape != (logits.shape[0],):
        raise ValueError(
            f"{type(loss).__name__}: expected labels of shape [{logits.shape[0]}], got {tuple(labels.shape)}"
        )
    if weight is not None and weight.shape != (logits.shape[0],):
        raise ValueError(
            f"{type(loss).__name__}: expected weight of shape [{logits.shape[0]}], got {tuple(weight.shape)}"
        )


class SoftmaxCrossEntropyLoss(ClassificationLoss):
    """Cross-entropy on ``C + 1`` logits (background = column ``C``)."""

    kind = "two_stage"
    has_background = True

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        check_logits(self, logits, labels, weight)
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        if weight is None:
            return F.cross_entropy(logits, labels)
        ce = F.cross_entropy(logits, labels, reduction="none")
        return reduce_loss(ce, logits.shape[0], weight.to(ce.dtype))
