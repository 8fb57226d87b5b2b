"""The interface every classification loss in taildet follows.

A loss is an ``nn.Module`` that owns everything a classification method needs:

* its classifier width ``K`` for ``C`` foreground classes (:meth:`num_outputs`),
* its training loss (``forward``),
* its test-time score function (:meth:`scores`, logits ``[N, K]`` -> foreground scores ``[N, C]``),
* its classifier bias initialisation (:meth:`init_bias`),
* and any state it keeps (EMA vectors, gradient accumulators) as registered buffers, so that
  ``state_dict``, checkpoints and DDP reductions work with nothing but the loss's own file.

Two kinds exist, differing in the label convention of ``forward``:

``TwoStageLoss`` (RoI classification): ``forward(logits [N, K], labels [N] int64, weight [N] | None)``
with foreground labels ``0..C-1`` and background ``C``. ``update(logits, labels, gt_index)`` is
called by the RoI head after sampling and before the loss (no-op unless the loss keeps state that
must update then, e.g. the Equilibrium Loss).

``OneStageLoss`` (dense anchors): ``forward(logits [N, C], labels [N] int64, normalizer, quality=None)``
with ``0..C-1`` for positive anchors, ``C`` for negatives and ``-1`` for ignored anchors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ClassificationLoss(nn.Module):
    """Common base: width, scores and bias initialisation. Subclasses set ``kind``."""

    kind: str = "two_stage"
    #: True when the classifier has a background column (softmax heads, K = C+1 with bg last).
    has_background: bool = True

    def __init__(self, num_classes: int):
        super().__init__()
        if int(num_classes) <= 0:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)

    def num_outputs(self) -> int:
        """Classifier width K for this loss (default: C + 1, background last)."""
        return self.num_classes + 1

    def scores(self, logits: Tensor) -> Tensor:
        """Test-time foreground scores ``[N, C]`` from logits ``[N, K]`` (default: softmax, drop bg)."""
        return torch.softmax(logits, dim=-1)[:, : self.num_classes]

    def init_bias(self, bias: Tensor) -> None:
        """Initialise the classifier bias ``[K]`` in place (default: zeros)."""
        with torch.no_grad():
            bias.zero_()

    def update(self, logits: Tensor, labels: Tensor, gt_index: Tensor | None = None) -> None:
        """State update before the loss of the same iteration (no-op by default)."""


def prior_bias(prior: float) -> float:
    """Bias that makes ``sigmoid(bias) == prior`` (focal-loss style initialisation)."""
    return -math.log((1.0 - prior) / prior)
