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
from torch import Tensor

from taildet.losses.base import ClassificationLoss
from taildet.losses.rowwise import (Scratch, compute_dtype, log_softmax_, minus_ones, rowwise_loss,
                                    softmax_target_log_prob_)
from taildet.losses.state import all_reduce_sum_, check_finite_loss, check_inputs

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

    def log_counts(self, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """``log N_j`` ``[C]`` of the current cumulative counts (each clamped to >= 1)."""
        n = self.cum_samples[: self.num_classes].to(device=device).clamp(min=1).to(torch.float64)
        return torch.log(n).to(dtype)

    def log_factors(self, class_logits: Tensor, labels: Tensor) -> Tensor:
        """``log(M_ij C_ij)`` ``[P, C]`` for foreground RoIs (0 on the target column)."""
        log_n = self.log_counts(class_logits.dtype, class_logits.device) if self.p > 0 else None
        return seesaw_log_factors(class_logits, labels, log_n, self.p, self.q, self.eps)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        check_inputs(self, logits, labels, weight, finite=False)
        C = self.num_classes
        n = logits.shape[0]
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(labels, minlength=C + 1)
                all_reduce_sum_(counts)
                self.cum_samples += counts.to(self.cum_samples.device)
        if n == 0:
            return logits.sum() * 0.0
        dt = compute_dtype(logits.dtype)
        log_n = self.log_counts(dt, logits.device) if self.p > 0 else None
        w = None if weight is None else weight.detach().to(dt)
        kernel = _SeesawKernel(labels, C, log_n, self.p, self.q, self.eps, w)
        return check_finite_loss(self, rowwise_loss(logits, kernel, n), logits)


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


class _SeesawKernel:
    """Rows of the Seesaw loss (taildet.losses.rowwise): objectness CE on every row plus the class
    CE of ``z + log(M C)`` on foreground rows, each times the per-RoI weight.

    The forward leaves both softmaxes in the ``[r, C + 2]`` buffer that becomes the gradient
    (class columns zero on background rows), so the backward is a subtraction of the one-hot
    targets and a row scaling: two exponential passes over the foreground rows in all (the
    compensation factor's softmax and the adjusted logits' softmax)."""

    def __init__(self, labels: Tensor, num_classes: int, log_n: Tensor | None, p: float, q: float, eps: float,
                 weight: Tensor | None):
        self.labels, self.C, self.log_n = labels, num_classes, log_n
        self.p, self.q, self.eps, self.weight = p, q, eps, weight

    def _split(self, rows: slice):
        """Objectness targets ``[r, 1]``, foreground row indices ``[P]`` and their labels ``[P]``."""
        y = self.labels[rows]
        return (y == self.C).long()[:, None], torch.nonzero(y < self.C).flatten(), y

    def _adjusted(self, z: Tensor, pos: Tensor, yp: Tensor, scratch: Scratch | None) -> Tensor:
        """The foreground rows' adjusted class logits ``z + log(M C)`` ``[P, C]`` (in work buffers
        when ``scratch`` is given)."""
        shape = (pos.shape[0], self.C)
        buf = (lambda slot: None) if scratch is None else (lambda slot: scratch.empty(shape, z.dtype, z.device, slot))
        zc = buf(1)
        zc = torch.index_select(z[:, : self.C], 0, pos, out=zc) if zc is not None else z[:, : self.C].index_select(0, pos)
        adj = seesaw_log_factors(zc, yp, self.log_n, self.p, self.q, self.eps, out=buf(2), work=buf(3))
        return zc.add_(adj)

    def loss(self, z: Tensor, rows: slice, scratch: Scratch) -> Tensor:
        return self.loss_keep(z, rows, scratch(z), scratch)

    def loss_keep(self, z: Tensor, rows: slice, keep: Tensor, scratch: Scratch | None = None) -> Tensor:
        """:meth:`loss`, leaving in ``keep`` ``[r, C + 2]`` the class softmax of the adjusted logits
        (foreground rows; 0 on background rows) and the objectness softmax."""
        C = self.C
        scratch = Scratch() if scratch is None else scratch
        obj_t, pos, y = self._split(rows)
        yp = y[pos]
        zc = self._adjusted(z, pos, yp, scratch)
        cls = -softmax_target_log_prob_(zc, yp[:, None],
                                        lambda idx: self._adjusted(z, pos[idx], yp[idx], None))
        lo = torch.log_softmax(z[:, C:], dim=1)
        obj = -lo.gather(1, obj_t).squeeze(1)
        keep_cls = keep[:, :C]
        if pos.shape[0] < y.shape[0]:
            keep_cls.zero_()  # (index_fill_ of the background rows: single-threaded, ~10x slower)
        keep_cls.index_copy_(0, pos, zc)
        torch.exp(lo, out=keep[:, C:])
        if self.weight is None:
            return obj.sum() + cls.sum()
        w = self.weight[rows]
        return (obj * w).sum() + (cls * w[pos]).sum()

    def grad_from_kept(self, kept: Tensor, rows: slice, scale: Tensor) -> None:
        """:meth:`grad` in place from :meth:`loss_keep`'s buffer: ``scale * w (softmax - onehot)``."""
        C = self.C
        obj_t, pos, y = self._split(rows)
        kept.index_put_((pos, y[pos]), minus_ones(pos.shape[0], kept.dtype, kept.device).squeeze(1), accumulate=True)
        kept[:, C:].scatter_add_(1, obj_t, minus_ones(obj_t.shape[0], kept.dtype, kept.device))
        if self.weight is None:
            kept.mul_(scale)
        else:
            kept.mul_((self.weight[rows] * scale)[:, None])

    def grad(self, z: Tensor, rows: slice, scale: Tensor, out: Tensor, scratch: Scratch) -> None:
        # the same op sequence as loss_keep + grad_from_kept, so every backward gives the same bits
        self.loss_keep(z, rows, out, scratch)
        self.grad_from_kept(out, rows, scale)
