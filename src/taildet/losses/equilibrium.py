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

Under DDP the per-class observation counts and sums of all processes are summed first (the same
as gathering every observation, so every process applies the same update and the state stays
identical). Then for every class ``c`` with ``n >= 1``
observations ``s_c <- alpha^n s_c + (1 - alpha^n) mean(obs_c)``, and finally the background entry
is reset to ``s_C = bg_score`` (0.01).

**Loss** (paper eq. 3-4): ``L_i = CE(z_i + log s, y_i)`` for every sampled RoI, background
included, computed as a cross-entropy of shifted logits (no ratio ``s_j / s_y`` that could
underflow; :class:`~taildet.losses.rowwise.SoftmaxOffsetKernel`, exact also where the target
probability underflows). ``log s`` uses ``max(s, 1e-12)``. Reduction: averaged over RoIs with positive label
weight -- the mean over RoIs without ``weight``, else ``sum_i w_i L_i / max(#{i: w_i > 0}, 1)``
(mmdetection's ``avg_factor`` for RoI heads). Equal ``s`` for all classes gives plain CE.

**Test time**: softmax of the raw logits, background dropped (no adjustment). Bias: zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taildet.losses.base import ClassificationLoss
from taildet.losses.rowwise import Scratch, SoftmaxOffsetKernel, compute_dtype, log_softmax_, rowwise_loss
from taildet.losses.state import all_reduce_sum_, cached, check_finite_loss, check_inputs, label_range

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
        # per class: the number of observations n_c and their sum (float64, [C + 1])
        n_obs = torch.zeros(C + 1, dtype=torch.float64, device=logits.device)
        obs_sum = torch.zeros_like(n_obs)

        pos = torch.nonzero(labels < C).flatten()
        if pos.numel():
            gid = gt_index[pos]
            y = labels[pos]
            prob = _target_prob(logits, y, pos)
            # one host sync for the id range and the finiteness check
            lo, hi, finite = torch.stack([gid.min(), gid.max(), torch.isfinite(prob).all().long()]).tolist()
            if lo < 0:
                raise ValueError(f"{name}.update: foreground RoIs need gt_index >= 0 (got -1 for a positive RoI)")
            if not finite:
                raise ValueError(f"{name}.update: logits contain NaN or infinite values")
            # one observation per GT instance: the mean probability of its class over its RoIs
            cnt = torch.bincount(gid, minlength=hi + 1).to(prob.dtype)
            sums = prob.new_zeros(hi + 1).index_add_(0, gid, prob)
            gt_cls = torch.zeros(hi + 1, dtype=torch.int64, device=y.device).scatter_(0, gid, y)
            if bool((gt_cls[gid] != y).any()):
                raise ValueError(f"{name}.update: gt_index assigns RoIs of different labels to the same GT")
            # ids without RoIs (gaps in gt_index) add 0 observations and 0 / 1 to class 0
            n_obs.index_add_(0, gt_cls, (cnt > 0).to(n_obs.dtype))
            obs_sum.index_add_(0, gt_cls, sums / cnt.clamp(min=1.0))
        for m_logits, m_labels in mem:
            if m_labels.numel() == 0:
                continue
            m_labels = m_labels.to(logits.device)
            prob = _target_prob(m_logits.to(logits.device), m_labels)
            if not bool(torch.isfinite(prob).all()):
                raise ValueError(f"{name}.update: memory-sample logits contain NaN or infinite values")
            # one observation per class among the memory samples: its mean probability
            cnt = torch.bincount(m_labels, minlength=C + 1).to(prob.dtype)
            sums = prob.new_zeros(C + 1).index_add_(0, m_labels, prob)
            seen = cnt > 0
            n_obs += seen.to(n_obs.dtype)
            obs_sum += torch.where(seen, sums / cnt.clamp(min=1.0), torch.zeros_like(sums))

        # DDP: summing (n_c, sum_c) over processes == gathering every process's observations
        stats = all_reduce_sum_(torch.stack([n_obs, obs_sum])).to(dev)
        n, total = stats[0], stats[1]
        s = self.mean_score.to(torch.float64)
        # s <- a s + (1 - a) mean with a = alpha^n; n = 0 gives a = 1 (and mean 0 / 1): unchanged
        keep = torch.pow(self.alpha, n)
        s.add_((total / n.clamp(min=1.0)).sub_(s).mul_(keep.neg_().add_(1.0)))
        s[C] = self.bg_score
        self.mean_score.copy_(s)

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
            lo_v, hi_v = label_range(labels)
            if lo_v < 0 or hi_v > hi:
                raise ValueError(f"{name}: labels must be in 0..{hi}, got [{lo_v}, {hi_v}]")

    # -- loss --------------------------------------------------------------------------------------

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        check_inputs(self, logits, labels, weight, finite=False)
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        dt = compute_dtype(logits.dtype)
        log_s = cached(self, "log_s", self.mean_score, dt, logits.device,
                       lambda: torch.log(self.mean_score.to(torch.float64).clamp(min=1e-12)))
        if weight is None:
            w, denom = None, logits.shape[0]
        else:
            w = weight.detach().to(dt)
            denom = (w > 0).sum().clamp(min=1).to(dt)
        # CE(z + log s, y), row-blocked with its closed-form gradient (taildet.losses.rowwise)
        value = rowwise_loss(logits, SoftmaxOffsetKernel(labels, log_s, w), denom)
        return check_finite_loss(self, value, logits)


def _target_prob(logits: Tensor, labels: Tensor, rows: Tensor | None = None) -> Tensor:
    """Softmax probability of ``labels`` per row (only the needed entries), returned in float64.

    ``rows`` (optional ``[P]`` indices) selects the rows of ``logits`` first; ``labels`` then has
    ``P`` entries. The log-softmax runs in the logits' precision (float32 for half precision), in
    a reused work buffer (no fresh large temporary on CPU)."""
    z = logits.detach()
    dt = compute_dtype(z.dtype)
    n = z.shape[0] if rows is None else rows.shape[0]
    buf = Scratch().empty((n, z.shape[1]), dt, z.device, slot=10)
    if rows is None:
        buf.copy_(z)
    elif dt == z.dtype:
        torch.index_select(z, 0, rows, out=buf)
    else:
        buf.copy_(z[rows])
    lp = log_softmax_(buf).gather(1, labels[:, None]).squeeze(1)
    return torch.exp(lp.to(torch.float64))
