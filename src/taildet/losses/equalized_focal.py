"""Equalized Focal Loss (EFL) and Equalized Quality Focal Loss (EQFL) for one-stage detectors
(Li et al., "Equalized Focal Loss for Dense Long-Tailed Object Detection", seed 003).

``K = C`` sigmoid outputs per anchor, no background column. With ``p = sigmoid(x)``, a binary
target ``t``, ``p_t = p t + (1 - p)(1 - t)``, ``alpha_t = alpha t + (1 - alpha)(1 - t)`` and, per
class ``j``::

    r_j     = clamp(G+_j / (G-_j + 1e-10), 0, 1)      (pos_neg_ratio)
    gamma_j = gamma_b + s (1 - r_j)                     (focusing factor)
    w_j     = gamma_j / gamma_b                         (weighting factor)

    EFL  = sum_ij alpha_t w_j (1 - p_t)^gamma_j (-log p_t) / normalizer
    EQFL = sum_ij w_j |q_ij - p|^gamma_j BCE(x, q_ij)   / normalizer

``-log p_t`` and ``BCE`` are computed from log-sigmoids / ``binary_cross_entropy_with_logits``,
never ``log(sigmoid(x))``, so saturated logits (``|x| = 100``) give finite losses and gradients.
For EQFL, ``q_ij`` is the localisation quality (IoU of the detached decoded box with its GT) on
the positive entry ``j = label`` of a positive anchor and 0 everywhere else; EQFL has no alpha.

Gradient (derived once, used by the custom backward; ``CE = -log p_t``, ``u = 1 - p_t``,
``p(1 - p) = p_t u``)::

    d/dx [c u^g CE]  for t = 1:  -c u^g (g p CE + u)        (u = 1 - p)
                     for t = 0:  +c p^g (g (1 - p) CE + p)   (u = p, CE = -log(1 - p))
    d/dx [c |d|^g BCE(x, q)], d = p - q:
                     c (g sign(d) |d|^(g - 1) p (1 - p) BCE + |d|^g d)

with ``c = alpha_t w_j / normalizer`` (EFL) or ``w_j / normalizer`` (EQFL); ``gamma_j`` and
``w_j`` come from the state and get no gradient. A negative EQFL entry (``q = 0``) is exactly the
``t = 0`` EFL formula without alpha.

State and when it changes
-------------------------
Buffers (so ``state_dict``/checkpoints keep them): ``pos_grad`` = G+ and ``neg_grad`` = G-
(``[C]``, float32, initially 0) and ``pos_neg_ratio`` = r (``[C]``, initially 1, so training starts
as plain focal loss). The loss is a custom :class:`torch.autograd.Function`: its forward computes
the loss *and* the analytic gradient in one pass, its backward multiplies that gradient by the
incoming ``grad_output`` (chain rule: any loss weight, the sum with other losses, AMP's GradScaler
scale) and calls :meth:`EqualizedFocalLoss._accumulate` with it -- no module hooks. So, for one
iteration:

1. ``forward`` reads ``r`` as left by the previous backward (``gamma_j``, ``w_j`` of iteration
   ``t`` use the gradients of iterations ``< t``);
2. ``backward`` accumulates ``G+_j += sum_i |g_ij| t_ij`` and ``G-_j += sum_i |g_ij| (1 - t_ij)``
   (``g`` = the gradient of the total loss w.r.t. these logits, ignored anchors excluded), summed
   over DDP ranks, and recomputes ``r``.

Details:

* Accumulation is in float32 (or float64 for a float64 module) whatever the logits' dtype (AMP).
* DDP: when ``torch.distributed`` is initialised, the per-class sums are ``all_reduce``-d (sum)
  inside the backward and divided by the world size. DDP averages gradients, so the objective it
  optimises is the mean of the ranks' losses; ``g_rank / world_size`` is that objective's gradient
  w.r.t. the rank's logits, and the state equals that of one process seeing all ranks' anchors
  when the normalizer is the rank-averaged positive count (the default). Every rank must run the
  backward of this loss (it always does under DDP).
* GradScaler: the incoming gradient of a scaled backward is ``S`` times the true one. The
  accumulated ``g`` is divided by ``loss.grad_scale`` (1 by default), which the trainer sets to
  the scaler's current scale before every AMP backward (:func:`set_grad_scale`; a custom loop
  with GradScaler must do the same), so ``G+`` / ``G-`` hold the true gradients whatever ``S``
  (without it, iterations run with a larger ``S`` would weigh more in the cumulative sums). A
  contribution that is not finite (after the DDP reduction, so every rank agrees) is dropped, so
  an overflowing iteration that GradScaler skips cannot poison the state.
* Set ``loss.update_state = False`` to freeze the state (e.g. a fine-tune with fixed ratios).

Also usable outside detection (any ``[N, C]`` multi-label logits with a ``{0, 1}`` target
matrix): :meth:`EqualizedFocalLoss.forward_multilabel`.

Implementation note: the negative formula is evaluated on the whole ``[N, C]`` matrix and the few
positive entries (one per positive anchor) are then corrected, so no dense target matrix is built.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from taildet.losses.base import SigmoidClassificationLoss, check_prior
from taildet.losses.focal import check_dense_inputs, default_normalizer, mean_over_ranks  # noqa: F401

__all__ = [
    "EqualizedFocalLoss",
    "EqualizedQualityFocalLoss",
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
# pure maths


def focusing_factors(ratio: Tensor, gamma_b: float, scale: float) -> tuple[Tensor, Tensor]:
    """``(gamma_j, w_j)`` from the positive/negative gradient ratio ``r_j`` (``[C]``)."""
    gamma = gamma_b + scale * (1.0 - ratio)
    return gamma, gamma / gamma_b


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


def _efl_dense(x: Tensor, targets: Tensor, gamma: Tensor, weight: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    t = targets.to(x.dtype)
    if t.numel() and not bool(((t == 0) | (t == 1)).all()):
        raise ValueError("equalized focal loss: targets must be 0 or 1")
    a_pos, a_neg = (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)
    loss_p, grad_p = _positive_terms(x, gamma, a_pos * weight)
    loss_n, grad_n = _negative_terms(x, gamma, a_neg * weight)
    pos = t > 0
    return torch.where(pos, loss_p, loss_n), torch.where(pos, grad_p, grad_n)


def equalized_focal_loss_terms(
    logits: Tensor, targets: Tensor, gamma: Tensor | float, weight: Tensor | float = 1.0, alpha: float = 0.25
) -> Tensor:
    """Element-wise EFL ``alpha_t w_j (1 - p_t)^gamma_j (-log p_t)``, same shape as ``logits``.

    Args:
        logits: ``[N, C]`` raw logits.
        targets: ``[N, C]`` binary targets (0 or 1).
        gamma: per-class focusing factors ``[C]`` (or a scalar).
        weight: per-class weighting factors ``[C]`` (or a scalar).
        alpha: positive weight (``1 - alpha`` for negatives); ``< 0`` disables it.
    No reduction, no normalizer.
    """
    gamma, weight = _as_class_vector(gamma, logits), _as_class_vector(weight, logits)
    return _efl_dense(logits, targets, gamma, weight, alpha)[0]


def equalized_focal_loss_grad(
    logits: Tensor, targets: Tensor, gamma: Tensor | float, weight: Tensor | float = 1.0, alpha: float = 0.25
) -> Tensor:
    """Element-wise derivative of :func:`equalized_focal_loss_terms` w.r.t. ``logits`` (analytic)."""
    gamma, weight = _as_class_vector(gamma, logits), _as_class_vector(weight, logits)
    return _efl_dense(logits, targets, gamma, weight, alpha)[1]


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


def sparse_loss_and_grad(
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
) -> tuple[Tensor, Tensor | None]:
    """Summed, normalised EFL (``quality is None``) or EQFL, and its gradient w.r.t. ``x``.

    The targets are given sparsely: ``x[rows, cols]`` are the positive entries (each at most once),
    every other entry of ``x`` ``[N, C]`` is a negative. ``quality`` ``[P]`` gives EQFL's ``q`` of
    each positive entry. Returns ``(loss, grad)`` with ``grad = d loss / d x`` ``[N, C]``
    (None when ``need_grad`` is false). ``alpha`` is ignored for EQFL.
    """
    if quality is None:
        a_pos, a_neg = (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)
    else:
        a_pos, a_neg = 1.0, 1.0
    coef = weight / normalizer  # [C]
    # negatives everywhere ...
    ce = -F.logsigmoid(-x)
    p = torch.sigmoid(x)
    p_gamma = p.pow(gamma)
    loss = (p_gamma * ce).sum(0).mul_(coef).sum() * a_neg
    grad = None
    if need_grad:
        grad = torch.sigmoid(-x).mul_(gamma).mul_(ce).add_(p).mul_(p_gamma).mul_(coef * a_neg)
    del ce, p, p_gamma
    # ... then the positive entries corrected
    if rows.numel() > 0:
        xs = x[rows, cols]
        g_s, c_s = gamma[cols], coef[cols]
        wrong, _ = _negative_terms(xs, g_s, c_s * a_neg)
        if quality is None:
            right, right_grad = _positive_terms(xs, g_s, c_s * a_pos)
        else:
            right, right_grad = _quality_terms(xs, quality.to(xs.dtype), g_s, c_s)
        loss = loss + (right.sum() - wrong.sum())
        if grad is not None:
            grad[rows, cols] = right_grad
    return loss, grad


def sparse_positives(
    logits: Tensor, labels: Tensor, quality: Tensor | None, num_classes: int
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """Drop the ignored anchors (label ``-1``) and locate the positive entries.

    Returns ``(logits, labels, quality, rows, cols)`` restricted to the non-ignored anchors
    (``quality`` stays None when None), with ``logits[rows, cols]`` the positive entries (one per
    positive anchor, ``cols`` its label). The inputs are returned as they are when nothing is ignored.
    """
    valid = labels >= 0
    if not bool(valid.all()):
        logits, labels = logits[valid], labels[valid]
        if quality is not None:
            quality = quality[valid]
    rows = torch.where(labels < num_classes)[0]
    return logits, labels, quality, rows, labels[rows]


# ----------------------------------------------------------------------------------------------
# autograd: loss and gradient in one pass, state update in the backward


class _EqualizedFunction(torch.autograd.Function):
    """Forward returns the loss and keeps its analytic gradient; backward scales it by the
    incoming gradient and hands it to ``on_backward`` (the module's ``_accumulate``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits, rows, cols, gamma, weight, normalizer, alpha, quality, on_backward
    ):
        x = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
        with torch.autocast(device_type=x.device.type, enabled=False):
            loss, grad = sparse_loss_and_grad(
                x, rows, cols, gamma.to(x.dtype), weight.to(x.dtype), normalizer, alpha=alpha, quality=quality
            )
        ctx.save_for_backward(grad, rows, cols)
        ctx.on_backward = on_backward
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        grad, rows, cols = ctx.saved_tensors
        g = grad * grad_output.to(grad.dtype)
        if ctx.on_backward is not None:
            ctx.on_backward(g, (rows, cols))
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
    def _accumulate(self, grad: Tensor, targets: tuple[Tensor, Tensor]) -> None:
        """The one state update: add ``|grad|`` of the positive entries ``targets = (rows, cols)``
        to ``pos_grad`` and of all other entries to ``neg_grad`` (per class), summed over DDP
        ranks (divided by the world size, see the module docstring), then recompute the ratio.
        ``grad`` is the gradient of the total loss w.r.t. the (non-ignored) logits ``[N, C]``."""
        if not self.update_state:
            return
        rows, cols = targets
        g = grad.detach().abs().to(self.pos_grad.dtype)  # a new tensor: safe to edit in place
        if float(self.grad_scale) != 1.0:
            g /= float(self.grad_scale)  # the true gradient under GradScaler
        pos = torch.zeros_like(self.pos_grad).index_add_(0, cols, g[rows, cols])
        g[rows, cols] = 0
        delta = torch.stack([pos, g.sum(0)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(delta)
            delta /= dist.get_world_size()
        delta = torch.where(torch.isfinite(delta).all(), delta, torch.zeros_like(delta))
        self.pos_grad += delta[0]
        self.neg_grad += delta[1]
        self.pos_neg_ratio.copy_((self.pos_grad / (self.neg_grad + _EPS)).clamp(0.0, 1.0))

    # -- losses ---------------------------------------------------------------------------------
    def _loss(
        self,
        logits: Tensor,
        rows: Tensor,
        cols: Tensor,
        normalizer: Tensor | float,
        quality: Tensor | None,
    ) -> Tensor:
        gamma, weight = self.focusing_factors()
        alpha = self.alpha
        if torch.is_grad_enabled() and logits.requires_grad:
            on_backward: Callable | None = self._accumulate
            return _EqualizedFunction.apply(logits, rows, cols, gamma, weight, normalizer, alpha, quality, on_backward)
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        gamma, weight = gamma.to(x.dtype), weight.to(x.dtype)
        return sparse_loss_and_grad(
            x, rows, cols, gamma, weight, normalizer, alpha=alpha, quality=quality, need_grad=False
        )[0]

    def _quality_of(self, quality: Tensor | None, labels: Tensor, rows: Tensor) -> Tensor | None:
        return None

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        normalizer: float | Tensor | None = None,
        quality: Tensor | None = None,
    ) -> Tensor:
        check_dense_inputs(self, logits, labels)
        logits, labels, quality, rows, cols = sparse_positives(logits, labels, quality, self.num_classes)
        q = self._quality_of(quality, labels, rows)
        normalizer = default_normalizer(rows.new_tensor(rows.numel()), normalizer, torch.float32)
        return self._loss(logits, rows, cols, normalizer, q)

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
        positive entry; default 1). The state updates in the backward as for ``forward``."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes or targets.shape != logits.shape:
            raise ValueError(
                f"{type(self).__name__}.forward_multilabel: expected logits and targets of shape "
                f"[N, {self.num_classes}], got {tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        if targets.numel() and not bool(((targets == 0) | (targets == 1)).all()):
            raise ValueError(f"{type(self).__name__}.forward_multilabel: targets must be 0 or 1")
        rows, cols = torch.nonzero(targets, as_tuple=True)
        q = None
        if self.uses_quality:
            q = quality[rows, cols].detach() if quality is not None else logits.new_ones(rows.shape[0])
            q = q.clamp(0.0, 1.0)
        normalizer = default_normalizer(rows.new_tensor(rows.numel()), normalizer, torch.float32)
        return self._loss(logits, rows, cols, normalizer, q)


class EqualizedQualityFocalLoss(EqualizedFocalLoss):
    """Equalized Quality Focal Loss: the QFL form (no alpha) with EFL's per-class ``gamma_j`` and
    ``w_j``. ``forward`` needs ``quality`` ``[N]``: the IoU of each positive anchor's detached
    decoded box with its GT (values of non-positive anchors are not used). Same state and timing
    as :class:`EqualizedFocalLoss`; ``G+`` collects the gradient of the positive entries."""

    uses_quality = True
    repr_fields = ("gamma_b", "scale", "prior")

    def __init__(self, num_classes: int, gamma_b: float = 2.0, scale: float = 8.0, prior: float = 0.001):
        super().__init__(num_classes, gamma_b=gamma_b, scale=scale, alpha=-1.0, prior=prior)

    def _quality_of(self, quality: Tensor | None, labels: Tensor, rows: Tensor) -> Tensor:
        if quality is None:
            raise ValueError(
                f"{type(self).__name__} needs quality= (IoU of each positive anchor's decoded box with its GT)"
            )
        if quality.shape != labels.shape:
            raise ValueError(
                f"{type(self).__name__}: expected quality of shape [{labels.shape[0]}], got {tuple(quality.shape)}"
            )
        return quality[rows].detach().clamp(0.0, 1.0)


def set_grad_scale(model: torch.nn.Module, scale: float) -> int:
    """Tell every loss in ``model`` that keeps gradient statistics (EFL, EQFL) the current AMP
    GradScaler scale, before ``scaler.scale(loss).backward()``; returns how many were told."""
    n = 0
    for module in model.modules():
        if isinstance(module, EqualizedFocalLoss):
            module.before_backward(scale)
            n += 1
    return n

