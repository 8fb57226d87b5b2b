"""Seesaw Loss for two-stage detectors, methods.md section 5.

``K = C + 2`` outputs: ``C`` class logits, then an objectness pair ``[fg, bg]`` (columns ``C``,
``C + 1``), as mmdetection's Seesaw head.

**Loss** = objectness + class term, both divided by ``N``, the number of all sampled RoIs:

* objectness: 2-way cross-entropy on every RoI (target ``fg`` = 0 for foreground labels,
  ``bg`` = 1 for label ``C``);
* class term, foreground RoIs only: cross-entropy over the ``C`` class logits after adding
  ``log(M_ij C_ij)`` to every non-target logit ``j != i = y``:
  ``M_ij = (N_j / N_i)^p`` if ``N_j < N_i`` else 1 (mitigation; ``N`` = cumulative sampled-RoI
  label counts, clamped to >= 1), ``C_ij = (sigma_j / sigma_i)^q`` if ``sigma_j > sigma_i`` else 1
  (compensation; ``sigma`` = softmax of the detached class logits, ``sigma_i`` clamped to
  >= ``eps``). The factors are computed directly in log form
  (``p min(log N_j - log N_i, 0) + q max(log sigma_j - log max(sigma_i, eps), 0)``), which is
  the same value without the reference's pow-then-log round trip.

A per-RoI ``weight`` multiplies both terms (still divided by ``N``).

**State**: ``cum_samples`` (int64 buffer ``[C + 1]``, background count at index ``C`` as the
reference keeps it; only the first ``C`` entries enter ``M``). **When**: in ``forward``, in
training mode only, *before* the loss of the same iteration (as the reference): the batch's label
counts are added. Under DDP the batch counts are summed over processes first, so every process
holds the global counts -- mmdetection keeps per-GPU counts instead (each GPU sees only its own
RoIs); taildet's choice makes the state independent of the number of GPUs.

**Test time**: ``softmax(z[:, :C]) * softmax(z[:, C:])[:, fg]``. Bias: zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from taildet.losses.base import ClassificationLoss
from taildet.losses.state import all_reduce_sum_, check_inputs

__all__ = ["SeesawLoss"]


class SeesawLoss(ClassificationLoss):
    """Seesaw Loss with a separate ``[fg, bg]`` objectness pair (``K = C + 2``).

    Args:
        num_classes: ``C``.
        p: mitigation exponent (0.8; 0 disables the mitigation factor).
        q: compensation exponent (2.0; 0 disables the compensation factor).
        eps: lower bound of the target-class probability in the compensation factor (1e-2).
    """

    kind = "two_stage"
    has_background = True

    def __init__(self, num_classes: int, p: float = 0.8, q: float = 2.0, eps: float = 1e-2):
        super().__init__(num_classes)
        name = type(self).__name__
        if float(p) < 0 or float(q) < 0:
            raise ValueError(f"{name}: p and q must be >= 0, got p={p!r}, q={q!r}")
        if not 0.0 < float(eps) <= 1.0:
            raise ValueError(f"{name}: eps must be in (0, 1], got {eps!r}")
        self.p = float(p)
        self.q = float(q)
        self.eps = float(eps)
        self.register_buffer("cum_samples", torch.zeros(self.num_classes + 1, dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, p={self.p}, q={self.q}, eps={self.eps}"

    def num_outputs(self) -> int:
        return self.num_classes + 2

    def scores(self, logits: Tensor) -> Tensor:
        C = self.num_classes
        return torch.softmax(logits[:, :C], dim=-1) * torch.softmax(logits[:, C:], dim=-1)[:, :1]

    def sync_state(self) -> None:
        """No-op: each batch's counts are already summed over processes in ``forward``."""

    def log_factors(self, class_logits: Tensor, labels: Tensor) -> Tensor:
        """``log(M_ij C_ij)`` ``[P, C]`` for foreground RoIs (0 on the target column)."""
        dtype = class_logits.dtype
        adj = class_logits.new_zeros(class_logits.shape)
        if self.p > 0:
            log_n = torch.log(self.cum_samples[: self.num_classes].to(class_logits.device).clamp(min=1).to(torch.float64))
            log_n = log_n.to(dtype)
            adj = adj + self.p * (log_n[None, :] - log_n[labels][:, None]).clamp(max=0.0)
        if self.q > 0:
            log_sig = torch.log_softmax(class_logits.detach(), dim=1)
            log_self = log_sig.gather(1, labels[:, None]).clamp(min=math.log(self.eps))
            adj = adj + self.q * (log_sig - log_self).clamp(min=0.0)
        return adj

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        check_inputs(self, logits, labels, weight)
        C = self.num_classes
        n = logits.shape[0]
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(labels, minlength=C + 1)
                all_reduce_sum_(counts)
                self.cum_samples += counts.to(self.cum_samples.device)
        if n == 0:
            return logits.sum() * 0.0
        obj_labels = (labels == C).long()
        obj = F.cross_entropy(logits[:, C:], obj_labels, reduction="none")
        pos = torch.nonzero(labels < C).flatten()
        if weight is not None:
            w = weight.to(logits.dtype)
            obj_sum = (obj * w).sum()
        else:
            obj_sum = obj.sum()
        if pos.numel() == 0:
            return (obj_sum + logits[:, :C].sum() * 0.0) / n
        zc = logits[pos, :C]
        y = labels[pos]
        cls = F.cross_entropy(zc + self.log_factors(zc, y), y, reduction="none")
        cls_sum = (cls * w[pos]).sum() if weight is not None else cls.sum()
        return (cls_sum + obj_sum) / n
