"""Quality Focal Loss (Li et al., "Generalized Focal Loss", 2020): the baseline of EQFL.

``K = C`` sigmoid outputs per anchor, no background column. With ``p = sigmoid(x)`` and a soft
target ``q`` (the IoU of a positive anchor's detached decoded box with its GT on the entry of its
class, 0 on every other entry and on every entry of negative anchors)::

    QFL(x, q) = |q - p|^beta * BCE_with_logits(x, q)

summed over non-ignored anchors and all ``C`` classes and divided by the normalizer (default: the
number of positive anchors, averaged over DDP ranks, at least 1). Stateless; plain autograd.
Written plainly on the dense target ``q`` (:func:`quality_focal_loss` of every entry); the fast
path :func:`taildet.ops.efl_kernel.sparse_focal_loss_and_grad` (no target matrix: every entry as a
negative, the positive entries corrected) is chosen per device by
:func:`taildet.ops.use_fast_path` and tested equal. Either form takes the positive entries in a
layout of :mod:`taildet.losses.one_stage_inputs`: compacted on the CPU (ignored rows dropped), or
fixed-shape where :func:`taildet.utils.host_sync.avoid_host_sync` holds (CUDA: every row kept,
the ignored ones with zero weight; no host read in the forward or the backward); tested equal.
:class:`~taildet.losses.equalized_focal.EqualizedQualityFocalLoss` with every gradient ratio
equal to 1 is exactly this loss with ``beta = gamma_b``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from taildet.losses.base import SigmoidClassificationLoss, check_prior, default_normalizer
from taildet.losses.focal import check_dense_inputs
from taildet.losses.one_stage_inputs import check_quality, positive_entries, positive_quality
from taildet.ops import use_fast_path
from taildet.ops.efl_kernel import sparse_focal_loss_and_grad

__all__ = ["QualityFocalLoss", "quality_focal_loss"]


def quality_focal_loss(logits: Tensor, soft_targets: Tensor, beta: float = 2.0) -> Tensor:
    """Element-wise QFL ``|q - p|^beta * BCE(x, q)``, same shape as ``logits`` (no reduction)."""
    q = soft_targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    return (p - q).abs().pow(beta) * F.binary_cross_entropy_with_logits(logits, q, reduction="none")


class QualityFocalLoss(SigmoidClassificationLoss):
    """Quality Focal Loss for dense one-stage heads (``uses_quality = True``).

    Args:
        num_classes: number of foreground classes ``C``.
        beta: focusing exponent (2 in the paper).
        prior: initial foreground probability of the classifier bias.

    ``forward(logits [N, C], labels [N], normalizer=None, quality=[N])``; ``quality`` is required
    (only the positive anchors' values are used, clamped to [0, 1]).
    """

    kind = "one_stage"
    uses_quality = True
    repr_fields = ("beta", "prior")

    def __init__(self, num_classes: int, beta: float = 2.0, prior: float = 0.01):
        super().__init__(num_classes)
        if float(beta) < 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.prior = check_prior(prior)
        self.beta = float(beta)

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        normalizer: float | Tensor | None = None,
        quality: Tensor | None = None,
    ) -> Tensor:
        labels = check_dense_inputs(self, logits, labels)
        check_quality(self, quality, labels)
        logits, labels, quality, entries = positive_entries(logits, labels, quality, self.num_classes)
        rows, cols, keep = entries.rows, entries.cols, entries.keep
        normalizer = default_normalizer(entries.count, normalizer, torch.float32)
        x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        q = positive_quality(quality, entries).to(x.dtype)  # the positive entries' targets (0 elsewhere)
        if use_fast_path(logits.device):  # no dense target matrix (taildet.ops.efl_kernel)
            def positive_terms(xs: Tensor) -> tuple[Tensor, None]:
                return quality_focal_loss(xs, q, self.beta), None

            loss = sparse_focal_loss_and_grad(x, rows, cols, self.beta, 1.0, positive_terms, need_grad=False,
                                              keep=keep, pos=entries.pos)[0]
        else:
            soft = torch.zeros_like(x)
            soft[rows, cols] = q  # fixed-shape layout: 0 at the candidates that are not positive
            terms = quality_focal_loss(x, soft, self.beta)
            if keep is not None:  # fixed-shape layout: the ignored rows add nothing
                terms = torch.where(keep[:, None], terms, terms.new_zeros(()))
            loss = terms.sum()
        return loss / normalizer
