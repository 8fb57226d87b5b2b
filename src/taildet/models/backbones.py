"""Backbones: a tiny CPU network for the embedded 96 px dataset and ResNet(-FPN) from torchvision.

:func:`build_backbone` returns an ``nn.Module`` whose ``forward(images [B, 3, H, W])`` gives an
``OrderedDict[str, Tensor]`` of feature maps with ``out_channels`` channels each (the contract of
torchvision's ``BackboneWithFPN``). Two extra plain attributes tell the detector builders how to
place anchors and pool RoIs: ``featmap_names`` (maps used for RoI pooling) and ``strides``.

Normalisation (``norm``):

* ``"bn"`` -- trainable ``BatchNorm2d`` when training from scratch (``weights=None``), but
  ``FrozenBatchNorm2d`` when ``weights`` is given: pretrained statistics are kept, as torchvision
  does. ``FrozenBatchNorm2d`` from scratch is wrong (the statistics are never learnt; erratic
  4-10 s step spikes were measured), which is why it is not the from-scratch default.
* ``"frozen_bn"`` -- ``FrozenBatchNorm2d`` always.
* ``"gn"`` -- ``GroupNorm`` (from scratch only: torchvision ResNet weights carry BN statistics).

``weights`` is a path to a torchvision-format state dict: for a ResNet, for example a
``resnet50-*.pth`` saved by torchvision; for the tiny network, the backbone that ``taildet
pretrain-backbone`` pretrains on the embedded benchmark's balanced classification crops
(:mod:`taildet.engine.pretrain`; keys ``stage1.0.0.weight``, ...; an ``fc.*`` classifier is
ignored; the tiny FPN, absent from such a file, keeps its random init). Nothing is ever
downloaded. A file that cannot be read or does not fit the network raises
:class:`taildet.errors.DataError` naming the file and the first offending keys.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from taildet.errors import ConfigError, DataError

__all__ = ["TinyBackbone", "build_backbone", "BACKBONES", "NORMS", "load_resnet_weights", "load_tiny_weights"]

BACKBONES = ("tiny", "resnet18", "resnet50", "resnet101")
NORMS = ("bn", "frozen_bn", "gn")
_RESNET_STAGES = ["layer4", "layer3", "layer2", "layer1", "conv1"]


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = 32 if channels >= 64 else max(1, channels // 4)
    return nn.GroupNorm(groups, channels)


def _norm_layer(norm: str, pretrained: bool) -> Callable[[int], nn.Module]:
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    if norm == "gn":
        if pretrained:
            raise ConfigError(
                "norm='gn' cannot load torchvision ResNet weights (they hold BatchNorm statistics); "
                "use norm='bn' (frozen when weights are given) or train from scratch"
            )
        return _group_norm
    if norm == "frozen_bn" or pretrained:
        return FrozenBatchNorm2d
    return nn.BatchNorm2d


def _conv_norm_relu(cin: int, cout: int, norm: Callable[[int], nn.Module], stride: int = 1, dilation: int = 1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        norm(cout),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(nn.Module):
    """A plain 4-stage CNN (16-32 channels) for small images, from scratch.

    Each stage is two 3x3 conv-norm-ReLU layers. Strides of the stage outputs: 2, 4, 8 and 8 (the
    4th stage is dilated instead of strided), returning one stride-8 map ``"0"`` -- the network
    measured at about 96 training images/s on 2 cores. With ``fpn=True`` the 4th stage is strided
    (16) and a torchvision ``FeaturePyramidNetwork`` over stages 2-4 returns maps ``"0", "1", "2"``
    at strides 4, 8, 16.
    """

    def __init__(
        self,
        widths: tuple[int, int, int, int] = (16, 32, 32, 32),
        *,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
        fpn: bool = False,
        out_channels: int | None = None,
    ):
        super().__init__()
        w1, w2, w3, w4 = widths
        if out_channels is not None and not fpn:
            w4 = int(out_channels)
        self.stage1 = nn.Sequential(_conv_norm_relu(3, w1, norm, 2), _conv_norm_relu(w1, w1, norm))
        self.stage2 = nn.Sequential(_conv_norm_relu(w1, w2, norm, 2), _conv_norm_relu(w2, w2, norm))
        self.stage3 = nn.Sequential(_conv_norm_relu(w2, w3, norm, 2), _conv_norm_relu(w3, w3, norm))
        if fpn:
            self.stage4 = nn.Sequential(_conv_norm_relu(w3, w4, norm, 2), _conv_norm_relu(w4, w4, norm))
            self.out_channels = int(out_channels or 32)
            self.fpn = FeaturePyramidNetwork([w2, w3, w4], self.out_channels)
            self.featmap_names = ["0", "1", "2"]
            self.strides = [4, 8, 16]
        else:
            self.stage4 = nn.Sequential(_conv_norm_relu(w3, w4, norm, dilation=2), _conv_norm_relu(w4, w4, norm))
            self.out_channels = w4
            self.fpn = None
            self.featmap_names = ["0"]
            self.strides = [8]
        for stage in (self.stage1, self.stage2, self.stage3, self.stage4):
            for m in stage.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        c3 = self.stage3(c2)
        c4 = self.stage4(c3)
        if self.fpn is None:
            return OrderedDict([("0", c4)])
        return self.fpn(OrderedDict([("0", c2), ("1", c3), ("2", c4)]))


def _freeze(module: nn.Module, trainable: list[str]) -> None:
    for name, p in module.named_parameters():
        if not any(name.startswith(t) for t in trainable):
            p.requires_grad_(False)


def _read_state_dict(path: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise DataError(path, "", "backbone weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes a DataError
        raise DataError(path, "", f"cannot read as a torch state dict ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise DataError(path, "", f"expected a non-empty state dict (name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise DataError(path, f"entries {bad[:5]}", "are not tensors keyed by a name")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _listing(keys: list[str], n: int = 5) -> str:
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_resnet_weights(body: nn.Module, path: str | os.PathLike) -> None:
    """Load a torchvision ResNet state dict from ``path`` into ``body`` (a torchvision ResNet).

    The classifier (``fc.*``) and ``num_batches_tracked`` entries are ignored on both sides. Missing
    keys, unexpected keys and shape mismatches raise :class:`DataError` listing the first few.
    """
    _load_weights(body, path, ("fc.",), "ResNet", "is it the right depth, in torchvision format?")


def load_tiny_weights(net: "TinyBackbone", path: str | os.PathLike) -> None:
    """Load a tiny-backbone state dict (``stage1.*`` .. ``stage4.*``, e.g. from ``taildet
    pretrain-backbone``) into ``net``. A classifier (``fc.*``), ``num_batches_tracked`` and the
    FPN (``fpn.*``, trained in detection only) are ignored on both sides; anything else that does
    not fit raises :class:`DataError` as :func:`load_resnet_weights`."""
    _load_weights(net, path, ("fc.", "fpn."), "tiny-backbone",
                  "is it a tiny backbone of default widths, from taildet pretrain-backbone?")


def _load_weights(body: nn.Module, path: str | os.PathLike, ignored: tuple[str, ...], what: str,
                  hint: str) -> None:
    path = os.fspath(path)
    state = _read_state_dict(path)

    def relevant(k: str) -> bool:
        return not k.startswith(ignored) and not k.endswith("num_batches_tracked")

    own = {k: v for k, v in body.state_dict().items() if relevant(k)}
    given = {k: v for k, v in state.items() if relevant(k)}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    mismatched = [
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in given and given[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched, 3)}")
    if problems:
        raise DataError(
            path,
            f"{what} state dict for {type(body).__name__}",
            f"does not fit the backbone ({hint}): " + "; ".join(problems),
        )
    body.load_state_dict(given, strict=False)


def build_backbone(
    name: str,
    *,
    norm: str = "bn",
    weights: str | os.PathLike | None = None,
    trainable_layers: int = 5,
    fpn: bool | None = None,
    out_channels: int | None = None,
    fpn_levels: str = "p2-p6",
) -> nn.Module:
    """Build a detection backbone (see the module docstring).

    Args:
        name: ``"tiny"``, ``"resnet18"``, ``"resnet50"`` or ``"resnet101"``.
        norm: ``"bn"`` (frozen when ``weights`` is given), ``"frozen_bn"`` or ``"gn"``.
        weights: path to a torchvision-format state dict of the network (ResNet, or the tiny
            network's from ``taildet pretrain-backbone``), or None (random init).
        trainable_layers: how many stages, counted from the last, get gradients (5 = all; for the
            tiny network 4 or more = all, and its FPN always trains). Frozen stages get
            ``requires_grad=False``; with ``weights`` the norm layers are frozen too (``"bn"``).
        fpn: FPN on top; None means the network's default (tiny: one stride-8 map; ResNet: FPN
            over layers 1-4 plus a max-pooled level, strides 4-64).
        out_channels: FPN width (default 256 for ResNet, 32 for tiny), or the tiny network's last
            stage width without FPN. Ignored for a ResNet without FPN (its own width is used).
        fpn_levels: ResNet FPN levels: ``"p2-p6"`` (two-stage default, as torchvision's Faster
            R-CNN: layers 1-4 + max-pool, strides 4-64) or ``"p3-p7"`` (one-stage detectors, as
            torchvision's RetinaNet/FCOS and the ATSS papers: layers 2-4 + P6/P7 convs on P5,
            strides 8-128; 1/16 of the P2 anchors, which matters with 1,203 classes).
    """
    if fpn_levels not in ("p2-p6", "p3-p7"):
        raise ConfigError(f"fpn_levels must be 'p2-p6' or 'p3-p7', got {fpn_levels!r}")
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    if not 0 <= int(trainable_layers) <= 5:
        raise ConfigError(f"trainable_layers must be in 0..5, got {trainable_layers!r}")
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ConfigError(
            f"backbone weights must be a path to a local state dict file (nothing is downloaded), got {weights!r}"
        )
    if isinstance(weights, str) and weights == "synthetic-pretrained":
        raise ConfigError(
            "backbone weights 'synthetic-pretrained' name the cached tiny backbone that the training "
            "engine resolves (taildet train / build_model_from_cfg); to build a model directly, pass "
            "the path from taildet.engine.pretrain.ensure_pretrained_backbone() or `taildet pretrain-backbone`"
        )
    norm_layer = _norm_layer(norm, pretrained=weights is not None)

    if name == "tiny":
        net = TinyBackbone(norm=norm_layer, fpn=bool(fpn), out_channels=out_channels)
        if weights is not None:
            load_tiny_weights(net, weights)
        if trainable_layers < 4:
            _freeze(net, ["fpn"] + ["stage4", "stage3", "stage2", "stage1"][:trainable_layers])
        return net

    body = getattr(tv_resnet, name)(weights=None, norm_layer=norm_layer)
    if weights is not None:
        load_resnet_weights(body, weights)
    trainable = _RESNET_STAGES[:trainable_layers] + (["bn1"] if trainable_layers == 5 else [])
    _freeze(body, trainable)
    c5 = body.inplanes  # channels of layer4's output
    if (fpn is None or fpn) and fpn_levels == "p3-p7":
        width = int(out_channels or 256)
        net = BackboneWithFPN(
            body,
            return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
            in_channels_list=[c5 // 4, c5 // 2, c5],
            out_channels=width,
            extra_blocks=LastLevelP6P7(width, width),
        )
        net.featmap_names = ["0", "1", "2"]
        net.strides = [8, 16, 32, 64, 128]
        return net
    if fpn is None or fpn:
        in_channels_list = [c5 // 8, c5 // 4, c5 // 2, c5]
        net = BackboneWithFPN(
            body,
            return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
            in_channels_list=in_channels_list,
            out_channels=int(out_channels or 256),
            extra_blocks=LastLevelMaxPool(),
        )
        net.featmap_names = ["0", "1", "2", "3"]
        net.strides = [4, 8, 16, 32, 64]
        return net
    return _SingleMap(body, c5)


class _SingleMap(nn.Module):
    """A ResNet without FPN: layer4's output (stride 32) as the single map ``"0"``."""

    def __init__(self, body: nn.Module, channels: int):
        super().__init__()
        self.body = IntermediateLayerGetter(body, return_layers={"layer4": "0"})
        self.out_channels = channels
        self.featmap_names = ["0"]
        self.strides = [32]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.body(x)

