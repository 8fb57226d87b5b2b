"""Equilibrium Loss (EBL) of LOCE, methods.md section 2 (the MFS memory lives in taildet.sampling).

``K = C + 1`` softmax outputs, background last. State: ``mean_score`` ``s`` (buffer ``[C + 1]``,
every entry initialised to ``init_score = 0.01``; checkpointed, unlike the reference).

**Update** (:meth:`EquilibriumLoss.update`, called by the RoI head after sampling -- and after
the MFS memory is sampled -- and *before* the loss of the same iteration). From the softmax of
the unadjusted, detached logits:

* one observation per GT instance with at least one positive RoI: its class, and the mean over
  the RoIs assigned to it (``gt_index``, batch-unique ids, ``-1`` for background) of their
  probability of that class;
* one observation per class among the memory samples (``extra_logits`` / ``extra_labels``, or
  rows queued with :meth:`EquilibriumLoss.observe_memory`): the mean probability of that class
  over its samples.

Under DDP the observations of all processes are gathered first (so every process applies the
same update and the state stays identical). Then for every class ``c`` with ``n >= 1``
observations ``s_c <- alpha^n s_c + (1 - alpha^n) mean(obs_c)``, and finally the background entry
is reset to ``s_C = bg_score`` (0.01).

**Loss** (paper eq. 3-4): ``L_i = CE(z_i + log s, y_i)`` for every sampled RoI, background
included, computed as a cross-entropy of shifted logits (log-softmax; no ratio that could
underflow). ``log s`` uses ``max(s, 1e-12)``. Reduction: averaged over RoIs with positive label
weight -- the mean over RoIs without ``weight``, else ``sum_i w_i L_i / max(#{i: w_i > 0}, 1)``
(mmdetection's ``avg_factor`` for RoI heads). Equal ``s`` for all classes gives plain CE.

**Test time**: softmax of the raw logits, background dropped (no adjustment). Bias: zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from taildet.losses.base import ClassificationLoss
from taildet.losses.state import all_gather_cat, cached, check_inputs

__all__ = ["EquilibriumLoss"]


class EquilibriumLoss(ClassificationLoss):
    """Equilibrium Loss: cross-entropy of logits shifted by the log mean classification score.

    Args:
        num_classes: ``C``.
        alpha: EMA factor per observation (0.9).
        bg_score: the background substitute ``s_hat`` written to ``s_C`` after every update (0.01).
        init_score: initial value of every entry of ``mean_score`` (0.01).
    """

    kind = "two_stage"
    has_background = True

    def __init__(self, num_classes: int, alpha: float = 0.9, bg_score: float = 0.01, init_score: float = 0.01):
        super().__init__(num_classes)
        name = type(self).__name__
        if not 0.0 <= float(alpha) < 1.0:
            raise ValueError(f"{name}: alpha must be in [0, 1), got {alpha!r}")
        for arg, v in (("bg_score", bg_score), ("init_score", init_score)):
            if not 0.0 < float(v) <= 1.0:
                raise ValueError(f"{name}: {arg} must be in (0, 1], got {v!r}")
        self.alpha = float(alpha)
        self.bg_score = float(bg_score)
        self.register_buffer("mean_score", torch.full((self.num_classes + 1,), float(init_score)))
        self._pending: list[tuple[Tensor, Tensor]] = []

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}, bg_score={self.bg_score}"

    # -- state -------------------------------------------------------------------------------------

    def observe_memory(self, logits: Tensor, labels: Tensor) -> None:
        """Queue memory samples (MFS) for the next :meth:`update` (same as passing ``extra_*``).

        ``logits [M, C + 1]`` (detached inside), ``labels [M]`` foreground classes. The queue is
        plain Python state, emptied by the next :meth:`update`, never checkpointed.
        """
        self._check_obs(logits, labels, "observe_memory", foreground_only=True)
        self._pending.append((logits.detach(), labels.detach()))

    def sync_state(self) -> None:
        """No-op: :meth:`update` already gathers every process's observations, so the state is
        identical on all processes (nothing to reduce after the optimizer step)."""

    @torch.no_grad()
    def update(
        self,
        logits: Tensor,
        labels: Tensor,
        gt_index: Tensor | None = None,
        extra_logits: Tensor | None = None,
        extra_labels: Tensor | None = None,
    ) -> None:
        """One iteration's update of ``mean_score`` (see the module docstring).

        Args:
            logits: ``[N, C + 1]`` logits of the sampled RoIs (detached inside).
            labels: ``[N]`` ``0..C-1`` foreground, ``C`` background.
            gt_index: ``[N]`` batch-unique id of the GT each positive RoI is assigned to (``-1``
                for background). Required.
            extra_logits, extra_labels: memory samples (MFS) ``[M, C + 1]`` / ``[M]`` foreground.
        """
        name = type(self).__name__
        C = self.num_classes
        self._check_obs(logits, labels, "update", foreground_only=False)
        if gt_index is None:
            raise ValueError(f"{name}.update: gt_index is required (one observation per GT instance)")
        if gt_index.shape != labels.shape:
            raise ValueError(f"{name}.update: gt_index must have shape {tuple(labels.shape)}, got {tuple(gt_index.shape)}")
        mem = list(self._pending)
        self._pending.clear()
        if (extra_logits is None) != (extra_labels is None):
            raise ValueError(f"{name}.update: give both extra_logits and extra_labels, or neither")
        if extra_logits is not None:
            self._check_obs(extra_logits, extra_labels, "update (extra)", foreground_only=True)
            mem.append((extra_logits, extra_labels))

        dev = self.mean_score.device
        cls_parts: list[Tensor] = []
        val_parts: list[Tensor] = []

        pos = torch.nonzero(labels < C).flatten()
        if pos.numel():
            gid = gt_index[pos]
            y = labels[pos]
            prob = _target_prob(logits[pos], y)
            uniq, inv = torch.unique(gid, return_inverse=True)
            sums = prob.new_zeros(uniq.shape[0]).index_add_(0, inv, prob)
            cnt = prob.new_zeros(uniq.shape[0]).index_add_(0, inv, torch.ones_like(prob))
            gt_cls = torch.zeros(uniq.shape[0], dtype=torch.int64, device=y.device).scatter_(0, inv, y)
            # one host sync for the three consistency checks
            flags = torch.stack([(gid < 0).any(), (gt_cls[inv] != y).any(), ~torch.isfinite(prob).all()]).tolist()
            if flags[0]:
                raise ValueError(f"{name}.update: foreground RoIs need gt_index >= 0 (got -1 for a positive RoI)")
            if flags[1]:
                raise ValueError(f"{name}.update: gt_index assigns RoIs of different labels to the same GT")
            if flags[2]:
                raise ValueError(f"{name}.update: logits contain NaN or infinite values")
            cls_parts.append(gt_cls)
            val_parts.append(sums / cnt)
        for m_logits, m_labels in mem:
            if m_labels.numel() == 0:
                continue
            prob = _target_prob(m_logits.to(logits.device), m_labels.to(logits.device))
            if not bool(torch.isfinite(prob).all()):
                raise ValueError(f"{name}.update: memory-sample logits contain NaN or infinite values")
            uniq, inv = torch.unique(m_labels.to(logits.device), return_inverse=True)
            sums = prob.new_zeros(uniq.shape[0]).index_add_(0, inv, prob)
            cnt = torch.bincount(inv, minlength=uniq.shape[0]).to(prob.dtype)
            cls_parts.append(uniq)
            val_parts.append(sums / cnt)

        if cls_parts:
            obs = torch.stack([torch.cat(cls_parts).to(torch.float64), torch.cat(val_parts)], dim=1)
        else:
            obs = torch.zeros(0, 2, dtype=torch.float64, device=logits.device)
        obs = all_gather_cat(obs).to(dev)
        s = self.mean_score.to(torch.float64)
        if obs.shape[0]:
            cls = obs[:, 0].round().long()
            n = torch.zeros(C + 1, dtype=torch.float64, device=dev).index_add_(0, cls, torch.ones_like(obs[:, 1]))
            total = torch.zeros(C + 1, dtype=torch.float64, device=dev).index_add_(0, cls, obs[:, 1])
            seen = n > 0
            a = torch.pow(torch.full_like(n, self.alpha), n)
            s = torch.where(seen, a * s + (1.0 - a) * total / n.clamp(min=1.0), s)
        s[C] = self.bg_score
        self.mean_score.copy_(s.to(self.mean_score.dtype))

    def _check_obs(self, logits: Tensor, labels: Tensor | None, where: str, foreground_only: bool) -> None:
        name = f"{type(self).__name__}.{where}"
        k = self.num_outputs()
        if logits.dim() != 2 or logits.shape[1] != k:
            raise ValueError(f"{name}: expected logits of shape [N, {k}], got {tuple(logits.shape)}")
        if labels is None or labels.shape != (logits.shape[0],):
            raise ValueError(f"{name}: expected labels of shape [{logits.shape[0]}]")
        if labels.dtype != torch.int64:
            raise ValueError(f"{name}: expected int64 labels, got {labels.dtype}")
        if labels.numel():
            hi = self.num_classes - 1 if foreground_only else self.num_classes
            if bool(((labels < 0) | (labels > hi)).any()):
                raise ValueError(f"{name}: labels must be in 0..{hi}, got [{int(labels.min())}, {int(labels.max())}]")

    # -- loss --------------------------------------------------------------------------------------

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        check_inputs(self, logits, labels, weight)
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        log_s = cached(self, "log_s", self.mean_score, logits.dtype, logits.device,
                       lambda: torch.log(self.mean_score.to(torch.float64).clamp(min=1e-12)))
        z = logits + log_s
        if weight is None:
            return F.cross_entropy(z, labels)
        w = weight.to(logits.dtype)
        ce = F.cross_entropy(z, labels, reduction="none")
        return (ce * w).sum() / (w > 0).sum().clamp(min=1).to(ce.dtype)


def _target_prob(logits: Tensor, labels: Tensor) -> Tensor:
    """Softmax probability of ``labels`` per row (only the needed entries), returned in float64.

    The log-sum-exp runs in the logits' precision (float32 for half-precision logits)."""
    z = logits.detach()
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    lp = z.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(z, dim=1)
    return torch.exp(lp.to(torch.float64))
