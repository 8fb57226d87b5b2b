"""Equalized Focal Loss (EFL) and Equalized Quality Focal Loss (EQFL) for one-stage detectors
(Li et al., "Equalized Focal Loss for Dense Long-Tailed Object Detection", seed 003;
``shared/spec/methods.md`` section 4).

``K = C`` sigmoid outputs per anchor, no background column. With ``p = sigmoid(x)``, a binary
target ``t``, ``p_t = p t + (1 - p)(1 - t)``, ``alpha_t = alpha t + (1 - alpha)(1 - t)`` and, per
class ``j`` (methods.md section 4)::

    r_j     = clamp(G+_j / (G-_j + 1e-10), 0, 1)      (pos_neg_ratio)
    gamma_j = gamma_b + s (1 - r_j)                     (focusing factor)
    w_j     = gamma_j / gamma_b                         (weighting factor)

    EFL  = sum_ij alpha_t w_j (1 - p_t)^gamma_j (-log p_t) / normalizer
    EQFL = sum_ij w_j |q_ij - p|^gamma_j BCE(x, q_ij)   / normalizer

``-log p_t`` and ``BCE`` are computed from log-sigmoids / ``binary_cross_entropy_with_logits``,
never ``log(sigmoid(x))``, so saturated logits (``|x| = 100``) give finite losses and gradients.
For EQFL, ``q_ij`` is the localisation quality (IoU of the detached decoded box with its GT) on
the positive entry ``j = label`` of a positive anchor and 0 everywhere else; EQFL has no alpha.

Gradient (the paper's appendix eq. 6, derived once and used by the custom backward;
``CE = -log p_t``, ``u = 1 - p_t``, ``p(1 - p) = p_t u``)::

    d/dx [c u^g CE]  for t = 1:  -c u^g (g p CE + u)        (u = 1 - p)
                     for t = 0:  +c p^g (g (1 - p) CE + p)   (u = p, CE = -log(1 - p))
    d/dx [c |d|^g BCE(x, q)], d = p - q:
                     c (g sign(d) |d|^(g - 1) p (1 - p) BCE + |d|^g d)

with ``c = alpha_t w_j / normalizer`` (EFL) or ``w_j / normalizer`` (EQFL); ``gamma_j`` and
``w_j`` come from the state and get no gradient. A negative EQFL entry (``q = 0``) is exactly the
``t = 0`` EFL formula without alpha.

The loss is written plainly in :func:`equalized_focal_loss` (a dense target matrix, both formulas
on every entry). Its fast path, :func:`taildet.ops.efl_kernel.sparse_focal_loss_and_grad`
(the negative formula on every entry, the few positive entries corrected: no target matrix), is
chosen per device by :func:`taildet.ops.use_fast_path`, as for the other losses, and tested equal.
Either form takes the positive entries in a layout of :mod:`taildet.losses.one_stage_inputs`:
compacted on the CPU (ignored rows dropped, ``nonzero``), fixed-shape where
:func:`taildet.utils.host_sync.avoid_host_sync` holds (CUDA: every row kept, ignored ones with
zero weight and zero gradient), where the forward, the backward and the state update read no
device value on the host. The two layouts give equal losses, gradients and state (tested).

State and when it changes
-------------------------
Buffers (so ``state_dict``/checkpoints keep them): ``pos_grad`` = G+ and ``neg_grad`` = G-
(``[C]``, float32, initially 0) and ``pos_neg_ratio`` = r (``[C]``, initially 1, so training starts
as plain focal loss). The loss is a custom :class:`torch.autograd.Function`: its forward computes
the loss *and* the analytic gradient in one pass, its backward multiplies that gradient by the
incoming ``grad_output`` (chain rule: any loss weight, the sum with other losses, AMP's GradScaler
scale) and calls :meth:`EqualizedFocalLoss._accumulate` -- the one place the state changes -- with
it; no module hooks. So, for one iteration:

1. ``forward`` reads ``r`` as left by the previous backward (``gamma_j``, ``w_j`` of iteration
   ``t`` use the gradients of iterations ``< t``);
2. ``backward`` accumulates ``G+_j += sum_i |g_ij| t_ij`` and ``G-_j += sum_i |g_ij| (1 - t_ij)``
   (``g`` = the gradient of the total loss w.r.t. these logits, ignored anchors excluded), summed
   over DDP ranks, and recomputes ``r``.

Details:

* Accumulation is in float32 (or float64 for a float64 module) whatever the logits' dtype (AMP).
* DDP: the per-class sums are averaged over processes inside the backward
  (:func:`taildet.utils.comm.all_reduce_mean_`: the sum divided by the world size). DDP averages
  gradients, so the objective it optimises is the mean of the ranks' losses; ``g_rank /
  world_size`` is that objective's gradient w.r.t. the rank's logits, and the state equals that
  of one process seeing all ranks' anchors when the normalizer is the rank-averaged positive
  count (the default). Every rank must run the backward of this loss (it always does under DDP).
* GradScaler: the incoming gradient of a scaled backward is ``S`` times the true one. The
  accumulated ``g`` is divided by ``loss.grad_scale`` (1 by default), which the trainer sets to
  the scaler's current scale before every AMP backward (:func:`set_grad_scale`; a custom loop
  with GradScaler must do the same), so ``G+`` / ``G-`` hold the true gradients whatever ``S``
  (without it, iterations run with a larger ``S`` would weigh more in the cumulative sums). A
  contribution that is not finite (after the DDP reduction, so every rank agrees) is dropped, so
  an overflowing iteration that GradScaler skips cannot poison the state.
* Set ``loss.update_state = False`` to freeze the state (e.g. a stage 2 with fixed ratios).

Also usable outside detection (any ``[N, C]`` multi-label logits with a ``{0, 1}`` target
matrix): :meth:`EqualizedFocalLoss.forward_multilabel` (sync-free too where the host must not
read: every entry is then a candidate positive, masked by the targets).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from taildet.losses.base import SigmoidClassificationLoss, check_prior
from taildet.losses.focal import check_dense_inputs, default_normalizer, mean_over_ranks  # noqa: F401
from taildet.losses.one_stage_inputs import (PositiveEntries, check_binary_targets, check_quality, multilabel_entries,
                                             positive_entries, positive_quality, positive_values)
from taildet.ops import use_fast_path
from taildet.ops.efl_kernel import sparse_focal_loss_and_grad
from taildet.utils.comm import all_reduce_mean_

__all__ = [
    "EqualizedFocalLoss",
    "EqualizedQualityFocalLoss",
    "equalized_focal_loss",
    "equalized_focal_loss_terms",
    "equalized_focal_loss_grad",
    "equalized_quality_focal_loss_terms",
    "equalized_quality_focal_loss_grad",
    "focusing_factors",
    "mean_over_ranks",
    "set_grad_scale",
]

_EPS = 1e-10


# ----------------------------------------------------------------------------------------------
# the loss, written plainly (methods.md section 4)


def focusing_factors(ratio: Tensor, gamma_b: float, scale: float) -> tuple[Tensor, Tensor]:
    """``(gamma_j, w_j)`` from the positive/negative gradient ratio ``r_j`` (``[C]``):
    ``gamma_j = gamma_b + s (1 - r_j)``, ``w_j = gamma_j / gamma_b`` (methods.md section 4)."""
    gamma = gamma_b + scale * (1.0 - ratio)
    return gamma, gamma / gamma_b


def equalized_focal_loss(
    x: Tensor,
    rows: Tensor,
    cols: Tensor,
    gamma: Tensor,
    weight: Tensor,
    normalizer: Tensor | float,
    *,
    alpha: float = 0.25,
    quality: Tensor | None = None,
    need_grad: bool = True,
    keep: Tensor | None = None,
    pos: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """EFL (``quality is None``) or EQFL of logits ``x`` ``[N, C]`` and its gradient, as methods.md
    section 4 writes them: ``(sum_ij l_ij / normalizer, d/dx of it)`` (the gradient None unless
    ``need_grad``).

    The targets: ``t_ij = 1`` on the positive entries ``x[rows, cols]`` (each at most once), 0
    elsewhere; for EQFL ``q_ij`` = ``quality`` ``[P]`` on them, 0 elsewhere. ``l_ij`` is
    ``alpha_t w_j (1 - p_t)^gamma_j (-log p_t)`` (EFL; ``alpha < 0``: no alpha) or
    ``w_j |q_ij - p|^gamma_j BCE(x_ij, q_ij)`` (EQFL), with ``gamma``, ``weight`` the ``[C]``
    vectors ``gamma_j``, ``w_j``; its derivative is the paper's appendix eq. 6 (module docstring).
    Fixed-shape layout (:mod:`taildet.losses.one_stage_inputs`): only the candidates ``pos``
    (``[P]`` bool) are positive, and the rows outside ``keep`` (``[N]`` bool) add nothing.
    """
    t = torch.zeros_like(x)
    t[rows, cols] = 1.0 if pos is None else pos.to(x.dtype)
    if quality is None:
        terms, grad = _efl_terms(x, t, gamma, weight, alpha)
    else:
        q = torch.zeros_like(x)
        q[rows, cols] = quality.to(x.dtype) if pos is None else torch.where(pos, quality.to(x.dtype), 0.0)
        terms, grad = _quality_terms(x, q, gamma, weight)
    if keep is not None:
        terms, grad = terms.masked_fill_(~keep[:, None], 0.0), grad.masked_fill_(~keep[:, None], 0.0)
    return terms.sum() / normalizer, (grad / normalizer if need_grad else None)


def _efl_terms(x: Tensor, targets: Tensor, gamma: Tensor, weight: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Element-wise EFL ``alpha_t w_j (1 - p_t)^gamma_j (-log p_t)`` and its derivative."""
    a_pos, a_neg = _alphas(alpha)
    loss_p, grad_p = _positive_terms(x, gamma, a_pos * weight)
    loss_n, grad_n = _negative_terms(x, gamma, a_neg * weight)
    pos = targets > 0
    return torch.where(pos, loss_p, loss_n), torch.where(pos, grad_p, grad_n)


def _alphas(alpha: float) -> tuple[float, float]:
    """``(alpha_t for t = 1, alpha_t for t = 0)``; ``alpha < 0`` disables it (both 1)."""
    return (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)


def _negative_terms(x: Tensor, gamma: Tensor | float, coef: Tensor | float) -> tuple[Tensor, Tensor]:
    """Loss ``c p^g (-log(1 - p))`` and its derivative ``c p^g (g (1 - p) CE + p)`` (``t = 0``)."""
    ce = -F.logsigmoid(-x)
    p = torch.sigmoid(x)
    p_gamma = p.pow(gamma)
    loss = coef * p_gamma * ce
    grad = coef * p_gamma * (gamma * torch.sigmoid(-x) * ce + p)
    return loss, grad


def _positive_terms(x: Tensor, gamma: Tensor | float, coef: Tensor | float) -> tuple[Tensor, Tensor]:
    """Loss ``c (1 - p)^g (-log p)`` and its derivative ``-c (1 - p)^g (g p CE + (1 - p))`` (``t = 1``)."""
    ce = -F.logsigmoid(x)
    u = torch.sigmoid(-x)
    u_gamma = u.pow(gamma)
    loss = coef * u_gamma * ce
    grad = -coef * u_gamma * (gamma * torch.sigmoid(x) * ce + u)
    return loss, grad


def _quality_terms(x: Tensor, q: Tensor, gamma: Tensor | float, coef: Tensor | float) -> tuple[Tensor, Tensor]:
    """Loss ``c |p - q|^g BCE(x, q)`` and its derivative (see the module docstring)."""
    p = torch.sigmoid(x)
    d = p - q
    ad = d.abs()
    bce = F.binary_cross_entropy_with_logits(x, q, reduction="none")
    gamma_t = torch.as_tensor(gamma, dtype=x.dtype, device=x.device)
    # sign(d) |d|^(g-1), set to 0 at d == 0 (the derivative there is 0 for g > 1; a subgradient else)
    lead = torch.where(ad > 0, torch.sign(d) * ad.pow(gamma_t - 1.0), torch.zeros_like(d))
    ad_gamma = ad.pow(gamma_t)
    loss = coef * ad_gamma * bce
    grad = coef * (gamma_t * lead * p * torch.sigmoid(-x) * bce + ad_gamma * d)
    return loss, grad


def _check_binary(targets: Tensor) -> None:
    check_binary_targets("equalized focal loss", targets)


def equalized_focal_loss_terms(
    logits: Tensor, targets: Tensor, gamma: Tensor | float, weight: Tensor | float = 1.0, alpha: float = 0.25
) -> Tensor:
    """Element-wise EFL ``alpha_t w_j (1 - p_t)^gamma_j (-log p_t)`` of ``logits`` ``[N, C]`` with
    binary ``targets`` ``[N, C]``, per-class ``gamma`` and ``weight`` (``[C]`` or scalars) and
    ``alpha`` (``< 0`` disables it); same shape as ``logits``, no reduction, no normalizer."""
    _check_binary(targets)
    gamma, weight = _as_class_vector(gamma, logits), _as_class_vector(weight, logits)
    return _efl_terms(logits, targets.to(logits.dtype), gamma, weight, alpha)[0]


def equalized_focal_loss_grad(
    logits: Tensor, targets: Tensor, gamma: Tensor | float, weight: Tensor | float = 1.0, alpha: float = 0.25
) -> Tensor:
    """Element-wise derivative of :func:`equalized_focal_loss_terms` w.r.t. ``logits`` (analytic)."""
    _check_binary(targets)
    gamma, weight = _as_class_vector(gamma, logits), _as_class_vector(weight, logits)
    return _efl_terms(logits, targets.to(logits.dtype), gamma, weight, alpha)[1]


def equalized_quality_focal_loss_terms(
    logits: Tensor, soft_targets: Tensor, gamma: Tensor | float, weight: Tensor | float = 1.0
) -> Tensor:
    """Element-wise EQFL ``w_j |q - p|^gamma_j BCE(x, q)``; ``soft_targets`` is ``q`` on positive
    entries and 0 elsewhere (``[N, C]``). No reduction, no normalizer."""
    gamma, weight = _as_class_vector(gamma, logits), _as_class_vector(weight, logits)
    return _quality_terms(logits, soft_targets.to(logits.dtype), gamma, weight)[0]


def equalized_quality_focal_loss_grad(
    logits: Tensor, soft_targets: Tensor, gamma: Tensor | float, weight: Tensor | float = 1.0
) -> Tensor:
    """Element-wise derivative of :func:`equalized_quality_focal_loss_terms` w.r.t. ``logits``."""
    gamma, weight = _as_class_vector(gamma, logits), _as_class_vector(weight, logits)
    return _quality_terms(logits, soft_targets.to(logits.dtype), gamma, weight)[1]


def _as_class_vector(value: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------------------------
# the fast path (taildet.ops.efl_kernel)


def _sparse_loss_and_grad(
    x: Tensor,
    rows: Tensor,
    cols: Tensor,
    gamma: Tensor,
    weight: Tensor,
    normalizer: Tensor | float,
    *,
    alpha: float = 0.25,
    quality: Tensor | None = None,
    need_grad: bool = True,
    keep: Tensor | None = None,
    pos: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`equalized_focal_loss` without a target matrix: every entry as a negative, then the
    positive entries corrected with this file's terms (:func:`sparse_focal_loss_and_grad`)."""
    a_pos, a_neg = _alphas(alpha) if quality is None else (1.0, 1.0)
    coef = weight / normalizer  # [C]
    g_s, c_s = gamma[cols], coef[cols]
    if quality is None:
        def positive_terms(xs: Tensor) -> tuple[Tensor, Tensor]:
            return _positive_terms(xs, g_s, c_s * a_pos)
    else:
        def positive_terms(xs: Tensor) -> tuple[Tensor, Tensor]:
            return _quality_terms(xs, quality.to(xs.dtype), g_s, c_s)
    return sparse_focal_loss_and_grad(x, rows, cols, gamma, coef, positive_terms, negative_scale=a_neg,
                                      need_grad=need_grad, keep=keep, pos=pos)


# ----------------------------------------------------------------------------------------------
# autograd: loss and gradient in one pass, state update in the backward


class _EqualizedFunction(torch.autograd.Function):
    """Forward returns the loss and keeps its analytic gradient (``compute``: the plain
    :func:`equalized_focal_loss` or its fast path); backward scales it by the incoming gradient
    and hands it to ``on_backward`` (the module's ``_accumulate``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits, entries, gamma, weight, normalizer, alpha, quality, compute, on_backward
    ):
        x = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
        with torch.autocast(device_type=x.device.type, enabled=False):
            loss, grad = compute(x, entries.rows, entries.cols, gamma.to(x.dtype), weight.to(x.dtype), normalizer,
                                 alpha=alpha, quality=quality, keep=entries.keep, pos=entries.pos)
        ctx.save_for_backward(grad)
        ctx.entries, ctx.on_backward = entries, on_backward
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        g = grad * grad_output.to(grad.dtype)
        if ctx.on_backward is not None:
            ctx.on_backward(g, ctx.entries)
        return g.to(ctx.logits_dtype), None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# modules


class EqualizedFocalLoss(SigmoidClassificationLoss):
    """Equalized Focal Loss over ``C`` sigmoid outputs (dense one-stage heads), with its gradient
    statistics as buffers (see the module docstring for the equations and the update timing).

    Args:
        num_classes: number of foreground classes ``C``.
        gamma_b: base focusing factor (> 0).
        scale: ``s``, how much rare classes' focusing factor grows (8; 4 for YOLOX-like heads).
        alpha: positive weight (``1 - alpha`` for negatives); ``< 0`` disables it.
        prior: initial foreground probability of the classifier bias (0.001).

    ``forward(logits [N, C], labels [N], normalizer=None, quality=None)``: labels ``0..C-1``
    positive, ``C`` negative, ``-1`` ignored; ``normalizer`` defaults to the number of positive
    anchors averaged over DDP ranks, at least 1. ``quality`` is accepted and ignored.
    """

    kind = "one_stage"
    uses_quality = False
    repr_fields = ("gamma_b", "scale", "alpha", "prior")

    def __init__(
        self, num_classes: int, gamma_b: float = 2.0, scale: float = 8.0, alpha: float = 0.25, prior: float = 0.001
    ):
        super().__init__(num_classes)
        if not float(gamma_b) > 0:
            raise ValueError(f"gamma_b must be > 0 (w_j = gamma_j / gamma_b), got {gamma_b!r}")
        if float(scale) < 0:
            raise ValueError(f"scale must be >= 0, got {scale!r}")
        if float(alpha) > 1.0:
            raise ValueError(f"alpha must be <= 1 (negative disables it), got {alpha!r}")
        self.prior = check_prior(prior)
        self.gamma_b = float(gamma_b)
        self.scale = float(scale)
        self.alpha = float(alpha)
        #: when False the backward leaves the state alone (frozen ratios).
        self.update_state = True
        #: the factor by which the incoming gradient exceeds the true one (AMP GradScaler's scale;
        #: set by :meth:`before_backward`): the accumulated gradients are divided by it.
        self.grad_scale = 1.0
        self.register_buffer("pos_grad", torch.zeros(self.num_classes))
        self.register_buffer("neg_grad", torch.zeros(self.num_classes))
        self.register_buffer("pos_neg_ratio", torch.ones(self.num_classes))

    def before_backward(self, grad_scale: float) -> None:
        """Record the AMP GradScaler's scale: the accumulated gradients are divided by it."""
        self.grad_scale = float(grad_scale)

    def _apply(self, fn, *args, **kwargs):
        """``.to()`` / ``.half()`` / ``.cuda()``: the gradient statistics stay at least float32
        (a float16 cumulative sum stalls: 2048 + 0.5 == 2048)."""
        super()._apply(fn, *args, **kwargs)
        for name in ("pos_grad", "neg_grad", "pos_neg_ratio"):
            buf = self._buffers[name]
            if buf is not None and buf.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = buf.float()
        return self

    # -- interface ------------------------------------------------------------------------------
    def focusing_factors(self) -> tuple[Tensor, Tensor]:
        """Current ``(gamma_j, w_j)`` (``[C]`` each) from ``pos_neg_ratio``."""
        return focusing_factors(self.pos_neg_ratio.detach(), self.gamma_b, self.scale)

    # -- state ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _accumulate(self, grad: Tensor, entries: PositiveEntries) -> None:
        """The one state update: add ``|grad|`` of the positive entries (``entries``, either layout)
        to ``pos_grad`` and of all other entries to ``neg_grad`` (per class), summed over DDP
        ranks (divided by the world size, see the module docstring), then recompute the ratio.
        ``grad`` is the gradient of the total loss w.r.t. the logits ``[N, C]`` (the non-ignored
        rows, or all rows with the ignored ones zero: they add nothing). No host read."""
        if not self.update_state:
            return
        rows, cols = entries.rows, entries.cols
        g = grad.detach().abs().to(self.pos_grad.dtype)  # a new tensor: safe to edit in place
        if float(self.grad_scale) != 1.0:
            g /= float(self.grad_scale)  # the true gradient under GradScaler
        at = g[rows, cols]
        on = positive_values(at, entries)  # the positive entries' |g| (0 at the other candidates)
        pos = torch.zeros_like(self.pos_grad).index_add_(0, cols, on)
        g[rows, cols] = at - on  # the positive entries out of the negatives' sum
        delta = torch.stack([pos, g.sum(0)])
        all_reduce_mean_(delta)  # over DDP processes (the module docstring says why the mean)
        delta = torch.where(torch.isfinite(delta).all(), delta, torch.zeros_like(delta))
        self.pos_grad += delta[0]
        self.neg_grad += delta[1]
        self.pos_neg_ratio.copy_((self.pos_grad / (self.neg_grad + _EPS)).clamp(0.0, 1.0))

    # -- losses ---------------------------------------------------------------------------------
    def _loss(self, logits: Tensor, entries: PositiveEntries, normalizer: Tensor | float,
              quality: Tensor | None) -> Tensor:
        gamma, weight = self.focusing_factors()
        alpha = self.alpha
        if use_fast_path(logits.device):  # no dense target matrix (taildet.ops.efl_kernel)
            compute: Callable = _sparse_loss_and_grad
        else:
            compute = equalized_focal_loss
        if torch.is_grad_enabled() and logits.requires_grad:
            return _EqualizedFunction.apply(logits, entries, gamma, weight, normalizer, alpha, quality, compute,
                                            self._accumulate)
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        gamma, weight = gamma.to(x.dtype), weight.to(x.dtype)
        return compute(x, entries.rows, entries.cols, gamma, weight, normalizer, alpha=alpha, quality=quality,
                       need_grad=False, keep=entries.keep, pos=entries.pos)[0]

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        normalizer: float | Tensor | None = None,
        quality: Tensor | None = None,
    ) -> Tensor:
        labels = check_dense_inputs(self, logits, labels)
        if self.uses_quality:
            check_quality(self, quality, labels)
        logits, labels, quality, entries = positive_entries(logits, labels, quality, self.num_classes)
        q = positive_quality(quality, entries) if self.uses_quality else None
        normalizer = default_normalizer(entries.count, normalizer, torch.float32)
        return self._loss(logits, entries, normalizer, q)

    def forward_multilabel(
        self,
        logits: Tensor,
        targets: Tensor,
        normalizer: float | Tensor | None = None,
        quality: Tensor | None = None,
    ) -> Tensor:
        """The loss for any ``[N, C]`` multi-label logits and a ``{0, 1}`` target matrix (several
        positives per row allowed). ``normalizer`` defaults to the number of positive entries
        (averaged over DDP ranks, at least 1). EQFL takes ``quality`` ``[N, C]`` (``q`` of each
        positive entry; default 1). The state updates in the backward as for ``forward``. Entries
        as :func:`~taildet.losses.one_stage_inputs.multilabel_entries` gives them (no host read on CUDA)."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes or targets.shape != logits.shape:
            raise ValueError(
                f"{type(self).__name__}.forward_multilabel: expected logits and targets of shape "
                f"[N, {self.num_classes}], got {tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        check_binary_targets(f"{type(self).__name__}.forward_multilabel", targets)
        entries = multilabel_entries(targets)
        q = None
        if self.uses_quality:
            rows, cols = entries.rows, entries.cols
            q = quality[rows, cols].detach() if quality is not None else logits.new_ones(rows.shape[0])
            q = positive_values(q.clamp(0.0, 1.0), entries)
        normalizer = default_normalizer(entries.count, normalizer, torch.float32)
        return self._loss(logits, entries, normalizer, q)


class EqualizedQualityFocalLoss(EqualizedFocalLoss):
    """Equalized Quality Focal Loss: the QFL form (no alpha) with EFL's per-class ``gamma_j`` and
    ``w_j``. ``forward`` needs ``quality`` ``[N]``: the IoU of each positive anchor's detached
    decoded box with its GT (values of non-positive anchors are not used). Same state and timing
    as :class:`EqualizedFocalLoss`; ``G+`` collects the gradient of the positive entries."""

    uses_quality = True
    repr_fields = ("gamma_b", "scale", "prior")

    def __init__(self, num_classes: int, gamma_b: float = 2.0, scale: float = 8.0, prior: float = 0.001):
        super().__init__(num_classes, gamma_b=gamma_b, scale=scale, alpha=-1.0, prior=prior)


def set_grad_scale(model: torch.nn.Module, scale: float) -> int:
    """Tell every loss in ``model`` that keeps gradient statistics (EFL, EQFL) the current AMP
    GradScaler scale, before ``scaler.scale(loss).backward()``; returns how many were told."""
    n = 0
    for module in model.modules():
        if isinstance(module, EqualizedFocalLoss):
            module.before_backward(scale)
            n += 1
    return n

