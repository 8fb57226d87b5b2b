"""Sigmoid focal loss for one-stage (dense) detectors (Lin et al., "Focal Loss for Dense Object
Detection").

``K = C`` sigmoid outputs per anchor, no background column. With ``p = sigmoid(x)``, a binary
target ``t``, ``p_t = p t + (1 - p)(1 - t)`` and ``alpha_t = alpha t + (1 - alpha)(1 - t)``::

    FL(x, t) = alpha_t * (1 - p_t) ** gamma * BCE_with_logits(x, t)

``BCE_with_logits`` is ``-log p_t`` computed stably, so saturated logits (``|x| = 100``) give a
finite loss and finite gradients. ``alpha < 0`` disables the alpha weighting (as in torchvision).

One-stage label convention (see :mod:`taildet.losses.base`): ``labels[i]`` is ``0..C-1`` for a
positive anchor, ``C`` for a negative anchor (all-zero target row) and ``-1`` for an ignored anchor
(contributes nothing). The loss is the sum over non-ignored anchors and all ``C`` classes divided by
``max(normalizer, 1)``; the normalizer defaults to the number of positive anchors.

Two code paths, equal up to float rounding (``tests/test_losses_sync_free_one_stage.py``): on the
CPU the ignored anchors are dropped by a boolean mask (fewer rows, but the host reads the mask);
where :func:`taildet.utils.host_sync.avoid_host_sync` holds (CUDA, any non-CPU device) every row
is kept, the one-hot target built by comparison with the class indices and the ignored rows'
terms zeroed, so the loss reads no device value on the host (forward or backward). The label
check goes through :func:`taildet.utils.host_sync.expect` (queued inside
:func:`~taildet.utils.host_sync.deferred_checks`).

:func:`focal_loss` is the element-wise maths on its own (no reduction), for comparisons with the
Equalized Focal Loss, which reduces to it when every class's focusing factor equals ``gamma``.
The numeric reference is :func:`torchvision.ops.sigmoid_focal_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from taildet.losses.base import ClassificationLoss, SigmoidClassificationLoss, check_prior, default_normalizer, reduce_loss
from taildet.losses.base import mean_over_ranks as mean_over_ranks  # re-exported
from taildet.losses.one_stage_inputs import sparse_positives as sparse_positives  # re-exported
from taildet.losses.state import label_range
from taildet.utils.host_sync import avoid_host_sync, checks_deferred, expect

__all__ = ["SigmoidFocalLoss", "focal_loss", "dense_targets", "sparse_positives", "check_dense_inputs"]


def focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss, same shape as ``logits`` (no reduction).

    Args:
        logits: raw logits, any shape.
        targets: targets in ``[0, 1]`` of the same shape (one-hot rows for detection).
        alpha: weight of the positive targets (``1 - alpha`` for negatives); ``< 0`` disables it.
        gamma: focusing exponent (``0`` gives (alpha-weighted) binary cross-entropy).
    """
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1.0 - p) * (1.0 - targets)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        alpha_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
        loss = alpha_t * loss
    return loss


def check_dense_inputs(loss: ClassificationLoss, logits: Tensor, labels: Tensor) -> Tensor:
    """Shape, dtype and label-range checks for one-stage losses (clear messages instead of torch's);
    returns the labels to compute with.

    The shapes are checked on the host; the label range (``-1..C``) through
    :func:`taildet.utils.host_sync.expect`: one host read, or none inside
    :func:`~taildet.utils.host_sync.deferred_checks`, where the check is queued and the labels
    returned are clamped into ``-1..C`` (no kernel indexes out of bounds before it raises)."""
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
    if labels.dtype != torch.int64:
        raise ValueError(f"{type(loss).__name__}: expected int64 labels, got {labels.dtype}")
    if not labels.numel():
        return labels
    lo_v, hi_v = torch.aminmax(labels)

    def diagnose() -> None:
        lo, hi = label_range(labels)
        raise ValueError(
            f"{type(loss).__name__}: labels must be in -1..{loss.num_classes} (-1 ignored, "
            f"{loss.num_classes} negative), got values in {lo}..{hi}"
        )

    expect((lo_v >= -1) & (hi_v <= loss.num_classes), diagnose)
    return labels.clamp(-1, loss.num_classes) if checks_deferred() else labels


def dense_targets(labels: Tensor, num_classes: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Split a one-stage label vector into ``(valid, targets)``.

    ``valid`` is the boolean mask ``labels >= 0`` (ignored anchors removed); ``targets`` is the
    ``[num_valid, C]`` one-hot matrix of the valid anchors (all-zero rows for negatives, label ``C``).
    The CPU path of :class:`SigmoidFocalLoss` (the boolean mask makes the host read the labels).
    """
    valid = labels >= 0
    kept = labels[valid]
    targets = torch.zeros(kept.shape[0], num_classes + 1, dtype=dtype, device=labels.device)
    targets[torch.arange(kept.shape[0], device=labels.device), kept] = 1.0
    return valid, targets[:, :num_classes]


class SigmoidFocalLoss(SigmoidClassificationLoss):
    """Sigmoid focal loss over ``C`` outputs for dense one-stage heads (stateless).

    Args:
        num_classes: number of foreground classes ``C``.
        alpha: positive-target weight (``< 0`` disables the alpha weighting).
        gamma: focusing exponent.
        prior: initial foreground probability; the classifier bias starts at
            ``-log((1 - prior) / prior)``.

    ``forward(logits [N, C], labels [N], normalizer=None, quality=None)``; ``quality`` is accepted
    for interface compatibility (EQFL uses it) and ignored.
    """

    kind = "one_stage"
    repr_fields = ("alpha", "gamma", "prior")

    def __init__(self, num_classes: int, alpha: float = 0.25, gamma: float = 2.0, prior: float = 0.01):
        super().__init__(num_classes)
        self.prior = check_prior(prior)
        if float(gamma) < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        if float(alpha) > 1.0:
            raise ValueError(f"alpha must be <= 1 (negative disables it), got {alpha!r}")
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        normalizer: float | Tensor | None = None,
        quality: Tensor | None = None,
    ) -> Tensor:
        labels = check_dense_inputs(self, logits, labels)
        # float32 for half-precision logits (AMP), as EFL / QFL: 1 - p_t in float16 quantises the
        # focal factor of easy negatives (prior ~0.01) and zeroes it below p ~ 2.4e-4
        x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        num_pos = ((labels >= 0) & (labels < self.num_classes)).sum()
        normalizer = default_normalizer(num_pos, normalizer, x.dtype)
        if avoid_host_sync(x):  # every row kept, the ignored ones zeroed: no host read
            classes = torch.arange(self.num_classes, device=labels.device)
            targets = (labels[:, None] == classes).to(x.dtype)  # all-zero rows for labels C and -1
            terms = focal_loss(x, targets, self.alpha, self.gamma)
            return reduce_loss(torch.where((labels >= 0)[:, None], terms, terms.new_zeros(())), normalizer)
        valid, targets = dense_targets(labels, self.num_classes, x.dtype)
        return reduce_loss(focal_loss(x[valid], targets, self.alpha, self.gamma), normalizer)
