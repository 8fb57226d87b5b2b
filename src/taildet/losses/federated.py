"""Federated loss (Zhou et al., "Probabilistic two-stage detection", 2021; detectron2's
``use_fed_loss``): sigmoid BCE restricted to a per-step subset of the classes.

``K = C`` sigmoid outputs, no background column; targets one-hot over ``C`` (background RoIs
all-zero), as :class:`taildet.losses.SigmoidBCELoss`. Each call of ``forward`` picks a class set
``S`` (:func:`federated_classes`):

* every foreground class that labels a RoI of the batch (its GT classes), never the background;
* plus classes drawn *without replacement* among the others with probability proportional to
  ``f_c ** power`` (``f_c`` the training set's image frequency, ``power`` 0.5), until ``S`` holds
  ``num_fed_classes`` classes (50 on LVIS). ``|S| = max(num_fed_classes, #GT classes)``, fewer
  only when fewer classes have ``f_c > 0`` (a class with ``f_c = 0`` is never drawn).

Loss: ``sum_i w_i sum_{j in S} BCE(z_ij, t_ij) / N`` with ``N`` the number of RoIs (the reference
divides the masked sum by the number of rows), ``w_i`` the optional per-RoI weight. Columns
outside ``S`` get no gradient. Scores ``sigmoid(z)``; bias at the prior 0.01 (CenterNet2's
``PRIOR_PROB`` for its sigmoid heads).

Differences from the reference, on purpose: detectron2 counts the background label among the
batch's unique GT labels, so its foreground set is one class short of ``num_fed_classes`` whenever
the batch has a background RoI; here the count is over foreground classes only. The reference
samples with ``f_c ** power`` from the training images' counts (the same distribution: the
counts differ from the frequencies by a constant factor).

Where the draw runs. On CPU (:func:`federated_classes`): ``torch.multinomial`` on the host with
``generator`` (None: torch's global CPU generator). On GPU the GT classes would have to come to the
host (a synchronisation every step), so the set is drawn on the device instead
(:func:`federated_class_mask`, also under :func:`taildet.utils.host_sync.sync_free_paths`): the
Gumbel-top-k form of the same draw -- keys ``log w_c + G_c`` with ``G`` standard Gumbel noise, GT
classes first, then the largest keys, which is sampling without replacement with probability
proportional to ``w`` (the same distribution, other random numbers; tested). ``torch.manual_seed``
fixes either (the GPU draw uses the device's generator, or ``generator``'s numbers when one is
given). Under DDP each rank draws its own set from its own RNG state and its own GT classes, as
the reference does (no collective).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from taildet.losses.base import SigmoidClassificationLoss, check_prior, reduce_loss
from taildet.losses.state import as_class_vector, cached, check_finite_loss, check_inputs, one_hot
from taildet.ops.rowwise import compute_dtype
from taildet.utils.host_sync import avoid_host_sync

__all__ = ["FederatedLoss", "federated_classes", "federated_class_mask", "federated_loss"]


def federated_classes(labels: Tensor, num_classes: int, sample_weight: Tensor, num_fed_classes: int,
                      generator: torch.Generator | None = None) -> Tensor:
    """The class set ``S`` of one step (int64 ``[|S|]`` on the host, GT classes first, ascending,
    then the drawn ones in draw order).

    ``labels`` ``[N]`` (``0..C-1`` foreground, ``C`` background); ``sample_weight`` ``[C]`` the
    non-negative draw weights (``f_c ** power``); ``num_fed_classes`` the size to fill up to.
    Draws ``min(num_fed_classes - #GT, #{c not GT: weight_c > 0})`` classes without replacement
    with probability proportional to the weight (``torch.multinomial`` with ``generator``).
    """
    gt = torch.unique(labels.detach().cpu())
    gt = gt[gt < num_classes]
    need = int(num_fed_classes) - int(gt.numel())
    if need <= 0:
        return gt
    prob = sample_weight.detach().to(device="cpu", dtype=torch.float64).clone()
    prob[gt] = 0.0
    need = min(need, int((prob > 0).sum()))
    if need == 0:
        return gt
    drawn = torch.multinomial(prob, need, replacement=False, generator=generator)
    return torch.cat([gt, drawn])


def federated_class_mask(labels: Tensor, num_classes: int, sample_weight: Tensor, num_fed_classes: int,
                         generator: torch.Generator | None = None) -> Tensor:
    """The class set ``S`` of one step as a ``[C]`` boolean mask on ``labels``' device, drawn there
    without a host read (module docstring: Gumbel top-k). Same set size and distribution as
    :func:`federated_classes`: every GT class, then ``min(num_fed_classes - #GT, #{c not GT:
    weight_c > 0})`` classes without replacement with probability proportional to the weight."""
    C, device = num_classes, labels.device
    present = torch.zeros(C + 1, dtype=torch.bool, device=device).index_fill_(0, labels, True)[:C]
    gen_device = generator.device if generator is not None else device
    u = torch.rand(C, dtype=torch.float64, device=gen_device, generator=generator)
    u = u.to(device, non_blocking=True).clamp_(min=torch.finfo(torch.float64).tiny)
    w = sample_weight.detach().to(device=device, dtype=torch.float64)
    keys = torch.log(w) - torch.log(-torch.log(u))  # log w + Gumbel; -inf where w = 0
    keys = torch.where(present, torch.full_like(keys, float("inf")), keys)
    sorted_keys, order = torch.sort(keys, descending=True)
    size = torch.clamp(present.sum(), min=int(num_fed_classes))
    take = (torch.arange(C, device=device) < size) & (sorted_keys > float("-inf"))
    return torch.zeros(C, dtype=torch.bool, device=device).scatter_(0, order, take)


def federated_loss(logits: Tensor, labels: Tensor, classes: Tensor, weight: Tensor | None) -> Tensor:
    """The federated loss written plainly: ``sum_i w_i sum_{j in classes} BCE(z_ij, t_ij) / N``
    (``t`` one-hot over ``C``, background rows all zero; ``N`` the rows). ``classes``: the class
    ids ``[|S|]``, or a ``[C]`` boolean mask."""
    C = logits.shape[1]
    t = one_hot(labels, C + 1, logits.dtype)[:, :C]
    if classes.dtype == torch.bool:
        mask = classes.to(device=logits.device, dtype=logits.dtype)
    else:
        mask = torch.zeros(C, dtype=logits.dtype, device=logits.device)
        mask[classes.to(logits.device)] = 1.0
    bce = (F.binary_cross_entropy_with_logits(logits, t, reduction="none") * mask).sum(1)
    return reduce_loss(bce, logits.shape[0], weight)


class FederatedLoss(SigmoidClassificationLoss):
    """Federated loss (sigmoid, ``K = C``; module docstring).

    Args:
        num_classes: ``C``.
        image_frequency: ``[C]`` ``f_c`` (training images containing ``c`` / training images),
            filled from the training set by the engine.
        num_fed_classes: the size of the class set per step (50 for LVIS's 1203 classes).
        power: draw weight ``f_c ** power`` (0.5).
        prior: initial foreground probability for the bias (0.01).
        generator: an optional ``torch.Generator`` (CPU) for the draws; None: torch's global one.

    ``last_classes`` holds the class set of the latest ``forward``, for inspection: int64 ids on
    the host from the CPU draw; a ``[C]`` boolean device mask from the GPU draw (reading it there
    is the caller's host read, not the loss's).
    """

    kind = "two_stage"
    needs = ("image_frequency",)
    repr_fields = ("num_fed_classes", "power")

    def __init__(self, num_classes: int, image_frequency: Any = None, num_fed_classes: int = 50,
                 power: float = 0.5, prior: float = 0.01, generator: torch.Generator | None = None):
        super().__init__(num_classes)
        name = type(self).__name__
        f = as_class_vector(image_frequency, self.num_classes, name, "image_frequency")
        if bool(((f < 0) | (f > 1)).any()):
            raise ValueError(f"{name}: image_frequency must be in [0, 1]")
        if isinstance(num_fed_classes, bool) or int(num_fed_classes) != num_fed_classes or num_fed_classes < 1:
            raise ValueError(f"{name}: num_fed_classes must be a positive integer, got {num_fed_classes!r}")
        if not float(power) >= 0.0:
            raise ValueError(f"{name}: power must be >= 0, got {power!r}")
        self.prior = check_prior(prior, name)
        self.num_fed_classes = int(num_fed_classes)
        self.power = float(power)
        self.generator = generator
        self.register_buffer("image_frequency", f)
        self.last_classes: Tensor | None = None

    def sample_weight(self) -> Tensor:
        """``[C]`` draw weights ``f_c ** power`` (0 where ``f_c = 0``, also for ``power = 0``)."""
        f = self.image_frequency.double()
        return torch.where(f > 0, f.pow(self.power), torch.zeros_like(f))

    def _weight(self, device: torch.device) -> Tensor:
        """:meth:`sample_weight` on ``device``, computed once per change of ``image_frequency``."""
        return cached(self, f"sample_weight@{self.power}", self.image_frequency, torch.float64, device,
                      self.sample_weight)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        labels = check_inputs(self, logits, labels, weight, finite=False)
        n = logits.shape[0]
        if n == 0:
            return logits.sum() * 0.0
        draw = federated_class_mask if avoid_host_sync(logits) else federated_classes
        classes = draw(labels, self.num_classes, self._weight(logits.device), self.num_fed_classes, self.generator)
        self.last_classes = classes
        dt = compute_dtype(logits.dtype)
        w = None if weight is None else weight.detach().to(dt)
        return check_finite_loss(self, federated_loss(logits.to(dt), labels, classes, w), logits)
