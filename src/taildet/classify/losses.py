"""taildet's losses in their classification form: ``[N, C]`` logits, labels ``0..C-1``.

No loss is re-implemented: :class:`ClassifierLoss` builds the loss registered in
:data:`taildet.losses.LOSSES` and adapts shapes and labels:

* losses with a background column (``softmax_ce``, ``seesaw``, ``equilibrium``/``ebl``, and the
  sigmoid ``eqlv2``; ``K = C + 1``): a constant background logit of ``-1e4`` is appended, so a
  softmax over ``C + 1`` equals the softmax over the ``C`` classes (``exp(-1e4 - max) = 0`` in
  float32), a sigmoid background output is 0 with a zero loss term, and no sample is background;
  Seesaw (``K = C + 2``) gets its objectness pair as ``[0, -1e4]`` (the objectness term is 0:
  every sample is foreground);
* ``balanced_softmax``: its classification form (``background=False``, ``CE(z + log n, y)``);
* sigmoid losses without one (``sigmoid_bce``, ``eql``, ``sigmoid_focal``, ``efl``,
  ``balanced_sigmoid``): ``K = C``, every sample a positive; one-stage losses (focal, EFL) get
  ``normalizer = N`` (all samples positive).

Test-time scores: ``softmax`` over the ``C`` logits for softmax losses, ``sigmoid`` for the
:data:`SIGMOID_LOSSES` (``scores``); top-1 is their argmax either way. Training-set statistics a loss needs
(``instance_counts``, ``image_counts``, ``image_frequency``) come from the training split, one
instance per image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from taildet.errors import ConfigError
from taildet.losses import LOSSES, build_loss, fill_dataset_statistics
from taildet.losses.base import ClassificationLoss

__all__ = ["CLASSIFY_LOSSES", "SIGMOID_LOSSES", "ClassifierLoss", "BACKGROUND_LOGIT"]

#: The losses whose classifier outputs are independent sigmoids (test-time scores: ``sigmoid``).
SIGMOID_LOSSES = ("sigmoid_bce", "eql", "eqlv2", "sigmoid_focal", "efl", "equalized_focal", "balanced_sigmoid")

#: The constant background logit appended for losses that need a background column.
BACKGROUND_LOGIT = -1e4

#: The loss names with a classification form here (all kinds of taildet losses but the quality ones,
#: which need a box IoU, and the online LogN wrapper).
CLASSIFY_LOSSES = ("softmax_ce", "balanced_softmax", "seesaw", "eqlv2", "equilibrium", "ebl", "sigmoid_bce",
                   "eql", "sigmoid_focal", "efl", "equalized_focal", "balanced_sigmoid")


class ClassifierLoss(nn.Module):
    """The classification form of ``taildet.losses.LOSSES[name]`` (module docstring).

    ``forward(logits [N, C], labels [N]) -> scalar``; ``scores(logits) -> [N, C]``. The wrapped
    loss (``self.loss``, a :class:`ClassificationLoss` with its buffers) gets the engine's hooks.
    """

    def __init__(self, name: str, num_classes: int, loss_kwargs: dict | None = None, train_set: Any = None):
        super().__init__()
        if name not in CLASSIFY_LOSSES:
            known = ", ".join(CLASSIFY_LOSSES)
            hint = " (not a taildet loss)" if name not in LOSSES else " (no classification form)"
            raise ConfigError(f"model.loss: {name!r}{hint}; classification losses: {known}")
        kwargs = dict(loss_kwargs or {})
        if name == "balanced_softmax":
            if kwargs.get("background", False):
                raise ConfigError("model.loss_kwargs.background: the classification form of balanced_softmax "
                                  "has no background column (leave it out)")
            kwargs["background"] = False
        kwargs = fill_dataset_statistics(name, kwargs, train_set)
        self.name = name
        self.num_classes = int(num_classes)
        self.loss: ClassificationLoss = build_loss(name, num_classes, **kwargs)
        k = self.loss.num_outputs()
        if k not in (num_classes, num_classes + 1, num_classes + 2):
            raise ConfigError(f"model.loss: {name!r} has {k} outputs for {num_classes} classes")
        self.pad_background = k > num_classes
        #: the constant columns appended: a background logit, or Seesaw's objectness pair [fg, bg]
        self.pad_values = [] if k == num_classes else [BACKGROUND_LOGIT] if k == num_classes + 1 \
            else [0.0, BACKGROUND_LOGIT]

    @property
    def sigmoid(self) -> bool:
        """True for sigmoid losses (scores are sigmoids; bias init from the loss's prior)."""
        return self.name in SIGMOID_LOSSES

    def init_bias(self, bias: Tensor) -> None:
        """The loss's bias initialisation on the ``C`` class columns."""
        full = torch.zeros(self.loss.num_outputs(), dtype=bias.dtype)
        self.loss.init_bias(full)
        with torch.no_grad():
            bias.copy_(full[: self.num_classes])

    def _full(self, logits: Tensor) -> Tensor:
        if not self.pad_background:
            return logits
        pad = logits.new_tensor(self.pad_values).expand(logits.shape[0], -1)
        return torch.cat([logits, pad], dim=1)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        z = self._full(logits)
        if self.loss.kind == "one_stage":
            return self.loss(z, labels, normalizer=float(max(1, labels.shape[0])))
        self.loss.update(z.detach(), labels, torch.arange(labels.shape[0], device=labels.device))
        return self.loss(z, labels)

    def scores(self, logits: Tensor) -> Tensor:
        """``[N, C]`` test-time scores (softmax or sigmoid of the raw logits)."""
        return torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
