"""Config values that name a registry entry are validated against the registry itself (issue 14:
no second list of names): registering a name makes the config accept it, and an unknown name's
error lists the registry's names."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import yaml

from taildet.config import config_from_dict, load_config
from taildet.data import samplers
from taildet.errors import ConfigError
from taildet.losses import LOSSES
from taildet.models import backbones, one_stage_heads
from taildet.models import build as model_build
from taildet.models.classifiers import CLASSIFIERS
from taildet.models.two_stage import build_faster_rcnn

CONFIG_PKG = Path(__file__).resolve().parents[1] / "src" / "taildet" / "config"


def _cfg(model: dict | None = None, data: dict | None = None):
    return config_from_dict({"model": model or {}, "data": {"synthetic": {}, **(data or {})},
                             "train": {"iterations": 1}})


#: (registry, the config value naming one of its entries, a registered name)
CASES = {
    "arch": (model_build.ARCHITECTURES, lambda v: {"model": {"arch": v}}, "fcos"),
    "loss": (LOSSES, lambda v: {"model": {"loss": v}}, "softmax_ce"),
    "classifier": (CLASSIFIERS, lambda v: {"model": {"classifier": v}}, "cosine"),
    "sampler": (samplers.SAMPLERS, lambda v: {"data": {"sampler": v}}, "rfs"),
}


@pytest.mark.parametrize("what", sorted(CASES))
def test_a_name_registered_at_run_time_is_accepted(what, monkeypatch):
    registry, section, known = CASES[what]
    with pytest.raises(ConfigError) as err:
        _cfg(**section("brand_new"))
    for name in registry:  # the message lists the registry's names, all of them
        assert name in str(err.value)
    monkeypatch.setitem(registry, "brand_new", registry[known])
    _cfg(**section("brand_new"))
    with pytest.raises(ConfigError) as err:
        _cfg(**section("still_unknown"))
    assert "brand_new" in str(err.value)


def test_model_options_and_traits_come_from_the_builder(monkeypatch):
    with pytest.raises(ConfigError, match=r"model\.my_option: not an option of any registered architecture "
                                          r"\(the builders of ARCHITECTURES take: .*topk_candidates"):
        _cfg({"arch": "fcos", "my_option": 3})

    def with_my_option(num_classes, *, my_option: int = 0, backbone: str = "tiny"):  # no **kwargs: options listed
        return build_faster_rcnn(num_classes, backbone=backbone)

    monkeypatch.setitem(model_build.ARCHITECTURES, "with_my_option", with_my_option)
    assert model_build.architecture_info("with_my_option").options == {"my_option", "backbone"}
    assert _cfg({"arch": "fcos", "my_option": 3}).model.kwargs["my_option"] == 3  # build_model rejects it for fcos
    monkeypatch.delitem(model_build.ARCHITECTURES, "with_my_option")

    @functools.wraps(build_faster_rcnn)  # keeps the signature and cls_stage ("roi_heads")
    def my_two_stage(num_classes, **options):
        return build_faster_rcnn(num_classes, **options)

    with pytest.raises(ConfigError, match=r"needs a two-stage detector \(faster_rcnn or mask_rcnn or "
                                          r"cascade_rcnn or cascade_mask_rcnn\)"):
        _cfg({"arch": "fcos", "logit_bn": True})
    monkeypatch.setitem(model_build.ARCHITECTURES, "my_two_stage", my_two_stage)
    cfg = _cfg({"arch": "my_two_stage", "logit_bn": True, "box_batch_size_per_image": 64})
    assert model_build.architecture_info("my_two_stage").options == model_build.architecture_info("faster_rcnn").options
    assert cfg.model.kwargs["box_batch_size_per_image"] == 64
    with pytest.raises(ConfigError, match=r"needs a two-stage detector \(faster_rcnn or mask_rcnn or "
                                          r"cascade_rcnn or cascade_mask_rcnn or my_two_stage\)"):
        _cfg({"arch": "fcos", "logit_bn": True})
    assert model_build.architecture_info("my_two_stage").stage == "roi_heads"
    assert model_build.architecture_info("mask_rcnn").masks and not model_build.architecture_info("my_two_stage").masks


def test_the_config_package_keeps_no_list_of_registered_names():
    for path in sorted(CONFIG_PKG.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for name in ("retinanet", "fcos", "atss", "class_balanced", "eqlv2", "seesaw"):
            assert name not in text, f"{path.name} names {name}: read it from the registry instead"


#: (config key under model:, the module holding its names, the attribute)
NAME_LISTS = {
    "backbone": (backbones, "BACKBONES"),
    "norm": (backbones, "NORMS"),
    "head_norm": (one_stage_heads, "HEAD_NORMS"),
}


@pytest.mark.parametrize("key", sorted(NAME_LISTS))
def test_backbone_and_norm_names_are_checked_when_the_config_is_validated(key, tmp_path, monkeypatch):
    """model.backbone / model.norm / model.head_norm are checked against the models' own name lists
    by the config validation (not first when the model is built): the error names the file, the key
    and every allowed value; a name the models module adds is accepted at once."""
    module, attr = NAME_LISTS[key]
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump({"model": {key: "brand_new"}, "data": {"synthetic": {}},
                                    "train": {"iterations": 1}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    names = getattr(module, attr)
    assert str(err.value) == f"{path}: model.{key}: expected one of {', '.join(names)}, got 'brand_new'"
    for name in names:
        assert _cfg({key: name}).model.kwargs[key] == name
    with pytest.raises(ConfigError, match=rf"model\.{key}: expected one of .*got 3"):
        _cfg({key: 3})
    monkeypatch.setattr(module, attr, (*names, "brand_new"))
    assert load_config(path).model.kwargs[key] == "brand_new"
