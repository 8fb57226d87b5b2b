"""RoI classifiers: the last layer that turns box-head features into ``K`` logits.

Both expose ``.weight [K, D]`` and ``.bias [K]`` (so ``loss.init_bias(classifier.bias)`` works and
the state-dict keys are those of an ``nn.Linear``), and are selected by name through
:data:`CLASSIFIERS`.

* ``"linear"`` -- :class:`LinearClassifier`, ``z = W x + b`` (weights ~ N(0, 0.01^2)).
* ``"cosine"`` -- :class:`NormalizedLinear`, ``z = T * <x / (|x| + 1e-6), W / (|W| + 1e-6)> + b``
  with ``T = 20`` and a learnable bias (methods.md section 5).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from taildet.errors import ConfigError

__all__ = ["LinearClassifier", "NormalizedLinear", "CLASSIFIERS", "build_classifier"]


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


CLASSIFIERS: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": LinearClassifier,
    "cosine": NormalizedLinear,
}


def build_classifier(name: str, in_features: int, num_outputs: int) -> nn.Module:
    """The classifier registered as ``name`` in :data:`CLASSIFIERS`."""
    if name not in CLASSIFIERS:
        raise ConfigError(f"unknown classifier {name!r}; valid names: {', '.join(sorted(CLASSIFIERS))}")
    return CLASSIFIERS[name](in_features, num_outputs)
