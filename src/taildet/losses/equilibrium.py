"""Equilibrium Loss (EBL) of LOCE, methods.md section 2 (the MFS memory lives in taildet.sampling).

``K = C + 1`` softmax outputs, background last. State: the mean classification score ``s``
(:class:`~taildet.losses.mean_score.MeanScoreTracker`, buffer ``[C + 1]`` initialised to
``init_score = 0.01``; checkpointed under the loss's own key ``mean_score``, as before the tracker
was shared with MFS).

**Update** (:meth:`EquilibriumLoss.update`, called by the RoI head after sampling -- and after
the MFS memory is sampled -- and *before* the loss of the same iteration): the tracker's EMA rule
``s_c <- alpha^n s_c + (1 - alpha^n) mean(obs_c)`` over the iteration's observations (one per GT
instance, one per class among the memory samples; summed over DDP processes), then
``s_C = bg_score`` (0.01). See :mod:`taildet.losses.mean_score`.

**Loss** (paper eq. 3-4): ``L_i = CE(z_i + log s, y_i)`` for every sampled RoI, background
included, computed as a cross-entropy of shifted logits (no ratio ``s_j / s_y`` that could
underflow; :func:`equilibrium_loss`; the fast path :class:`~taildet.ops.rowwise.SoftmaxOffsetKernel`
is exact also where the target probability underflows). ``log s`` uses ``max(s, 1e-12)``. Reduction: averaged over RoIs with positive label
weight -- the mean over RoIs without ``weight``, else ``sum_i w_i L_i / max(#{i: w_i > 0}, 1)``
(mmdetection's ``avg_factor`` for RoI heads). Equal ``s`` for all classes gives plain CE.

**Test time**: softmax of the raw logits, background dropped (no adjustment). Bias: zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taildet.losses.base import ClassificationLoss, reduce_loss
from taildet.losses.mean_score import MeanScoreTracker
from taildet.ops import use_fast_path
from taildet.ops.rowwise import SoftmaxOffsetKernel, compute_dtype, rowwise_loss
from taildet.losses.state import cached, check_finite_loss, check_inputs

__all__ = ["EquilibriumLoss", "equilibrium_loss"]


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
        self.tracker = MeanScoreTracker(num_classes, alpha, bg_score, init_score, owner=type(self).__name__)
        # checkpoints keep the pre-tracker key ``<prefix>mean_score`` (not ``tracker.mean_score``)
        self._register_state_dict_hook(_flatten_tracker_key)
        self._register_load_state_dict_pre_hook(_nest_tracker_key)

    @property
    def mean_score(self) -> Tensor:
        """``[C + 1]`` mean classification score ``s`` (the tracker's buffer)."""
        return self.tracker.mean_score

    @property
    def alpha(self) -> float:
        return self.tracker.alpha

    @property
    def bg_score(self) -> float:
        return self.tracker.bg_score

    @property
    def _pending(self) -> list[tuple[Tensor, Tensor]]:
        return self.tracker.pending

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}, bg_score={self.bg_score}"

    # -- state -------------------------------------------------------------------------------------

    def observe_memory(self, logits: Tensor, labels: Tensor) -> None:
        """Queue memory samples (MFS) for the next :meth:`update` (same as passing ``extra_*``).

        ``logits [M, C + 1]`` (detached inside), ``labels [M]`` foreground classes. The queue is
        plain Python state, emptied by the next :meth:`update`, never checkpointed.
        """
        self.tracker.observe_memory(logits, labels)

    def sync_state(self) -> None:
        """No-op: :meth:`update` already gathers every process's observations, so the state is
        identical on all processes (nothing to reduce after the optimizer step)."""

    def update(
        self,
        logits: Tensor,
        labels: Tensor,
        gt_index: Tensor | None = None,
        extra_logits: Tensor | None = None,
        extra_labels: Tensor | None = None,
    ) -> None:
        """One iteration's update of ``mean_score``: :meth:`MeanScoreTracker.update` (its
        docstring gives the shapes; ``gt_index`` is required)."""
        self.tracker.update(logits, labels, gt_index, extra_logits, extra_labels)

    # -- loss --------------------------------------------------------------------------------------

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        labels = check_inputs(self, logits, labels, weight, finite=False)
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
        if use_fast_path(logits.device):  # row-blocked, closed-form gradient (taildet.ops.rowwise)
            value = rowwise_loss(logits, SoftmaxOffsetKernel(labels, log_s, w), denom)
        else:
            value = equilibrium_loss(logits.to(dt), labels, log_s, w, denom)
        return check_finite_loss(self, value, logits)


def equilibrium_loss(logits: Tensor, labels: Tensor, log_s: Tensor, weight: Tensor | None,
                     denom: Tensor | float) -> Tensor:
    """Paper eq. 3-4 written plainly: ``sum_i w_i CE(z_i + log s, y_i) / denom`` (``w_i = 1``
    without ``weight``), the cross-entropy of the logits shifted by ``log s`` ``[C + 1]``."""
    ce = F.cross_entropy(logits + log_s, labels, reduction="none")
    return reduce_loss(ce, denom, weight)



_KEY = "mean_score"
_NESTED = "tracker.mean_score"


def _flatten_tracker_key(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict hook: ``<prefix>tracker.mean_score`` is saved as ``<prefix>mean_score``."""
    if prefix + _NESTED in state_dict:
        state_dict[prefix + _KEY] = state_dict.pop(prefix + _NESTED)


def _nest_tracker_key(state_dict: dict, prefix: str, *args: object) -> None:
    """load_state_dict pre-hook: ``<prefix>mean_score`` (every checkpoint, before and after the
    tracker) loads into the tracker's buffer."""
    if prefix + _KEY in state_dict and prefix + _NESTED not in state_dict:
        state_dict[prefix + _NESTED] = state_dict.pop(prefix + _KEY)
