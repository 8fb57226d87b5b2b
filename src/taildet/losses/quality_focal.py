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
:func:`taildet.ops.use_fast_path` and tested equal.
:class:`~taildet.losses.equalized_focal.EqualizedQualityFocalLoss` with every gradient ratio
equal to 1 is exactly this loss with ``beta = gamma_b``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from taildet.losses.base import SigmoidClassificationLoss, check_prior, default_normalizer
from taildet.losses.focal import check_dense_inputs, sparse_positives
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
        check_dense_inputs(self, logits, labels)
        if quality is None:
            raise ValueError("QualityFocalLoss needs quality= (IoU of each positive anchor's decoded box with its GT)")
        if quality.shape != labels.shape:
            raise ValueError(
                f"QualityFocalLoss: expected quality of shape [{labels.shape[0]}], got {tuple(quality.shape)}"
            )
        logits, labels, quality, rows, cols = sparse_positives(logits, labels, quality, self.num_classes)
        normalizer = default_normalizer(rows.new_tensor(rows.numel()), normalizer, torch.float32)
        x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        q = quality[rows].detach().to(x.dtype).clamp(0.0, 1.0)  # the positive entries' targets
        if use_fast_path(logits.device):  # no dense target matrix (taildet.ops.efl_kernel)
            def positive_terms(xs: Tensor) -> tuple[Tensor, None]:
                return quality_focal_loss(xs, q, self.beta), None

            loss = sparse_focal_loss_and_grad(x, rows, cols, self.beta, 1.0, positive_terms, need_grad=False)[0]
        else:
            soft = torch.zeros_like(x)
            soft[rows, cols] = q
            loss = quality_focal_loss(x, soft, self.beta).sum()
        return loss / normalizer
