"""The pretrained regime: balanced classification crops, tiny-backbone pretraining, its cache, the
config keys that select it, and frozen stages during detection training."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from taildet.config import apply_overrides, config_from_dict, load_config
from taildet.data.balanced_crops import make_balanced_crops
from taildet.engine import pretrain as pt
from taildet.engine.pretrain import (PRETRAINED_REGIME_OVERRIDES, PretrainRecipe, ensure_pretrained_backbone,
                                     pretrain_backbone)
from taildet.errors import ConfigError, DataError
from taildet.models import build_backbone, build_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: A recipe small enough for a test: 96 training crops, 3 steps.
TINY = PretrainRecipe(seed=7, per_class=2, heldout_per_class=1, epochs=1, batch_size=32, warmup_steps=1)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained") / "tiny.pth"
    info = pretrain_backbone(path, TINY, progress=False)
    return path, info


# ----------------------------------------------------------------------------- balanced crops


def test_balanced_crops_equal_counts_deterministic_and_hold_the_object():
    a = make_balanced_crops(3, 3)
    b = make_balanced_crops(3, 3)
    assert a["images"].shape == (144, 48, 48, 3) and a["images"].dtype == np.uint8
    assert np.bincount(a["labels"], minlength=48).tolist() == [3] * 48
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    assert not np.array_equal(a["images"], make_balanced_crops(4, 3)["images"])
    held = make_balanced_crops(3, 3, "heldout")
    assert not any(np.array_equal(x, y) for x, y in zip(a["images"], held["images"]))
    # the object's whole box lies in its window, and the window shows the object's colour
    x, y, w, h = a["boxes"].T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 48).all() and (y + h <= 48).all()
    assert (np.maximum(w, h) >= 13.9).all() and (np.maximum(w, h) <= 40.1).all()  # longer side 14-40 px
    from taildet.data.synthetic import _RGB, COLOURS

    for img, label in zip(a["images"][:48], a["labels"][:48]):
        rgb = np.array(_RGB[COLOURS[label % 6]])
        assert (np.abs(img.reshape(-1, 3).astype(int) - rgb).max(1) <= 12).sum() >= 20


def test_balanced_crops_never_repeat_detection_images(tmp_path):
    """With the detection dataset's own seed, no crop is a window of any train or val image."""
    from PIL import Image

    from taildet.data.synthetic import make_dataset

    info = make_dataset(tmp_path / "data", seed=5, scale=0.05, progress=False, num_workers=1)
    crops = np.concatenate([make_balanced_crops(5, 2, s)["images"] for s in ("train", "heldout")])
    index: dict[bytes, list[tuple[np.ndarray, int, int]]] = {}
    for split in ("train", "val"):
        data = json.load(open(info[f"{split}_json"]))
        for im in data["images"]:
            img = np.asarray(Image.open(os.path.join(info["image_dir"], im["file_name"])).convert("RGB"))
            for yy in range(img.shape[0] - 48 + 1):
                for xx in range(img.shape[1] - 48 + 1):
                    index.setdefault(img[yy, xx:xx + 4].tobytes(), []).append((img, yy, xx))

    def found(crop: np.ndarray) -> bool:
        return any(np.array_equal(img[yy:yy + 48, xx:xx + 48], crop)
                   for img, yy, xx in index.get(crop[0, :4].tobytes(), []))

    some_img, _, _ = next(iter(index.values()))[0]
    assert found(some_img[10:58, 20:68])  # the check does find a window that is there
    assert not any(found(c) for c in crops)


def test_balanced_crops_bad_arguments():
    with pytest.raises(ConfigError, match="per_class"):
        make_balanced_crops(0, 0)
    with pytest.raises(ConfigError, match="split"):
        make_balanced_crops(0, 1, "val")
    with pytest.raises(ConfigError, match="crop_size"):
        make_balanced_crops(0, 1, crop_size=32)


# ----------------------------------------------------------------------------- pretraining


def test_pretraining_is_deterministic_and_writes_a_backbone_state_dict(tmp_path, tiny_weights):
    path, info = tiny_weights
    again = tmp_path / "again.pth"
    info2 = pretrain_backbone(again, TINY, progress=False)
    a, b = torch.load(path, weights_only=True), torch.load(again, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert info2["digest"] == info["digest"] and info2["heldout_top1"] == info["heldout_top1"]
    assert all(k.startswith(("stage1.", "stage2.", "stage3.", "stage4.")) for k in a)  # backbone only
    assert "stage1.0.1.running_mean" in a
    record = json.load(open(str(path) + ".json"))
    assert record["per_class"] == 2 and record["train_crops"] == 96 and record["heldout_crops"] == 48
    assert 0.0 <= record["heldout_top1"] <= 1.0 and record["chance"] == pytest.approx(1 / 48)
    other = pretrain_backbone(tmp_path / "other.pth", PretrainRecipe(**{**TINY.__dict__, "seed": 8}),
                              progress=False)
    assert other["digest"] != info["digest"]
    c = torch.load(tmp_path / "other.pth", weights_only=True)
    assert not torch.equal(a["stage1.0.0.weight"], c["stage1.0.0.weight"])
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temporary file left


def test_pretrained_backbone_loads_into_the_detector_and_changes_its_init(tiny_weights):
    path, _ = tiny_weights
    state = torch.load(path, weights_only=True)
    kwargs = dict(backbone="tiny", min_size=96, max_size=96, representation_size=32)
    torch.manual_seed(0)
    scratch = build_model("faster_rcnn", 48, **kwargs)
    torch.manual_seed(0)
    pre = build_model("faster_rcnn", 48, backbone_weights=str(path), **kwargs)
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(pre.backbone.state_dict()[k], v), k
        assert not torch.equal(scratch.backbone.state_dict()[k], v), k
    assert any(isinstance(m, FrozenBatchNorm2d) for m in pre.backbone.modules())  # as torchvision with weights
    for arch in ("retinanet", "fcos", "atss"):
        net = build_model(arch, 48, backbone="tiny", backbone_weights=str(path), min_size=96, max_size=96)
        assert torch.equal(net.backbone.stage3[0][0].weight, state["stage3.0.0.weight"])
    # the FPN variant takes the same stage weights; its FPN keeps a random init
    fpn = build_backbone("tiny", fpn=True, weights=str(path))
    assert torch.equal(fpn.stage4[1][0].weight, state["stage4.1.0.weight"])


def test_tiny_weights_errors(tmp_path, tiny_weights):
    path, _ = tiny_weights
    with pytest.raises(DataError, match="not found"):
        build_backbone("tiny", weights=str(tmp_path / "missing.pth"))
    state = torch.load(path, weights_only=True)
    del state["stage2.0.0.weight"]
    state["head.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(DataError, match="missing keys: stage2.0.0.weight.*unexpected keys: head.weight"):
        build_backbone("tiny", weights=str(tmp_path / "bad.pth"))
    with pytest.raises(DataError, match="shape mismatches"):
        build_backbone("tiny", weights=str(path), out_channels=64)
    with pytest.raises(ConfigError, match="synthetic-pretrained"):
        build_backbone("tiny", weights="synthetic-pretrained")


def test_cache_is_reused_without_retraining(tmp_path, tiny_weights, monkeypatch):
    calls = []
    real = pt.pretrain_backbone

    def counting(out, recipe=None, **kw):
        calls.append(out)
        return real(out, recipe, **kw)

    monkeypatch.setattr(pt, "pretrain_backbone", counting)
    p1, rec1 = ensure_pretrained_backbone(tmp_path / "cache", TINY, progress=False)
    assert not rec1["reused"] and len(calls) == 1 and p1.is_file()
    assert p1.name == f"tiny_synthetic_{TINY.digest()}.pth"
    p2, rec2 = ensure_pretrained_backbone(tmp_path / "cache", TINY, progress=False)
    assert p2 == p1 and rec2["reused"] and len(calls) == 1  # second call: no training
    # a different recipe is a different file; a damaged record is retrained
    p3, _ = ensure_pretrained_backbone(tmp_path / "cache", PretrainRecipe(**{**TINY.__dict__, "epochs": 2}),
                                       progress=False)
    assert p3 != p1 and len(calls) == 2
    (tmp_path / "cache" / (p1.name + ".json")).write_text("{}")
    ensure_pretrained_backbone(tmp_path / "cache", TINY, progress=False)
    assert len(calls) == 3


# ----------------------------------------------------------------------------- config keys


def _demo_cfg(name="demo_faster_tiny_ce.yaml"):
    return load_config(os.path.join(REPO, "configs", name))


@pytest.mark.parametrize("name", ["demo_faster_tiny_ce.yaml", "demo_retinanet_tiny_focal.yaml",
                                  "demo_atss_tiny_efl.yaml", "demo_fcos_tiny_focal.yaml",
                                  "demo_mask_tiny_ce.yaml"])
def test_regime_overrides_apply_to_demo_recipes(name):
    cfg = apply_overrides(_demo_cfg(name), list(PRETRAINED_REGIME_OVERRIDES))
    assert cfg.model.kwargs["backbone_weights"] == "synthetic-pretrained"
    assert cfg.model.kwargs["trainable_backbone_layers"] == 2


def test_regime_overlay_file_as_a_second_base(tmp_path):
    recipe = tmp_path / "pre.yaml"
    recipe.write_text(f"_base_: [{os.path.join(REPO, 'configs', 'demo_faster_tiny_ce.yaml')}, "
                      f"{os.path.join(REPO, 'configs', 'regimes', 'pretrained.yaml')}]\n")
    cfg = load_config(recipe)
    assert cfg.model.kwargs["backbone_weights"] == "synthetic-pretrained"
    assert cfg.model.kwargs["trainable_backbone_layers"] == 2
    assert cfg.model.kwargs["loss"] == "softmax_ce" and cfg.train.iterations == 1500


def test_config_validation_of_the_new_keys():
    base = _demo_cfg()
    with pytest.raises(ConfigError, match="model.trainable_backbone_layers: expected an integer in 0..5"):
        apply_overrides(base, ["model.trainable_backbone_layers=6"])
    with pytest.raises(ConfigError, match="model.trainable_backbone_layers: expected an integer >= 0"):
        apply_overrides(base, ["model.trainable_backbone_layers=-1"])
    with pytest.raises(ConfigError, match="model.backbone_weights: 'synthetic-pretrained' is the pretrained tiny"):
        apply_overrides(base, ["model.backbone_weights=synthetic-pretrained", "model.backbone=resnet18"])
    with pytest.raises(ConfigError, match="model.backbone_weights: expected a non-empty string"):
        apply_overrides(base, ["model.backbone_weights=3"])
    with pytest.raises(ConfigError, match="model.norm: pretrained backbone weights"):
        apply_overrides(base, ["model.backbone_weights=synthetic-pretrained", "model.norm=gn"])
    with pytest.raises(ConfigError, match="not both"):
        apply_overrides(_demo_cfg("demo_retinanet_tiny_focal.yaml"),
                        ["model.trainable_backbone_layers=2", "model.backbone_kwargs={trainable_layers: 3}"])
    with pytest.raises(ConfigError, match="not both"):
        build_model("retinanet", 4, backbone="tiny", trainable_backbone_layers=2,
                    backbone_kwargs={"trainable_layers": 2})
    ok = config_from_dict({**base.to_dict(), "model": {**base.to_dict()["model"], "backbone_weights": "x.pth",
                                                       "trainable_backbone_layers": 0}})
    assert ok.model.kwargs["trainable_backbone_layers"] == 0


def test_synthetic_pretrained_resolves_under_the_data_roots_parent(tmp_path, tiny_weights, monkeypatch):
    from taildet.engine.builders import build_model_from_cfg

    path, info = tiny_weights
    cache = tmp_path / "pretrained"
    cache.mkdir()
    target = pt.cached_path(cache)  # the default recipe's file, placed by hand: no 1-2 min pretraining
    target.write_bytes(path.read_bytes())
    target.with_name(target.name + ".json").write_text(
        json.dumps({**info, **PretrainRecipe().record(), "digest": PretrainRecipe().digest()}))
    monkeypatch.setattr(pt, "pretrain_backbone", lambda *a, **k: pytest.fail("must reuse the cached file"))
    cfg = apply_overrides(_demo_cfg(), [f"data.root={tmp_path / 'synthetic'}", *PRETRAINED_REGIME_OVERRIDES])
    model = build_model_from_cfg(cfg, 48)
    state = torch.load(path, weights_only=True)
    assert torch.equal(model.backbone.stage1[0][0].weight, state["stage1.0.0.weight"])
    assert cfg.model.kwargs["backbone_weights"] == "synthetic-pretrained"  # the config is left as it was


# ----------------------------------------------------------------------------- frozen stages


def test_frozen_stages_get_no_gradient_and_do_not_change(tiny_weights):
    path, _ = tiny_weights
    state = torch.load(path, weights_only=True)
    torch.manual_seed(0)
    model = build_model("faster_rcnn", 48, backbone="tiny", backbone_weights=str(path),
                        trainable_backbone_layers=2, min_size=96, max_size=96, representation_size=32,
                        box_batch_size_per_image=32)
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.backbone.named_parameters() if n.startswith(("stage1.", "stage2."))}
    assert frozen
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        images = [torch.rand(3, 96, 96, generator=g) for _ in range(2)]
        targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 44.0]]), "labels": torch.tensor([3])}
                   for _ in range(2)]
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        for n, p in model.backbone.named_parameters():
            if n in frozen:
                assert p.grad is None, n
        opt.step()
    after = model.backbone.state_dict()
    for k, v in before.items():
        if k.startswith(("stage1.", "stage2.")) or "running_" in k or k.endswith((".1.weight", ".1.bias")):
            assert torch.equal(after[k], v), k  # frozen stages and frozen BN: unchanged
    assert not torch.equal(after["stage3.0.0.weight"], before["stage3.0.0.weight"])
    assert torch.equal(after["stage1.0.0.weight"], state["stage1.0.0.weight"])


def test_pretrained_regime_trains_end_to_end(tmp_path, tiny_weights, monkeypatch):
    """A real (2-iteration) run in the pretrained regime: stages 1-2 leave it as they came."""
    from taildet.engine import train

    path, info = tiny_weights
    # the data's recipe -> the tiny one
    monkeypatch.setattr(pt.PretrainRecipe, "for_vocabulary", classmethod(lambda cls, vocabulary="default": TINY))
    cache = tmp_path / "pretrained"
    cache.mkdir()
    target = pt.cached_path(cache, TINY)
    target.write_bytes(path.read_bytes())
    target.with_name(target.name + ".json").write_text(json.dumps(info))
    cfg = apply_overrides(_demo_cfg(), [
        f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", "data.synthetic.scale=0.05",
        "train.iterations=2", "train.warmup_iters=1", "data.batch_size=2", "train.device=cpu",
        "eval.enabled=false", *PRETRAINED_REGIME_OVERRIDES])
    out = train(cfg, progress=False)
    ckpt = torch.load(out["checkpoint"], map_location="cpu", weights_only=False)["model"]
    state = torch.load(path, weights_only=True)
    for k, v in state.items():
        if k.startswith(("stage1.", "stage2.")) and not k.endswith("num_batches_tracked"):
            assert torch.equal(ckpt[f"backbone.{k}"], v), k
    assert not torch.equal(ckpt["backbone.stage4.1.0.weight"], state["stage4.1.0.weight"])


def test_cli_pretrain_backbone(tmp_path, capsys, monkeypatch):
    from taildet.cli import main

    out = tmp_path / "w.pth"
    args = ["pretrain-backbone", str(out), "--seed", "3", "--per-class", "1", "--epochs", "1",
            "--heldout-per-class", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "held-out top-1" in text and "chance 2.1 %" in text and out.is_file()
    monkeypatch.setattr(pt, "pretrain_backbone", lambda *a, **k: pytest.fail("must reuse"))
    assert main(args) == 0
    assert "reused" in capsys.readouterr().out
    assert main(["pretrain-backbone", str(out), "--per-class", "0"]) == 2
    assert "per_class" in capsys.readouterr().err


# ----------------------------------------------------------------------------- larger vocabulary


def test_lvis_vocabulary_design_follows_lvis_group_shares():
    from taildet.data.synthetic import VOCABULARIES, design_counts, frequency_group

    vocab = VOCABULARIES["lvis"]
    assert vocab.num_classes == 150
    for seed in (0, 1):
        d = design_counts(seed, 1.0, "lvis")
        assert [x["id"] for x in d] == list(range(1, 151))
        groups = {g: sum(x["frequency"] == g for x in d) for g in "rcf"}
        assert groups == {"r": 42, "c": 57, "f": 51}
        # the LVIS v1 shares, 337 / 461 / 405 of 1,203, to within one class
        for g, lvis in (("r", 337), ("c", 461), ("f", 405)):
            assert abs(groups[g] - 150 * lvis / 1203) < 1
        assert all(frequency_group(x["train_images"]) == x["frequency"] for x in d)
        for shape in vocab.shapes:
            row = {x["frequency"] for x in d if x["shape"] == shape}
            assert {"f", "r"} <= row
        for colour in vocab.colours:
            col = {x["frequency"] for x in d if x["colour"] == colour}
            assert col == {"f", "c", "r"}
    assert design_counts(0, 1.0) == design_counts(0, 1.0, "default")  # the default is unchanged
    with pytest.raises(ConfigError, match="vocabulary"):
        design_counts(0, 1.0, "coco")


def test_lvis_vocabulary_dataset_and_config(tmp_path):
    from taildet.data.synthetic import make_dataset

    info = make_dataset(tmp_path / "d", seed=0, scale=0.02, progress=False, num_workers=1, vocabulary="lvis")
    assert info["num_classes"] == 150 and not info["reused"]
    gt = json.load(open(info["train_json"]))
    assert len(gt["categories"]) == 150 and {c["frequency"] for c in gt["categories"]} == {"r", "c", "f"}
    names = {c["name"] for c in gt["categories"]}
    assert {"olive_hexagon", "pink_pentagon", "red_circle"} <= names
    meta = json.load(open(tmp_path / "d" / "meta.json"))
    assert meta["vocabulary"] == "lvis"
    assert make_dataset(tmp_path / "d", seed=0, scale=0.02, progress=False, vocabulary="lvis")["reused"]
    # the default vocabulary does not reuse the lvis directory (and its record has no vocabulary key)
    other = make_dataset(tmp_path / "d", seed=0, scale=0.02, progress=False, num_workers=1)
    assert not other["reused"] and other["num_classes"] == 48
    assert "vocabulary" not in json.load(open(tmp_path / "d" / "meta.json"))

    cfg = apply_overrides(_demo_cfg(), ["data.synthetic.vocabulary=lvis", "data.synthetic.scale=0.25"])
    assert cfg.data.synthetic.vocabulary == "lvis"
    assert _demo_cfg().data.synthetic.vocabulary == "default"
    with pytest.raises(ConfigError, match="data.synthetic.vocabulary: expected one of default, lvis"):
        apply_overrides(_demo_cfg(), ["data.synthetic.vocabulary=coco"])


def test_lvis_vocabulary_balanced_crops_and_recipe():
    crops = make_balanced_crops(0, 1, vocabulary="lvis")
    assert crops["num_classes"] == 150 and np.bincount(crops["labels"]).tolist() == [1] * 150
    r = PretrainRecipe.for_vocabulary("lvis")
    assert (r.per_class, r.heldout_per_class, r.vocabulary) == (64, 16, "lvis")
    assert r.digest() != PretrainRecipe().digest()
    assert PretrainRecipe.for_vocabulary() == PretrainRecipe()
    with pytest.raises(ConfigError, match="vocabulary"):
        PretrainRecipe(vocabulary="coco")


@pytest.mark.parametrize("regime", ["scratch", "pretrained", "lvis150", "lvis150_pretrained"])
def test_regimes_apply_to_every_tiny_demo_recipe(regime):
    import glob

    from taildet.engine.pretrain import REGIMES

    r = REGIMES[regime]
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "demo_*.yaml"))):
        cfg = apply_overrides(load_config(path), list(r.all_overrides()))
        assert cfg.data.synthetic.vocabulary == r.vocabulary and cfg.data.synthetic.scale == r.scale
        pretrained = cfg.model.kwargs.get("backbone_weights") == "synthetic-pretrained"
        assert pretrained == regime.endswith("pretrained"), path
