"""Backbones: the tiny CPU network, ResNet-FPN norms, and loading user-supplied ResNet weights."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from taildet.errors import ConfigError, DataError
from taildet.models import build_backbone


pytestmark = pytest.mark.usefixtures("one_thread")


def _norm_types(net: nn.Module) -> set[type]:
    return {type(m) for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d))}


def test_tiny_default_is_one_stride8_map():
    net = build_backbone("tiny")
    out = net(torch.rand(2, 3, 96, 96))
    assert list(out) == ["0"] and net.featmap_names == ["0"] and net.strides == [8]
    assert out["0"].shape == (2, net.out_channels, 12, 12) and net.out_channels == 32
    assert _norm_types(net) == {nn.BatchNorm2d}
    assert max(m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)) == 32


def test_tiny_fpn_and_gn():
    net = build_backbone("tiny", fpn=True, norm="gn")
    out = net(torch.rand(1, 3, 96, 96))
    assert [v.shape[-1] for v in out.values()] == [24, 12, 6]
    assert all(v.shape[1] == net.out_channels for v in out.values())
    assert nn.GroupNorm in _norm_types(net)


def test_resnet18_fpn_from_scratch_uses_trainable_bn():
    net = build_backbone("resnet18")
    assert _norm_types(net) == {nn.BatchNorm2d}
    assert all(p.requires_grad for p in net.parameters())
    out = net(torch.rand(1, 3, 64, 64))
    assert list(out) == ["0", "1", "2", "3", "pool"] and out["0"].shape == (1, 256, 16, 16)
    assert _norm_types(build_backbone("resnet18", norm="gn")) == {nn.GroupNorm}


def test_resnet_weights_load(tmp_path):
    src = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-random.pth"
    torch.save(src.state_dict(), path)
    net = build_backbone("resnet18", weights=str(path), trainable_layers=3)
    assert FrozenBatchNorm2d in _norm_types(net) and nn.BatchNorm2d not in _norm_types(net)
    torch.testing.assert_close(net.body.conv1.weight, src.conv1.weight)
    torch.testing.assert_close(net.body.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var)
    assert not net.body.conv1.weight.requires_grad and not net.body.layer1[0].conv1.weight.requires_grad
    assert net.body.layer2[0].conv1.weight.requires_grad


def test_resnet_weights_bad_file(tmp_path):
    sd = torchvision.models.resnet18(weights=None).state_dict()
    del sd["layer1.0.conv1.weight"]
    sd["layer2.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "broken.pth"
    torch.save(sd, bad)
    with pytest.raises(DataError) as info:
        build_backbone("resnet18", weights=bad)
    msg = str(info.value)
    assert "broken.pth" in msg and "layer1.0.conv1.weight" in msg and "layer2.0.conv1.weight" in msg
    assert "extra.weight" in msg and "missing" in msg and "unexpected" in msg

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="garbage.pth"):
        build_backbone("resnet18", weights=garbage)
    with pytest.raises(DataError, match="not found"):
        build_backbone("resnet18", weights=tmp_path / "missing.pth")
    # resnet50 weights into resnet18: a depth mismatch is reported, not a torch traceback
    with pytest.raises(DataError, match="right depth"):
        build_backbone("resnet50", weights=tmp_path / "broken.pth")


def test_backbone_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="resnet18"):
        build_backbone("vgg")
    with pytest.raises(ConfigError, match="norm"):
        build_backbone("tiny", norm="ln")
    with pytest.raises(ConfigError, match="gn"):
        build_backbone("resnet18", norm="gn", weights=tmp_path / "x.pth")


def test_resnet_fpn_p3_p7_for_one_stage_detectors():
    from taildet.models import build_model
    from taildet.models.backbones import build_backbone

    net = build_backbone("resnet18", fpn_levels="p3-p7", out_channels=64)
    feats = net(torch.rand(1, 3, 128, 128))
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2, 1]  # strides 8..128
    assert net.strides == [8, 16, 32, 64, 128]
    model = build_model("retinanet", 5, backbone="resnet18", backbone_kwargs={"fpn_levels": "p3-p7"},
                        min_size=128, max_size=128)
    sizes = model.anchor_generator.sizes
    assert len(sizes) == 5 and sizes[0][0] == 32  # torchvision's RetinaNet default for P3
    with pytest.raises(ConfigError, match="fpn_levels"):
        build_backbone("resnet18", fpn_levels="p4")
