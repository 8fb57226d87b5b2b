"""Config loading, validation messages, _base_ inheritance and command-line overrides."""

from __future__ import annotations

import glob
import os
import textwrap

import pytest
import yaml

from taildet.config import DEFAULT_FREEZE, Config, apply_overrides, config_from_dict, load_config, save_config
from taildet.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINIMAL = """
data:
  synthetic: {seed: 0}
train:
  iterations: 10
"""


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def error_of(tmp_path, text, name="bad.yaml") -> str:
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert path in msg, msg
    return msg


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_presets_load(path):
    cfg = load_config(path)
    assert (cfg.train.iterations is None) != (cfg.train.epochs is None)
    # round trip through to_dict
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_demo_preset_values():
    cfg = load_config(os.path.join(REPO, "configs", "demo_faster_tiny_ce.yaml"))
    assert cfg.model.kwargs["min_size"] == cfg.model.kwargs["max_size"] == 96
    assert cfg.data.batch_size == 8 and cfg.train.lr == 0.02 and cfg.train.warmup_iters == 100
    assert cfg.train.schedule == "cosine" and cfg.train.iterations == 1500
    rfs = load_config(os.path.join(REPO, "configs", "demo_faster_tiny_ce_rfs.yaml"))
    assert rfs.data.sampler == "rfs" and rfs.data.rfs_threshold == "auto"
    assert rfs.train.iterations == 1500 and rfs.model.kwargs == cfg.model.kwargs
    lvis = load_config(os.path.join(REPO, "configs", "lvis_mask_r50_ce_2x.yaml"))
    assert lvis.train.epochs == 24 and lvis.data.min_sizes == [640, 672, 704, 736, 768, 800]
    assert lvis.iou_types() == ["bbox", "segm"]


def test_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "a.yaml", MINIMAL))
    assert cfg.train.momentum == 0.9 and cfg.train.weight_decay == 1e-4 and cfg.train.gamma == 0.1
    assert cfg.train.warmup_factor == 0.001 and cfg.train.grad_clip is None
    assert cfg.eval.max_dets == 300 and cfg.eval.score_thresh == 1e-4 and cfg.eval.fixed is False
    assert cfg.data.root == "runs/data/synthetic" and cfg.data.sampler == "random"
    assert DEFAULT_FREEZE == [r"^backbone\.", r"^roi_heads\.box_head\."] and cfg.train.freeze == []
    assert cfg.iou_types() == ["bbox"]


def test_unknown_key_named(tmp_path):
    msg = error_of(tmp_path, MINIMAL + "  lrr: 0.1\n")
    assert "train.lrr" in msg and "unknown key" in msg
    msg = error_of(tmp_path, MINIMAL + "bogus: 1\n")
    assert "bogus" in msg


def test_bad_value_named(tmp_path):
    msg = error_of(tmp_path, MINIMAL + "  lr: -1\n")
    assert "train.lr: expected a positive number, got -1" in msg
    msg = error_of(tmp_path, MINIMAL + "  lr: fast\n")
    assert "train.lr" in msg and "'fast'" in msg
    msg = error_of(tmp_path, MINIMAL.replace("synthetic: {seed: 0}", "synthetic: {seed: 0}\n  batch_size: 2.5"))
    assert "data.batch_size" in msg
    msg = error_of(tmp_path, MINIMAL + "model:\n  min_size: -3\n")
    assert "model.min_size" in msg


def test_bad_enum_named(tmp_path):
    msg = error_of(tmp_path, MINIMAL.replace("synthetic: {seed: 0}", "synthetic: {seed: 0}\n  sampler: foo"))
    assert "data.sampler" in msg and "random" in msg and "'foo'" in msg
    msg = error_of(tmp_path, MINIMAL + "  schedule: linear\n")
    assert "train.schedule" in msg
    msg = error_of(tmp_path, MINIMAL + "model:\n  arch: yolo\n")
    assert "model.arch" in msg


def test_iterations_xor_epochs(tmp_path):
    msg = error_of(tmp_path, MINIMAL + "  epochs: 3\n")
    assert "train.iterations" in msg and "train.epochs" in msg
    msg = error_of(tmp_path, "data:\n  synthetic: {}\n")
    assert "exactly one" in msg


def test_steps_and_rfs_threshold(tmp_path):
    cfg = load_config(write(tmp_path, "a.yaml", MINIMAL + "  steps: [0.5, 0.75]\n"))
    assert cfg.train.steps == [0.5, 0.75]
    msg = error_of(tmp_path, MINIMAL + "  steps: [8, 4]\n")
    assert "train.steps" in msg
    msg = error_of(tmp_path, MINIMAL.replace("synthetic: {seed: 0}", "synthetic: {}\n  rfs_threshold: big"))
    assert "data.rfs_threshold" in msg and "auto" in msg


def test_base_inheritance(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "base.yaml", MINIMAL + "  lr: 0.05\n  schedule: cosine\nmodel:\n  backbone: tiny\n  min_size: 96\n")
    child = write(tmp_path, "sub/child.yaml", """
        _base_: ../base.yaml
        train:
          lr: 0.01
        model:
          loss: sigmoid_bce
        """)
    cfg = load_config(child)
    assert cfg.train.lr == 0.01 and cfg.train.schedule == "cosine" and cfg.train.iterations == 10
    assert cfg.model.kwargs == {"backbone": "tiny", "min_size": 96, "loss": "sigmoid_bce"}
    assert cfg.data.synthetic.seed == 0
    # epochs in the child replaces iterations of the base
    c2 = write(tmp_path, "c2.yaml", "_base_: base.yaml\ntrain:\n  epochs: 2\n")
    cfg2 = load_config(c2)
    assert cfg2.train.epochs == 2 and cfg2.train.iterations is None
    # errors in the child name the child
    bad = write(tmp_path, "c3.yaml", "_base_: base.yaml\ntrain:\n  momentum: 2\n")
    with pytest.raises(ConfigError, match="train.momentum"):
        load_config(bad)
    missing = write(tmp_path, "c4.yaml", "_base_: nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)
    cyc = write(tmp_path, "cyc.yaml", "_base_: cyc.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(cyc)


def test_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "a.yaml", MINIMAL))
    new = apply_overrides(cfg, ["train.lr=0.01", "data.sampler=rfs", "data.rfs_threshold=auto",
                                "model.loss_kwargs={tau: 1.5}", "output_dir=runs/x", "data.synthetic.seed=3",
                                "train.freeze=['^backbone\\.']"])
    assert new.train.lr == 0.01 and new.data.sampler == "rfs" and new.data.rfs_threshold == "auto"
    assert new.model.kwargs["loss_kwargs"] == {"tau": 1.5} and new.output_dir == "runs/x"
    assert new.data.synthetic.seed == 3 and new.train.freeze == ["^backbone\\."]
    assert cfg.train.lr == 0.02  # original untouched
    ep = apply_overrides(cfg, ["train.epochs=2"])
    assert ep.train.epochs == 2 and ep.train.iterations is None
    with pytest.raises(ConfigError, match="train.lr: expected a positive number, got -1"):
        apply_overrides(cfg, ["train.lr=-1"])
    with pytest.raises(ConfigError, match="data.sampler"):
        apply_overrides(cfg, ["data.sampler=nope"])
    with pytest.raises(ConfigError, match="train.nope"):
        apply_overrides(cfg, ["train.nope=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(cfg, ["train.lr"])
    js = apply_overrides(cfg, ["data.train_json=a.json", "data.val_json=b.json"])
    assert js.data.synthetic is None and js.data.train_json == "a.json"


def test_finetune_section(tmp_path):
    """Stage 2 in the normal sections (the former finetune: section: see test_stage2_config.py)."""
    base = write(tmp_path, "base.yaml", MINIMAL)
    cfg = load_config(write(tmp_path, "a.yaml", """_base_: base.yaml
model: {init_from: s1.pth, reset_classifier: true, loss: sigmoid_bce}
train:
  freeze: ['^backbone\\.']
  iterations: 5
  lr: 0.001
"""))
    assert base and (cfg.train.iterations, cfg.train.lr) == (5, 0.001) and cfg.model.reset_classifier
    msg = error_of(tmp_path, MINIMAL.replace("train:", "train:\n  lr: -2"))
    assert "train.lr" in msg
    msg = error_of(tmp_path, MINIMAL.replace("train:", "train:\n  freeze: ['(']"))
    assert "train.freeze" in msg


def test_save_and_reload(tmp_path):
    cfg = load_config(os.path.join(REPO, "configs", "demo_faster_tiny_ce_rfs.yaml"))
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again.to_dict() == cfg.to_dict()
    assert isinstance(yaml.safe_load(out.read_text()), dict)
    assert isinstance(Config().to_dict(), dict)


class _LVISStats:
    """Training-set statistics with LVIS v1's shape (1,203 classes, long-tailed)."""

    def __init__(self, num_classes=1203, num_images=100_000):
        self.num_classes = num_classes
        self.image_counts = [max(1, num_images // (3 * (c + 1))) for c in range(num_classes)]
        self.instance_counts = [3 * n for n in self.image_counts]
        self.image_frequency = [n / num_images for n in self.image_counts]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "lvis_*.yaml"))))
def test_lvis_presets_build_their_detector_and_stage_2_loss(path):
    """Every LVIS preset's model (and its stage-2 loss, if any) builds for 1,203 classes with the
    classifier width its loss needs; the backbone is swapped for the tiny one to keep this fast."""
    from taildet.engine.builders import build_model_from_cfg

    cfg = load_config(path)
    cfg.model.kwargs.update(backbone="tiny", backbone_weights=None)
    stats = _LVISStats()
    stages = [(None, None)]
    if cfg.model.init_from is not None:  # a stage-2 preset: its model.loss is the stage-2 loss
        stages.append((cfg.model.kwargs.get("loss"), cfg.model.kwargs.get("loss_kwargs")))
    for loss, loss_kwargs in stages:
        model = build_model_from_cfg(cfg, 1203, loss=loss, loss_kwargs=loss_kwargs, train_dataset=stats)
        head = getattr(model, "roi_heads", None)
        if head is not None:
            k = model.cls_head.loss.num_outputs()
            for rh in getattr(head, "stages", [head]):  # a cascade: every stage's classifier
                assert rh.box_predictor.cls_score.out_features == k
            assert k in (1203, 1204, 1205)


def test_every_checked_model_key_is_a_builder_option():
    """A key the config validates under ``model:`` must be accepted by at least one builder (no dead
    keys that pass validation and then fail in build_model)."""
    import inspect

    from taildet.config import MODEL_KWARG_CHECKS
    from taildet.models.atss import build_atss
    from taildet.models.one_stage import build_fcos, build_retinanet
    from taildet.models.two_stage import build_faster_rcnn, build_mask_rcnn

    accepted = set()
    for builder in (build_faster_rcnn, build_mask_rcnn, build_retinanet, build_fcos, build_atss):
        accepted |= set(inspect.signature(builder).parameters)
    assert set(MODEL_KWARG_CHECKS) - accepted == set()


def test_duplicate_yaml_keys_and_binary_files_are_errors(tmp_path):
    from taildet.config import load_config
    from taildet.errors import ConfigError

    p = tmp_path / "dup.yaml"
    p.write_text("train:\n  lr: 0.5\n  lr: 0.01\n")
    with pytest.raises(ConfigError, match=r"(?s)dup\.yaml: not valid YAML: .*duplicate key 'lr' \(first at line 2\)"):
        load_config(p)
    b = tmp_path / "bin.yaml"
    b.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match=r"bin\.yaml: not a UTF-8 text file"):
        load_config(b)
