"""The fast path of the dense sigmoid losses with sparse targets: EFL / EQFL
(:class:`taildet.losses.equalized_focal.EqualizedFocalLoss`, tested equal to the plain
:func:`taildet.losses.equalized_focal.equalized_focal_loss`) and QFL
(:class:`taildet.losses.quality_focal.QualityFocalLoss`, tested equal to the plain
:func:`taildet.losses.quality_focal.quality_focal_loss` on a dense target).

A one-stage head scores ``N`` anchors x ``C`` classes, and at most one entry per anchor is
positive. The plain forms build the ``[N, C]`` target matrix and evaluate both branches of the
loss on every entry. Here the negative term ``c_j p^g_j (-log(1 - p))`` is evaluated on the
whole matrix (the gradient built in place from the same temporaries), and then only the ``P``
positive entries are corrected: their negative term taken out, their own term (given by the
loss: EFL's positive term, or a quality term) put in, their gradient entries overwritten. No
target matrix, no second dense branch.

The positive entries come in either layout of :mod:`taildet.losses.one_stage_inputs`: compacted
(the ``P`` positives of the non-ignored rows; the CPU path) or fixed-shape (one candidate per
row masked by ``pos``, the ignored rows given zero weight by ``keep``: no host read, the path
taken on CUDA). Nothing here reads device values on the host in the fixed-shape layout.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sparse_focal_loss_and_grad"]

#: ``positive_terms(xs)``: the positive entries' own loss terms ``[P]`` and their derivatives
#: ``[P]`` w.r.t. ``xs`` (or None when not needed), every factor (weight, normalizer) included.
PositiveTerms = Callable[[Tensor], tuple[Tensor, Tensor | None]]


def _at(v: Tensor | float, cols: Tensor) -> Tensor | float:
    """The per-class value ``v`` (``[C]``, 0-d or a number) at the columns ``cols``."""
    return v[cols] if isinstance(v, Tensor) and v.dim() > 0 else v


def sparse_focal_loss_and_grad(
    x: Tensor,
    rows: Tensor,
    cols: Tensor,
    gamma: Tensor | float,
    coef: Tensor | float,
    positive_terms: PositiveTerms,
    *,
    negative_scale: float = 1.0,
    need_grad: bool = True,
    keep: Tensor | None = None,
    pos: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``sum_ij l_ij`` and its gradient ``d/dx`` (``[N, C]``; None unless ``need_grad``), where
    ``l_ij = a c_j p_ij^g_j (-log(1 - p_ij))`` on every negative entry (``a`` = ``negative_scale``,
    ``p = sigmoid(x)``) and ``positive_terms`` on the positive entries ``x[rows, cols]`` (each
    at most once).

    Fixed-shape layout: ``keep`` (``[N]`` bool) the rows that count -- the others add nothing to
    the loss and get a zero gradient --, ``pos`` (``[P]`` bool) which of the ``(rows, cols)``
    candidates are positive (the others stay negative entries); None: every row / candidate.

    ``gamma`` and ``coef`` are ``[C]`` vectors, 0-d tensors or numbers. With ``need_grad`` the
    logits must be detached (the gradient is built in place); without it, the loss is
    differentiable by autograd when ``x`` requires grad (QFL).
    """
    dropped = None if keep is None else ~keep[:, None]  # [N, 1]: the rows that add nothing
    grad = None
    if need_grad:
        ce = -F.logsigmoid(-x)
        p = torch.sigmoid(x)
        p_gamma = p.pow(gamma)
        terms = p_gamma * ce
        if dropped is not None:
            terms.masked_fill_(dropped, 0.0)
        loss = terms.sum(0).mul_(coef).sum() * negative_scale
        del terms
        # c p^g (g (1 - p) CE + p): the derivative of the negative term
        grad = torch.sigmoid(-x).mul_(gamma).mul_(ce).add_(p).mul_(p_gamma).mul_(coef * negative_scale)
        del ce, p, p_gamma
    else:
        # under autograd (QFL) in this order: p^g before CE keeps one [N, C] tensor fewer alive at
        # the peak (87 MiB at 20,000 x 1203, benchmarks/losses_one_stage.py)
        terms = torch.sigmoid(x).pow(gamma) * -F.logsigmoid(-x)
        if dropped is not None:
            terms.masked_fill_(dropped, 0.0)
        loss = terms.sum(0).mul_(coef).sum() * negative_scale
        del terms
    if rows.numel() > 0:
        xs = x[rows, cols]
        wrong = _at(coef, cols) * negative_scale * torch.sigmoid(xs).pow(_at(gamma, cols)) * -F.logsigmoid(-xs)
        right, right_grad = positive_terms(xs)
        if pos is None:
            loss = loss + (right.sum() - wrong.sum())
        else:  # only the positive candidates are corrected (a where: no NaN of the others leaks)
            loss = loss + torch.where(pos, right - wrong, wrong.new_zeros(())).sum()
        if grad is not None:
            if pos is not None:
                right_grad = torch.where(pos, right_grad, grad[rows, cols])
            grad[rows, cols] = right_grad
    if dropped is not None and grad is not None:
        grad.masked_fill_(dropped, 0.0)
    return loss, grad
