"""The mean classification score of LOCE (methods.md section 2), shared by EBL and MFS.

``s`` in ``R^(C+1)`` (buffer ``mean_score``, every entry initialised to ``init_score = 0.01``;
checkpointed, unlike the reference). Each training iteration, from the softmax of the
*unadjusted, detached* logits of a ``C + 1``-way head (background last), observations are collected:

* one per GT instance with at least one positive RoI: its class, and the mean over the RoIs
  assigned to it (``gt_index``, batch-unique ids, ``-1`` for background) of their probability of
  that class;
* one per class among the memory samples (``extra_logits`` / ``extra_labels``, or rows queued with
  :meth:`MeanScoreTracker.observe_memory`): the mean probability of that class over its samples.

Under DDP the per-class observation counts and sums of all processes are summed first (the same as
gathering every observation, so every process applies the same update and the state stays
identical). Then for every class ``c`` with ``n >= 1`` observations

    s_c <- alpha^n s_c + (1 - alpha^n) mean(obs_c)

and finally the background entry is reset to ``s_C = bg_score`` (``s_hat`` = 0.01).

Users: :class:`~taildet.losses.equilibrium.EquilibriumLoss` (the loss adds ``log s`` to the logits)
and MFS (:mod:`taildet.sampling.mfs`; its class sampler draws ``P(c) ~ 1 / s_c``; with a loss that
keeps no mean score MFS owns a tracker of its own).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from taildet.losses.state import all_reduce_sum_, label_range
from taildet.ops.pool import Scratch
from taildet.ops.rowwise import compute_dtype, log_softmax_
from taildet.utils.host_sync import avoid_host_sync, checks_deferred, expect

__all__ = ["MeanScoreTracker", "target_prob"]


class MeanScoreTracker(nn.Module):
    """EMA of each class's mean classification score (see the module docstring).

    Args:
        num_classes: ``C`` (the tracked head has ``C + 1`` outputs, background last).
        alpha: EMA factor per observation (0.9).
        bg_score: the background substitute ``s_hat`` written to ``s_C`` after every update (0.01).
        init_score: initial value of every entry of ``mean_score`` (0.01).
        owner: the name error messages start with (the class name by default; EBL passes its own).
    """

    def __init__(self, num_classes: int, alpha: float = 0.9, bg_score: float = 0.01, init_score: float = 0.01,
                 *, owner: str | None = None):
        super().__init__()
        self.owner = owner or type(self).__name__
        if int(num_classes) <= 0:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not 0.0 <= float(alpha) < 1.0:
            raise ValueError(f"{self.owner}: alpha must be in [0, 1), got {alpha!r}")
        for arg, v in (("bg_score", bg_score), ("init_score", init_score)):
            if not 0.0 < float(v) <= 1.0:
                raise ValueError(f"{self.owner}: {arg} must be in (0, 1], got {v!r}")
        self.num_classes = int(num_classes)
        self.alpha = float(alpha)
        self.bg_score = float(bg_score)
        self.register_buffer("mean_score", torch.full((self.num_classes + 1,), float(init_score)))
        #: memory samples queued by :meth:`observe_memory` for the next :meth:`update` (plain Python
        #: state, never checkpointed)
        self.pending: list[tuple[Tensor, Tensor]] = []

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}, bg_score={self.bg_score}"

    def observe_memory(self, logits: Tensor, labels: Tensor) -> None:
        """Queue memory samples (MFS) for the next :meth:`update` (same as passing ``extra_*``).

        ``logits [M, C + 1]`` (detached inside), ``labels [M]`` foreground classes.
        """
        self.check_observations(logits, labels, "observe_memory", foreground_only=True)
        self.pending.append((logits.detach(), labels.detach()))

    @torch.no_grad()
    def update(
        self,
        logits: Tensor,
        labels: Tensor,
        gt_index: Tensor | None = None,
        extra_logits: Tensor | None = None,
        extra_labels: Tensor | None = None,
    ) -> None:
        """One iteration's update of ``mean_score``.

        Args:
            logits: ``[N, C + 1]`` logits of the sampled RoIs (detached inside).
            labels: ``[N]`` ``0..C-1`` foreground, ``C`` background.
            gt_index: ``[N]`` batch-unique id of the GT each positive RoI is assigned to (``-1``
                for background). Required.
            extra_logits, extra_labels: memory samples (MFS) ``[M, C + 1]`` / ``[M]`` foreground.
        """
        name = self.owner
        self.check_observations(logits, labels, "update", foreground_only=False)
        if gt_index is None:
            raise ValueError(f"{name}.update: gt_index is required (one observation per GT instance)")
        if gt_index.shape != labels.shape:
            raise ValueError(f"{name}.update: gt_index must have shape {tuple(labels.shape)}, got {tuple(gt_index.shape)}")
        mem = list(self.pending)
        self.pending.clear()
        if (extra_logits is None) != (extra_labels is None):
            raise ValueError(f"{name}.update: give both extra_logits and extra_labels, or neither")
        if extra_logits is not None:
            self.check_observations(extra_logits, extra_labels, "update (extra)", foreground_only=True)
            mem.append((extra_logits, extra_labels))
        n_obs, obs_sum = self._observations(logits, labels, gt_index, mem)
        # DDP: summing (n_c, sum_c) over processes == gathering every process's observations
        stats = all_reduce_sum_(torch.stack([n_obs, obs_sum])).to(self.mean_score.device)
        self._ema_step(stats[0], stats[1])

    def _observations(self, logits: Tensor, labels: Tensor, gt_index: Tensor,
                      memory: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Per class: the number of observations ``n_c`` and their sum (float64, ``[C + 1]``)."""
        name, C = self.owner, self.num_classes
        n_obs = torch.zeros(C + 1, dtype=torch.float64, device=logits.device)
        obs_sum = torch.zeros_like(n_obs)

        if avoid_host_sync(logits):
            self._gt_observations_sync_free(logits, labels, gt_index, n_obs, obs_sum)
        else:
            self._gt_observations(logits, labels, gt_index, n_obs, obs_sum)
        for m_logits, m_labels in memory:
            if m_labels.numel() == 0:
                continue
            m_labels = m_labels.to(logits.device)
            if checks_deferred():  # in range until the queued check raises
                m_labels = m_labels.clamp(0, C - 1)
            prob = target_prob(m_logits.to(logits.device), m_labels)
            expect(torch.isfinite(prob).all(), _raiser(f"{name}.update: memory-sample logits contain NaN or infinite values"))
            # one observation per class among the memory samples: its mean probability
            cnt = prob.new_zeros(C + 1).index_add_(0, m_labels, torch.ones_like(prob))
            sums = prob.new_zeros(C + 1).index_add_(0, m_labels, prob)
            seen = cnt > 0
            n_obs += seen.to(n_obs.dtype)
            obs_sum += torch.where(seen, sums / cnt.clamp(min=1.0), torch.zeros_like(sums))
        return n_obs, obs_sum

    def _gt_observations(self, logits: Tensor, labels: Tensor, gt_index: Tensor, n_obs: Tensor,
                         obs_sum: Tensor) -> None:
        """The GT instances' observations added into ``n_obs`` / ``obs_sum`` (CPU: the positive rows
        compacted with ``nonzero``, one host read for the checks)."""
        name, C = self.owner, self.num_classes
        pos = torch.nonzero(labels < C).flatten()
        if pos.numel():
            gid = gt_index[pos]
            y = labels[pos]
            prob = target_prob(logits, y, pos)
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

    def _gt_observations_sync_free(self, logits: Tensor, labels: Tensor, gt_index: Tensor, n_obs: Tensor,
                                   obs_sum: Tensor) -> None:
        """:meth:`_gt_observations` with fixed shapes and no host read (GPU): every row is kept
        (background rows weighted 0); the GT ids are renumbered ``0..G-1`` by a sort (a
        ``unique`` without its host read), per-GT counts and sums by ``index_add_``; the checks
        are :func:`~taildet.utils.host_sync.expect` flags."""
        name, C = self.owner, self.num_classes
        n = labels.shape[0]
        if n == 0:
            return
        fg = labels < C
        prob = target_prob(logits, labels.clamp(0, C - 1))
        expect(~(fg & (gt_index < 0)).any(),
               _raiser(f"{name}.update: foreground RoIs need gt_index >= 0 (got -1 for a positive RoI)"))
        expect((torch.isfinite(prob) | ~fg).all(), _raiser(f"{name}.update: logits contain NaN or infinite values"))
        key = torch.where(fg, gt_index, torch.full_like(gt_index, -1))
        sorted_key, order = torch.sort(key)
        first = torch.ones_like(sorted_key, dtype=torch.bool)
        first[1:] = sorted_key[1:] != sorted_key[:-1]
        group = torch.empty_like(order).scatter_(0, order, torch.cumsum(first, 0) - 1)  # [N] dense GT ids
        w = fg.to(prob.dtype)
        cnt = prob.new_zeros(n).index_add_(0, group, w)
        sums = prob.new_zeros(n).index_add_(0, group, torch.where(fg, prob, torch.zeros_like(prob)))
        hi = torch.full((n,), -1, dtype=labels.dtype, device=labels.device).scatter_reduce_(0, group, labels, "amax")
        lo = torch.full((n,), C + 1, dtype=labels.dtype, device=labels.device).scatter_reduce_(0, group, labels, "amin")
        has = cnt > 0
        expect(~(has & (hi != lo)).any(), _raiser(f"{name}.update: gt_index assigns RoIs of different labels to the same GT"))
        gt_cls = hi.clamp(0, C)  # groups without foreground RoIs add 0 observations
        n_obs.index_add_(0, gt_cls, has.to(n_obs.dtype))
        obs_sum.index_add_(0, gt_cls, torch.where(has, sums / cnt.clamp(min=1.0), torch.zeros_like(sums)))

    def _ema_step(self, n: Tensor, total: Tensor) -> None:
        """``s_c <- alpha^n s_c + (1 - alpha^n) total_c / n_c`` for every class, then ``s_C = s_hat``."""
        s = self.mean_score.to(torch.float64)
        # s <- a s + (1 - a) mean with a = alpha^n; n = 0 gives a = 1 (and mean 0 / 1): unchanged
        keep = torch.pow(self.alpha, n)
        s.add_((total / n.clamp(min=1.0)).sub_(s).mul_(keep.neg_().add_(1.0)))
        s[self.num_classes] = self.bg_score
        self.mean_score.copy_(s)

    def check_observations(self, logits: Tensor, labels: Tensor | None, where: str, foreground_only: bool) -> None:
        """``ValueError`` naming the owner unless ``logits [N, C + 1]`` and int64 ``labels [N]`` in
        ``0..C`` (``0..C-1`` with ``foreground_only``)."""
        name = f"{self.owner}.{where}"
        k = self.num_classes + 1
        if logits.dim() != 2 or logits.shape[1] != k:
            raise ValueError(f"{name}: expected logits of shape [N, {k}], got {tuple(logits.shape)}")
        if labels is None or labels.shape != (logits.shape[0],):
            raise ValueError(f"{name}: expected labels of shape [{logits.shape[0]}]")
        if labels.dtype != torch.int64:
            raise ValueError(f"{name}: expected int64 labels, got {labels.dtype}")
        if labels.numel():
            hi = self.num_classes - 1 if foreground_only else self.num_classes
            lo_v, hi_v = torch.aminmax(labels)

            def diagnose() -> None:
                lo_i, hi_i = label_range(labels)
                raise ValueError(f"{name}: labels must be in 0..{hi}, got [{lo_i}, {hi_i}]")

            expect((lo_v >= 0) & (hi_v <= hi), diagnose)


def target_prob(logits: Tensor, labels: Tensor, rows: Tensor | None = None) -> Tensor:
    """Softmax probability of ``labels`` per row (only the needed entries), returned in float64.

    ``rows`` (optional ``[P]`` indices) selects the rows of ``logits`` first; ``labels`` then has
    ``P`` entries. The log-softmax runs in the logits' precision (float32 for half precision), in
    a reused work buffer (no fresh large temporary on CPU)."""
    z = logits.detach()
    dt = compute_dtype(z.dtype)
    n = z.shape[0] if rows is None else rows.shape[0]
    buf = Scratch().empty((n, z.shape[1]), dt, z.device, "target_log_prob")
    if rows is None:
        buf.copy_(z)
    elif dt == z.dtype:
        torch.index_select(z, 0, rows, out=buf)
    else:
        buf.copy_(z[rows])
    lp = log_softmax_(buf).gather(1, labels[:, None]).squeeze(1)
    return torch.exp(lp.to(torch.float64))


def _raiser(message: str):
    """A ``diagnose`` for :func:`~taildet.utils.host_sync.expect` that raises ``ValueError(message)``."""
    def diagnose() -> None:
        raise ValueError(message)
    return diagnose
