"""RoI classifiers: the last layer that turns box-head features into ``K`` logits.

Both expose ``.weight [K, D]`` and ``.bias [K]`` (so ``loss.init_bias(classifier.bias)`` works and
the state-dict keys are those of an ``nn.Linear``), and are selected by name through
:data:`CLASSIFIERS`.

* ``"linear"`` -- :class:`LinearClassifier`, ``z = W x + b`` (weights ~ N(0, 0.01^2)).
* ``"cosine"`` -- :class:`NormalizedLinear`, ``z = T * <x / (|x| + 1e-6), W / (|W| + 1e-6)> + b``
  with ``T = 20`` and a learnable bias (methods.md section 5).

:class:`LogitBatchNorm` is the optional BatchNorm on the classifier's logits of LogN's released
recipe (``model.logit_bn``; the authors' ``LogitNormHead``), used by
:class:`taildet.models.two_stage.TailBoxPredictor` after either classifier.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from taildet.errors import ConfigError

__all__ = ["LinearClassifier", "NormalizedLinear", "LogitBatchNorm", "CLASSIFIERS", "build_classifier"]


class LinearClassifier(nn.Linear):
    """A plain linear classifier ``z = W x + b`` (``x`` is flattened to ``[N, D]``)."""

    def __init__(self, in_features: int, num_outputs: int):
        super().__init__(in_features, num_outputs)
        nn.init.normal_(self.weight, std=0.01)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.flatten(1))


class NormalizedLinear(nn.Module):
    """Cosine classifier ``z = T * cos(x, W_k) + b_k`` with ``eps = 1e-6`` added to both norms."""

    def __init__(self, in_features: int, num_outputs: int, temperature: float = 20.0, eps: float = 1e-6):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(num_outputs)
        self.temperature = float(temperature)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.zeros(self.out_features))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        x_n = x / (x.norm(dim=1, keepdim=True) + self.eps)
        w_n = self.weight / (self.weight.norm(dim=1, keepdim=True) + self.eps)
        return self.temperature * (x_n @ w_n.t()) + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, temperature={self.temperature}"


class LogitBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the ``K`` logit columns, without affine parameters (LogN's released recipe).

    The authors' ``LogitNormHead`` (github MCG-NJU/LogN) applies ``BatchNorm1d(C + 1,
    affine=False, eps=1e-5, momentum=1e-4)`` to *all* ``K = C + 1`` logits of the softmax head --
    the background column included -- in training mode, before the cross-entropy; taildet does
    the same (for a sigmoid head, ``K = C``: every column). So the loss sees per-column batch-
    standardised logits ``(z - mean_batch) / sqrt(var_batch + eps)`` (population variance of the
    batch), and the running statistics are updated as any BatchNorm's::

        running_mean <- (1 - m) running_mean + m mean_batch
        running_var  <- (1 - m) running_var  + m var_batch_unbiased    (divide by n - 1)

    starting from mean 0, var 1. At evaluation the predictor returns the **raw** logits (this
    module is skipped, see :class:`~taildet.models.two_stage.TailBoxPredictor`); LogN is then
    applied post hoc from these running statistics (``taildet calibrate --stats running``) with
    the background column left unchanged, exactly what the reference's eval-mode forward computes
    inline (its ``get_statistics`` sets the background's mean to 0 and std to 1). The statistics
    are module buffers (``running_mean``, ``running_var``, ``num_batches_tracked``): they are in
    the ``state_dict``, hence in every checkpoint, and survive save / resume.

    Being a ``_NormBase``, it is put in eval mode by the LogN statistics pass
    (:func:`taildet.calibration.training_sampling_mode`), so that pass sees raw logits and leaves
    the running statistics alone.
    """

    def __init__(self, num_outputs: int, momentum: float = 1e-4, eps: float = 1e-5):
        momentum = float(momentum)
        if not 0.0 < momentum <= 1.0:
            raise ConfigError(f"logit_bn_momentum must be in (0, 1], got {momentum!r}")
        super().__init__(int(num_outputs), eps=float(eps), momentum=momentum, affine=False,
                         track_running_stats=True)


CLASSIFIERS: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": LinearClassifier,
    "cosine": NormalizedLinear,
}


def build_classifier(name: str, in_features: int, num_outputs: int) -> nn.Module:
    """The classifier registered as ``name`` in :data:`CLASSIFIERS`."""
    if name not in CLASSIFIERS:
        raise ConfigError(f"unknown classifier {name!r}; valid names: {', '.join(sorted(CLASSIFIERS))}")
    return CLASSIFIERS[name](in_features, num_outputs)
