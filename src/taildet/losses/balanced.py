"""Balanced Activation (Balanced Softmax / Balanced Sigmoid), methods.md section 3.

Both losses are stateless: the class statistics they use are fixed training-set numbers, stored as
(checkpointed) buffers. Only the *training* loss is adjusted; test-time scores use the raw logits.

:class:`BalancedSoftmaxLoss`
    Classification form (``background=False``, ``K = C``): ``L = CE(z + log n, y)`` with ``n_j``
    the number of training instances of class ``j`` (paper eq. 14/47).

    Detection form (default, ``background=True``, ``K = C + 1``, background last; taildet's
    extension): the foreground logits are shifted by ``log(n_j / max_k n_k)`` (<= 0), the
    background logit is unchanged: ``L = CE(z + a, y)`` with ``a = [log(n / max n), 0]``.
    Reduction as :class:`~taildet.losses.softmax_ce.SoftmaxCrossEntropyLoss`: the mean over RoIs,
    or ``sum_i w_i l_i / N`` with a per-RoI weight. Scores: ``softmax(z)`` (background dropped in
    the detection form). Bias: zeros.

    A class with ``n_j = 0`` would get ``log 0 = -inf``: it is an error naming the classes, unless
    ``smoothing=s > 0`` is given, which uses ``n + s`` for every class.

:class:`BalancedSigmoidLoss`
    ``K = C`` sigmoid outputs, no background logit; targets one-hot over ``C`` (background RoIs
    all-zero). For foreground RoIs only, every logit is shifted: ``z_j - log((1 - f_j) / f_j)``
    (the reference code); ``exact=True`` uses the paper's eq. 48 instead,
    ``z_j - log((1 - f_j) / f_j) + log(C - 1)``. Background RoIs unchanged. Loss: BCE-with-logits
    summed over RoIs x classes (times the per-RoI weight if given) / ``N``. Scores: ``sigmoid(z)``.
    Bias: ``-log((1 - 0.001) / 0.001)`` (prior 0.001). ``f`` (image frequency) must be in
    ``(0, 1)`` for every class.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from taildet.losses.base import ClassificationLoss, SigmoidClassificationLoss, check_prior, reduce_loss
from taildet.ops import use_fast_path
from taildet.ops.rowwise import SigmoidBCEKernel, SoftmaxOffsetKernel, compute_dtype, rowwise_loss
from taildet.losses.state import _short, as_class_vector, cached, check_finite_loss, check_inputs, one_hot

__all__ = ["BalancedSoftmaxLoss", "BalancedSigmoidLoss", "balanced_softmax_loss", "balanced_sigmoid_loss"]


class BalancedSoftmaxLoss(ClassificationLoss):
    """Balanced Softmax: cross-entropy of logits shifted by the log class counts.

    Args:
        num_classes: ``C``.
        instance_counts: ``[C]`` training instances per class (list, numpy array or tensor).
        smoothing: ``None`` (zero counts are an error) or a positive number added to every count.
        background: ``True`` (default) for the detection head (``K = C + 1``, background last,
            foreground shifted by ``log(n_j / max n)``); ``False`` for plain classification
            (``K = C``, labels ``0..C-1``, shift ``log n_j``).
    """

    kind = "two_stage"
    needs = ("instance_counts",)

    def __init__(
        self,
        num_classes: int,
        instance_counts: Any = None,
        smoothing: float | None = None,
        background: bool = True,
    ):
        super().__init__(num_classes)
        name = type(self).__name__
        counts = as_class_vector(instance_counts, self.num_classes, name, "instance_counts")
        if bool((counts < 0).any()):
            bad = torch.nonzero(counts < 0).flatten().tolist()
            raise ValueError(f"{name}: instance_counts must be >= 0; negative for classes {_short(bad)}")
        if smoothing is not None:
            if not float(smoothing) > 0:
                raise ValueError(f"{name}: smoothing must be a positive number, got {smoothing!r}")
            counts = counts + float(smoothing)
        elif bool((counts == 0).any()):
            bad = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(
                f"{name}: instance_counts is 0 for classes {_short(bad)}; log(0) = -inf would make them "
                "unlearnable. Remove those classes or pass smoothing= (e.g. 1.0) to add to every count"
            )
        self.smoothing = None if smoothing is None else float(smoothing)
        self.background = bool(background)
        self.has_background = self.background
        # counts after smoothing: the numbers the adjustment uses
        self.register_buffer("instance_counts", counts)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, background={self.background}, smoothing={self.smoothing}"

    def num_outputs(self) -> int:
        return self.num_classes + 1 if self.background else self.num_classes

    def scores(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=-1)[:, : self.num_classes]

    def log_adjustment(self, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
        """The ``[K]`` vector added to the logits during training."""
        n = self.instance_counts.to(device=device, dtype=torch.float64)
        if self.background:
            adj = torch.cat([torch.log(n / n.max()), n.new_zeros(1)])
        else:
            adj = torch.log(n)
        return adj.to(dtype)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        labels = check_inputs(self, logits, labels, weight, max_label=self.num_outputs() - 1, finite=False)
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        dt = compute_dtype(logits.dtype)
        adj = cached(self, "adj", self.instance_counts, dt, logits.device,
                     lambda: self.log_adjustment(torch.float64))
        w = None if weight is None else weight.detach().to(dt)
        if use_fast_path(logits.device):  # row-blocked, closed-form gradient (taildet.ops.rowwise)
            value = rowwise_loss(logits, SoftmaxOffsetKernel(labels, adj, w), logits.shape[0])
        else:
            value = balanced_softmax_loss(logits.to(dt), labels, adj, w)
        return check_finite_loss(self, value, logits)


class BalancedSigmoidLoss(SigmoidClassificationLoss):
    """Balanced Sigmoid (detection form, reference code; ``exact=True``: paper eq. 48).

    Args:
        num_classes: ``C`` (``C >= 2`` with ``exact=True``).
        image_frequency: ``[C]`` ``f_c`` = training images containing ``c`` / training images, each
            strictly between 0 and 1.
        exact: use eq. 48 (foreground logits ``log(C - 1)`` higher than the reference's shift).
        prior: initial foreground probability for the bias (0.001 as the reference).
    """

    kind = "two_stage"
    needs = ("image_frequency",)
    repr_fields = ("exact", "prior")

    def __init__(self, num_classes: int, image_frequency: Any = None, exact: bool = False, prior: float = 0.001):
        super().__init__(num_classes)
        name = type(self).__name__
        f = as_class_vector(image_frequency, self.num_classes, name, "image_frequency")
        bad = torch.nonzero((f <= 0) | (f >= 1)).flatten().tolist()
        if bad:
            raise ValueError(
                f"{name}: image_frequency must be strictly between 0 and 1 (log((1 - f) / f) is "
                f"infinite otherwise); out of range for classes {_short(bad)}"
            )
        if exact and self.num_classes < 2:
            raise ValueError(f"{name}: exact=True (eq. 48) needs at least 2 classes (log(C - 1))")
        self.prior = check_prior(prior, name)
        self.exact = bool(exact)
        self.register_buffer("image_frequency", f)

    def shift(self, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
        """The ``[C]`` vector added to the logits of foreground RoIs (``-log((1-f)/f)`` [+ log(C-1)])."""
        f = self.image_frequency.to(device=device, dtype=torch.float64)
        s = -torch.log((1.0 - f) / f)
        if self.exact:
            s = s + math.log(self.num_classes - 1)
        return s.to(dtype)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        labels = check_inputs(self, logits, labels, weight, finite=False)
        n = logits.shape[0]
        if n == 0:
            return logits.sum() * 0.0
        dt = compute_dtype(logits.dtype)
        shift = cached(self, f"shift@{self.exact}", self.image_frequency, dt, logits.device,
                       lambda: self.shift(torch.float64))
        w = None if weight is None else weight.detach().to(dt)
        if use_fast_path(logits.device):  # row-blocked, no dense target (taildet.ops.rowwise)
            kernel = SigmoidBCEKernel(labels, self.num_classes, shift=shift, weight=w)
            value = rowwise_loss(logits, kernel, n)
        else:
            value = balanced_sigmoid_loss(logits.to(dt), labels, shift, w)
        return check_finite_loss(self, value, logits)


def balanced_softmax_loss(logits: Tensor, labels: Tensor, log_adjustment: Tensor, weight: Tensor | None) -> Tensor:
    """Balanced Softmax (eq. 14/47) written plainly: ``sum_i w_i CE(z_i + a, y_i) / N`` with the
    ``[K]`` adjustment ``a`` (``log n``, or ``log(n / max n)`` and 0 on the background column)."""
    ce = F.cross_entropy(logits + log_adjustment, labels, reduction="none")
    return reduce_loss(ce, logits.shape[0], weight)


def balanced_sigmoid_loss(logits: Tensor, labels: Tensor, shift: Tensor, weight: Tensor | None) -> Tensor:
    """Balanced Sigmoid (eq. 48 / the reference code) written plainly:
    ``sum_ij w_i BCE(z_ij + fg_i shift_j, t_ij) / N``, ``t`` one-hot over ``C`` (background rows
    all zero), ``fg_i = [y_i < C]``."""
    C = logits.shape[1]
    fg = (labels < C).to(logits.dtype)[:, None]
    t = one_hot(labels, C + 1, logits.dtype)[:, :C]
    bce = F.binary_cross_entropy_with_logits(logits + fg * shift, t, reduction="none").sum(1)
    return reduce_loss(bce, logits.shape[0], weight)
