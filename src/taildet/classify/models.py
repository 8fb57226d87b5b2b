"""Classifiers: a CIFAR-style ResNet-32 and torchvision's classifiers by name.

Every model is a :class:`Classifier`: a feature extractor ``features`` (images ``[N, 3, H, W]`` ->
``[N, D]``), one linear layer ``fc`` (``[N, D]`` -> logits ``[N, C]``) and the training loss
``loss`` (:class:`taildet.classify.losses.ClassifierLoss`). The split is what the decoupled methods
need: cRT re-trains ``fc`` on frozen ``features``; tau-normalisation rescales ``fc``'s rows.

``ARCHITECTURES`` maps a ``model.arch`` name to a builder ``(num_classes-free) -> (features, D)``:
``resnet32`` (He et al. 2016's CIFAR network: a 3x3 conv of 16 channels, 3 stages of 5 basic
blocks with 16/32/64 channels, strides 1/2/2, global average pooling; option-B projection
shortcuts), and any classifier name of ``torchvision.models.list_models(torchvision.models)``
(random init, no weight download), whose last ``nn.Linear`` becomes ``fc``. Inputs as small as
8 x 8 work for ResNet-32 (stride 4 in all) and for torchvision's adaptive-pooling networks.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from taildet.classify.losses import ClassifierLoss
from taildet.errors import ConfigError

__all__ = ["ResNet32Features", "Classifier", "build_features", "build_classifier"]


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet32Features(nn.Module):
    """ResNet-32 for small images without its classifier: ``[N, 3, H, W]`` -> ``[N, 64]``."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), blocks: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            stage = [_BasicBlock(cin if b == 0 else w, w, (1 if i == 0 else 2) if b == 0 else 1) for b in range(blocks)]
            layers.append(nn.Sequential(*stage))
            cin = w
        self.layer1, self.layer2, self.layer3 = layers
        self.out_features = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def _torchvision_features(name: str, **kwargs: Any) -> tuple[nn.Module, int]:
    names = torchvision.models.list_models(torchvision.models)
    if name not in names:
        raise ConfigError(f"model.arch: {name!r} is neither 'resnet32' nor a torchvision classifier "
                          f"(e.g. {', '.join(sorted(names)[:6])}, ...)")
    try:
        net = torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: torchvision {name!r} does not take {sorted(kwargs)}: {e}") from None
    last = None
    for mod_name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            last = (mod_name, m)
    if last is None:
        raise ConfigError(f"model.arch: torchvision {name!r} has no final linear layer to split off")
    parent_name, _, attr = last[0].rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, attr, nn.Identity())
    return net, last[1].in_features


def build_features(arch: str, **kwargs: Any) -> tuple[nn.Module, int]:
    """``(features, D)`` of ``model.arch`` (module docstring)."""
    if arch == "resnet32":
        if kwargs:
            raise ConfigError(f"model: resnet32 takes no options, got {sorted(kwargs)}")
        f = ResNet32Features()
        return f, f.out_features
    return _torchvision_features(arch, **kwargs)


class Classifier(nn.Module):
    """``features`` + ``fc`` + ``loss``. In training mode ``forward(images, targets)`` returns
    ``{"loss_cls": ...}`` (the engine's contract: a list of ``[3, H, W]`` images and
    ``[{"label": ...}]`` targets); in eval mode ``forward(images)`` returns logits ``[N, C]``."""

    def __init__(self, features: nn.Module, dim: int, num_classes: int, loss: ClassifierLoss):
        super().__init__()
        self.features = features
        self.fc = nn.Linear(dim, num_classes)
        self.loss = loss
        self.num_classes = int(num_classes)
        self.reset_classifier()

    def reset_classifier(self) -> None:
        """Fresh ``fc`` weights (torch's default init) with the loss's bias initialisation."""
        self.fc.reset_parameters()
        self.loss.init_bias(self.fc.bias)

    def logits(self, images: Tensor | list[Tensor]) -> Tensor:
        x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        return self.fc(self.features(x))

    def forward(self, images, targets: list[dict] | None = None):
        z = self.logits(images)
        if not self.training:
            return z
        if targets is None:
            raise ValueError("Classifier: training mode needs targets")
        labels = torch.stack([t["label"] for t in targets]).to(z.device)
        return {"loss_cls": self.loss(z, labels)}


def build_classifier(arch: str, num_classes: int, loss: str = "softmax_ce", loss_kwargs: dict | None = None,
                     train_set: Any = None, **arch_kwargs: Any) -> Classifier:
    """A :class:`Classifier` for ``num_classes`` classes (``train_set``: the loss's statistics)."""
    features, dim = build_features(arch, **arch_kwargs)
    return Classifier(features, dim, num_classes, ClassifierLoss(loss, num_classes, loss_kwargs, train_set))
