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

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from taildet.losses.base import ClassificationLoss
from taildet.ops import use_fast_path
from taildet.ops.rowwise import compute_dtype, log_softmax_, rowwise_loss
from taildet.ops.seesaw_kernel import SeesawKernel
from taildet.losses.state import all_reduce_sum_, check_finite_loss, check_inputs

__all__ = ["SeesawLoss", "seesaw_loss", "seesaw_log_factors"]


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

    def log_counts(self, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """``log N_j`` ``[C]`` of the current cumulative counts (each clamped to >= 1)."""
        n = self.cum_samples[: self.num_classes].to(device=device).clamp(min=1).to(torch.float64)
        return torch.log(n).to(dtype)

    def log_factors(self, class_logits: Tensor, labels: Tensor) -> Tensor:
        """``log(M_ij C_ij)`` ``[P, C]`` for foreground RoIs (0 on the target column)."""
        log_n = self.log_counts(class_logits.dtype, class_logits.device) if self.p > 0 else None
        return seesaw_log_factors(class_logits, labels, log_n, self.p, self.q, self.eps)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        labels = check_inputs(self, logits, labels, weight, finite=False)
        C = self.num_classes
        n = logits.shape[0]
        if self.training:
            with torch.no_grad():
                # per-class counts without bincount (a host sync on GPU for its length)
                counts = torch.zeros(C + 1, dtype=torch.int64, device=labels.device)
                counts.index_add_(0, labels, torch.ones_like(labels))
                all_reduce_sum_(counts)
                self.cum_samples += counts.to(self.cum_samples.device)
        if n == 0:
            return logits.sum() * 0.0
        dt = compute_dtype(logits.dtype)
        log_n = self.log_counts(dt, logits.device) if self.p > 0 else None
        w = None if weight is None else weight.detach().to(dt)
        factors = functools.partial(seesaw_log_factors, log_n=log_n, p=self.p, q=self.q, eps=self.eps)
        if use_fast_path(logits.device):  # row-blocked, closed-form gradient (taildet.ops.seesaw_kernel)
            value = rowwise_loss(logits, SeesawKernel(labels, C, factors, w), n)
        else:
            value = seesaw_loss(logits.to(dt), labels, C, factors, w)
        return check_finite_loss(self, value, logits)


def seesaw_log_factors(class_logits: Tensor, labels: Tensor, log_n: Tensor | None, p: float, q: float, eps: float,
                       out: Tensor | None = None, work: Tensor | None = None) -> Tensor:
    """``log(M_ij C_ij)`` ``[P, C]`` for foreground RoIs with labels ``[P]``; ``log_n`` ``[C]``
    (``None`` when ``p == 0``). Computed from the detached logits (no gradient through it).
    ``out`` / ``work``: optional contiguous ``[P, C]`` buffers to compute in (no temporaries)."""
    z = class_logits.detach()
    adj = torch.empty_like(z, memory_format=torch.contiguous_format) if out is None else out
    if q > 0:
        # compensation: q * max(log sigma_j - log max(sigma_i, eps), 0)
        adj.copy_(z)
        log_softmax_(adj)
        log_self = adj.gather(1, labels[:, None]).clamp_(min=math.log(eps))
        adj.sub_(log_self).clamp_(min=0.0).mul_(q)
    else:
        adj.zero_()
    if p > 0:
        # mitigation: p * min(log N_j - log N_i, 0)
        mit = torch.empty_like(adj) if work is None else work
        torch.sub(log_n[None, :], log_n[labels][:, None], out=mit)
        adj.add_(mit.clamp_(max=0.0), alpha=p)
    return adj


def seesaw_loss(logits: Tensor, labels: Tensor, num_classes: int, log_factors: Callable[..., Tensor],
                weight: Tensor | None) -> Tensor:
    """The Seesaw loss (methods.md section 5, mmdetection's objectness pair) written plainly:
    ``(sum_i w_i CE(z_i[C:], [y_i == C]) + sum_{i fg} w_i CE(z_i[:C] + log(M_i C_i), y_i)) / N``;
    ``log_factors(class_logits, labels)`` gives ``log(M_ij C_ij)`` of the foreground rows (from the
    detached logits: no gradient through the factors)."""
    C = num_classes
    obj = F.cross_entropy(logits[:, C:], (labels == C).long(), reduction="none")
    # every row's class term, background rows' zeroed (fixed shapes: no boolean-mask indexing,
    # which would read the mask on the host)
    fg = (labels < C).to(logits.dtype)
    yc = labels.clamp(max=C - 1)
    zc = logits[:, :C]
    cls = F.cross_entropy(zc + log_factors(zc.detach(), yc), yc, reduction="none") * fg
    if weight is None:
        return (obj.sum() + cls.sum()) / logits.shape[0]
    return ((obj * weight).sum() + (cls * weight).sum()) / logits.shape[0]
