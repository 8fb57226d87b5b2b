"""Equalization Loss (EQL) and Equalization Loss v2 (EQLv2), methods.md section 5.

:class:`EQLLoss` (stateless)
    ``K = C`` sigmoid outputs, no background column; targets one-hot over ``C`` (background RoIs
    all-zero). ``w_ij = 1 - E(i) [f_j < lambda] (1 - t_ij)`` with ``E(i) = 1`` for foreground
    RoIs and 0 for background RoIs: a foreground RoI does not push down rare classes
    (``f_j < lambda``) other than its own. Loss ``sum_ij w_i w_ij BCE(z_ij, t_ij) / N`` (``w_i`` the
    optional per-RoI weight, 1 by default). Scores ``sigmoid(z)``. Bias: prior 0.01 (as taildet's
    plain sigmoid BCE).

:class:`EQLv2Loss` (stateful)
    ``K = C + 1`` sigmoid outputs, the last one an objectness column whose target is 1 on
    background RoIs (targets: one-hot over ``C + 1``). Per class ``j < C``:
    ``neg_w_j = sigmoid(gamma (r_j - mu))``, ``pos_w_j = 1 + alpha (1 - neg_w_j)``; the objectness
    column has weight 1. ``w_ij = pos_w_j t_ij + neg_w_j (1 - t_ij)``, loss
    ``sum_ij w_i w_ij BCE(z_ij, t_ij) / N``.

    State (buffers ``[C + 1]``, checkpointed): ``pos_grad`` ``G+``, ``neg_grad`` ``G-`` (init 0)
    and ``pos_neg`` ``r`` (init 100, so training starts with ``neg_w ~ 1``, ``pos_w ~ 1``).
    **When**: in ``forward``, in training mode only, *after* the loss has been computed with the
    current weights: ``g = |sigmoid(z) - t|`` (detached), ``G+ += sum_i g t w``, ``G- += sum_i
    g (1 - t) w`` (``w`` the full weight, per-RoI weight included), each batch's increments summed
    over processes when ``torch.distributed`` is initialised, then ``r = G+ / (G- + 1e-10)``.
    The objectness entries are accumulated too (the reference keeps only ``C``) but never used.

    Scores: ``sigmoid(z_j) * (1 - sigmoid(z_C))`` for ``j < C``. Bias: zeros (as the reference).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from taildet.losses.base import ClassificationLoss, SigmoidClassificationLoss, check_prior, reduce_loss
from taildet.losses.state import all_reduce_sum_, as_class_vector, cached, check_finite_loss, check_inputs, one_hot
from taildet.ops import use_fast_path
from taildet.ops.eqlv2_kernel import EQLv2Kernel
from taildet.ops.rowwise import SigmoidBCEKernel, compute_dtype, rowwise_loss

__all__ = ["EQLLoss", "EQLv2Loss", "eql_loss", "eqlv2_loss"]


class EQLLoss(SigmoidClassificationLoss):
    """Equalization Loss (sigmoid, ``K = C``).

    Args:
        num_classes: ``C``.
        image_frequency: ``[C]`` ``f_c`` (training images containing ``c`` / training images).
        lambda_: frequency threshold (0.0011 for LVIS v1).
        prior: initial foreground probability for the bias.
    """

    kind = "two_stage"
    needs = ("image_frequency",)
    repr_fields = ("lambda_",)

    def __init__(self, num_classes: int, image_frequency: Any = None, lambda_: float = 0.0011, prior: float = 0.01):
        super().__init__(num_classes)
        name = type(self).__name__
        f = as_class_vector(image_frequency, self.num_classes, name, "image_frequency")
        if bool(((f < 0) | (f > 1)).any()):
            raise ValueError(f"{name}: image_frequency must be in [0, 1]")
        self.prior = check_prior(prior, name)
        self.lambda_ = float(lambda_)
        self.register_buffer("image_frequency", f)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        labels = check_inputs(self, logits, labels, weight, finite=False)
        n = logits.shape[0]
        if n == 0:
            return logits.sum() * 0.0
        dt = compute_dtype(logits.dtype)
        rare = cached(self, f"rare@{self.lambda_}", self.image_frequency, dt, logits.device,
                      lambda: (self.image_frequency < self.lambda_).to(torch.float64))  # [C]: T_lambda(f_j)
        w = None if weight is None else weight.detach().to(dt)
        if use_fast_path(logits.device):  # row-blocked, no dense target (taildet.ops.rowwise)
            kernel = SigmoidBCEKernel(labels, self.num_classes, suppress=rare, weight=w)
            value = rowwise_loss(logits, kernel, n)
        else:
            value = eql_loss(logits.to(dt), labels, rare, w)
        return check_finite_loss(self, value, logits)


def eql_loss(logits: Tensor, labels: Tensor, rare: Tensor, weight: Tensor | None) -> Tensor:
    """EQL (methods.md section 5) written plainly: ``sum_ij w_i w_ij BCE(z_ij, t_ij) / N`` with
    ``w_ij = 1 - E(i) T_lambda(f_j) (1 - t_ij)``; ``rare`` ``[C]`` is ``T_lambda(f_j) = [f_j < lambda]``,
    ``E(i) = [y_i < C]``, ``t`` one-hot over ``C`` (background rows all zero)."""
    C = logits.shape[1]
    t = one_hot(labels, C + 1, logits.dtype)[:, :C]
    fg = (labels < C).to(logits.dtype)[:, None]
    w_ij = 1.0 - fg * rare * (1.0 - t)
    bce = (F.binary_cross_entropy_with_logits(logits, t, reduction="none") * w_ij).sum(1)
    return reduce_loss(bce, logits.shape[0], weight)


class EQLv2Loss(ClassificationLoss):
    """Equalization Loss v2 (sigmoid, ``K = C + 1`` with an objectness column last).

    Args:
        num_classes: ``C``.
        gamma, mu: the mapping ``neg_w = sigmoid(gamma (r - mu))`` (12, 0.8).
        alpha: ``pos_w = 1 + alpha (1 - neg_w)`` (4).
        init_ratio: initial ``r`` (100).
    """

    kind = "two_stage"
    has_background = True

    def __init__(self, num_classes: int, gamma: float = 12.0, mu: float = 0.8, alpha: float = 4.0, init_ratio: float = 100.0):
        super().__init__(num_classes)
        self.gamma = float(gamma)
        self.mu = float(mu)
        self.alpha = float(alpha)
        k = self.num_classes + 1
        self.register_buffer("pos_grad", torch.zeros(k))
        self.register_buffer("neg_grad", torch.zeros(k))
        self.register_buffer("pos_neg", torch.full((k,), float(init_ratio)))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, gamma={self.gamma}, mu={self.mu}, alpha={self.alpha}"

    def num_outputs(self) -> int:
        return self.num_classes + 1

    def scores(self, logits: Tensor) -> Tensor:
        p = torch.sigmoid(logits)
        return p[:, : self.num_classes] * (1.0 - p[:, self.num_classes :])

    def class_weights(self, dtype: torch.dtype = torch.float32, device: Any = None) -> tuple[Tensor, Tensor]:
        """``(pos_w, neg_w)``, each ``[C + 1]``, from the current ratio (objectness entries 1)."""
        r = self.pos_neg.to(device=device, dtype=dtype)
        neg_w = torch.sigmoid(self.gamma * (r - self.mu))
        neg_w[self.num_classes] = 1.0
        pos_w = 1.0 + self.alpha * (1.0 - neg_w)
        return pos_w, neg_w

    def sync_state(self) -> None:
        """No-op: each batch's increments are already summed over processes in ``forward``."""

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        labels = check_inputs(self, logits, labels, weight, finite=False)
        n = logits.shape[0]
        if n == 0:
            if self.training:  # the increments are all-reduced: every process takes part
                zero = torch.zeros(self.num_outputs(), dtype=torch.float64, device=logits.device)
                self._accumulate(zero, zero)
            return logits.sum() * 0.0
        dt = compute_dtype(logits.dtype)
        pos_w, neg_w = self.class_weights(dt, logits.device)
        w = None if weight is None else weight.detach().to(dt)
        if use_fast_path(logits.device):  # row-blocked, no dense target (taildet.ops.eqlv2_kernel)
            kernel = EQLv2Kernel(labels, pos_w, neg_w, w, collect=self.training)
            loss = check_finite_loss(self, rowwise_loss(logits, kernel, n), logits)
            pos_inc, neg_inc = kernel.pos_inc, kernel.neg_inc
        else:
            value, pos_inc, neg_inc = eqlv2_loss(logits.to(dt), labels, pos_w, neg_w, w)
            loss = check_finite_loss(self, value, logits)
        if self.training:
            self._accumulate(pos_inc, neg_inc)
        return loss

    @torch.no_grad()
    def _accumulate(self, pos: Tensor, neg: Tensor) -> None:
        """The state update of one iteration (after its loss): ``G+ += pos``, ``G- += neg`` (this
        batch's ``sum_i |dBCE/dz| w`` per class on target / non-target entries, summed over
        processes), then ``r = G+ / (G- + 1e-10)``."""
        inc = torch.stack([pos, neg]).to(self.pos_grad.dtype)
        all_reduce_sum_(inc)
        self.pos_grad += inc[0].to(self.pos_grad.device)
        self.neg_grad += inc[1].to(self.neg_grad.device)
        self.pos_neg.copy_(self.pos_grad / (self.neg_grad + 1e-10))


def eqlv2_loss(logits: Tensor, labels: Tensor, pos_w: Tensor, neg_w: Tensor, weight: Tensor | None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """EQLv2 (methods.md section 5) written plainly: ``(loss, pos_inc, neg_inc)``.

    ``loss = sum_ij w_i w_ij BCE(z_ij, t_ij) / N`` with ``w_ij = pos_w_j t_ij + neg_w_j (1 - t_ij)``
    (``t`` one-hot over ``C + 1``); ``pos_inc`` / ``neg_inc`` ``[C + 1]`` (float64) are this batch's
    gradient statistics ``sum_i g w t`` and ``sum_i g w (1 - t)`` with ``g = |sigmoid(z) - t|``
    (detached), ``w`` the full weight.
    """
    t = one_hot(labels, logits.shape[1], logits.dtype)
    w_ij = pos_w * t + neg_w * (1.0 - t)
    if weight is not None:
        w_ij = w_ij * weight[:, None]
    value = reduce_loss(F.binary_cross_entropy_with_logits(logits, t, weight=w_ij, reduction="none"), logits.shape[0])
    with torch.no_grad():
        g = (torch.sigmoid(logits.detach()) - t).abs() * w_ij
        pos_inc = (g * t).sum(0).to(torch.float64)
        neg_inc = (g * (1.0 - t)).sum(0).to(torch.float64)
    return value, pos_inc, neg_inc
