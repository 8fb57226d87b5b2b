"""Fixes of the bad-input audit that are not a rejection (so not in the exit-status-2 corpus):
nothing of an earlier run is lost, 16-bit PNGs are scaled rather than clipped, truncated images
are found, ``1e-3`` is a number; plus the limits of the new checks (what stays accepted) and the
real command line's stderr."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taildet.errors import ConfigError, DataError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_spec = importlib.util.spec_from_file_location("bad_input_corpus", Path(__file__).with_name("bad_input_corpus.py"))
corpus = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bad_input_corpus", corpus)
_spec.loader.exec_module(corpus)

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_new_run_sets_the_whole_earlier_run_aside(tmp_path):
    """A new run in a directory holding an earlier run keeps all of it (config, metrics,
    checkpoints) in superseded-<time>/, byte for byte; before, config.yaml was overwritten and
    metrics.jsonl deleted."""
    from taildet.cli import main

    root = corpus.make_base(tmp_path / "w")
    run = root / "run"
    before = {p.name: _digest(p) for p in run.iterdir()}
    assert main(["train", str(corpus.write_config(root)), "--opts", "eval.enabled=false"]) == 0
    aside = [p for p in run.iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1
    assert {p.name: _digest(p) for p in aside[0].iterdir()} == before
    assert (run / "model_final.pth").exists() and (run / "config.yaml").read_text() != ""
    assert _digest(run / "config.yaml") != before["config.yaml"]


def test_rerun_and_resume_from_the_runs_own_config(tmp_path):
    """The run's own config.yaml may be the config of a resume (the README's advice) and of a
    new run (its earlier files are set aside, not overwritten): not a "writes over its input"
    error."""
    from taildet.cli import main

    root = corpus.make_base(tmp_path / "w")
    assert main(["train", str(corpus.write_config(root)), "--opts", "eval.enabled=false"]) == 0
    own = root / "run" / "config.yaml"
    assert main(["train", str(own), "--resume", "--opts", "eval.enabled=false"]) == 0
    assert main(["train", str(own), "--opts", "eval.enabled=false"]) == 0


def _lvis_one_image(tmp_path: Path, name: str, width: int = 8, height: int = 6) -> Path:
    gt = {"images": [{"id": 1, "width": width, "height": height, "file_name": name}],
          "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16}]}
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(gt))
    return p


def test_16_bit_png_is_scaled_to_8_bit_not_clipped(tmp_path):
    from taildet.data import load_lvis

    values = (np.arange(48, dtype=np.uint32).reshape(6, 8) * 1365).astype(np.uint16)  # 0 .. 64155
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image, _ = load_lvis(_lvis_one_image(tmp_path, "deep.png"), tmp_path)[0]
    expected = np.round(values.astype(np.float64) * 255 / 65535) / 255
    assert image.shape == (3, 6, 8)
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-6)
    assert float(image.max()) < 1.0  # clipping made every value above 255 white


def test_float_image_is_a_clear_error(tmp_path):
    from taildet.data import load_lvis

    Image.fromarray(np.zeros((6, 8), np.float32)).save(tmp_path / "float.tif")
    ds = load_lvis(_lvis_one_image(tmp_path, "float.tif"), tmp_path)
    with pytest.raises(DataError, match=r"float\.tif: image id 1: floating-point image \(mode F\)"):
        ds[0]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_check_images_decodes_and_finds_a_truncated_image(tmp_path, fmt):
    """PIL's verify() passes a JPEG cut short in its scan data (it reads no pixels); decoding
    fails. (A cut PNG fails verify()'s checksums too: checked here so it stays found.)"""
    from taildet.data import load_lvis

    rng = np.random.default_rng(0)
    name = f"cut.{fmt.lower()}"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "whole", format=fmt)
    data = (tmp_path / "whole").read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=rf"1 of 1 image files are missing or unreadable: .*{name} \(image id 1, "
                                        r"unreadable"):
        load_lvis(_lvis_one_image(tmp_path, name, 64, 64), tmp_path, check_images=True)
    os.replace(tmp_path / "whole", tmp_path / name)
    load_lvis(_lvis_one_image(tmp_path, name, 64, 64), tmp_path, check_images=True)  # the whole file passes


def test_exponent_without_a_dot_is_a_number(tmp_path):
    """PyYAML alone reads ``1e-3`` as the string "1e-3"; taildet reads it as YAML 1.2 does."""
    from taildet.config import apply_overrides, load_config

    p = tmp_path / "c.yaml"
    p.write_text("data: {synthetic: {seed: 0}}\ntrain:\n  iterations: 2\n  lr: 1e-3\n  weight_decay: 5E-5\n"
                 "model:\n  loss: seesaw\n  loss_kwargs: {eps: 1e-2}\n")
    cfg = load_config(p)
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 5e-5
    assert cfg.model.kwargs["loss_kwargs"] == {"eps": 0.01}
    assert apply_overrides(cfg, ["train.lr=2e-4"]).train.lr == 2e-4
    assert apply_overrides(cfg, ["output_dir=run1e3"]).output_dir == "run1e3"  # not a number: a string


@pytest.mark.parametrize("key, value", [
    ("anchor_sizes", [[32, 64]]), ("anchor_sizes", None), ("aspect_ratios", [0.5, 1.0, 2.0]),
    ("aspect_ratios", [[1.0], [0.5, 2.0]]), ("rpn_pre_nms_top_n_train", 600), ("representation_size", 256),
    ("image_mean", [0.5, 0.5, 0.5]), ("fpn", True), ("mask_layers", [64, 64]), ("head_norm", "gn"),
])
def test_builder_kwargs_of_the_right_type_pass(key, value):
    from taildet.config import config_from_dict

    raw = {"model": {key: value}, "train": {"iterations": 1}, "data": {"synthetic": {"seed": 0}}}
    assert config_from_dict(raw).model.kwargs[key] == value


@pytest.mark.parametrize("key, value, message", [
    ("anchor_sizes", [32, 64], "one list of anchor sizes per feature level"),
    ("anchor_sizes", [[32, -1]], "level 0: item 1: expected an integer >= 1"),
    ("aspect_ratios", [0.5, "wide"], "item 1: expected a positive number"),
    ("rpn_post_nms_top_n_test", 0, "expected an integer >= 1"),
    ("image_std", [1, 1], "3 positive numbers"),
    ("class_agnostic_box_reg", "yes", "expected true or false"),
])
def test_builder_kwargs_of_the_wrong_type_name_the_key(key, value, message):
    from taildet.config import config_from_dict

    raw = {"model": {key: value}, "train": {"iterations": 1}, "data": {"synthetic": {"seed": 0}}}
    with pytest.raises(ConfigError, match=rf"model\.{key}: .*{message}"):
        config_from_dict(raw)


def test_id_and_box_limits_keep_real_data():
    """2**53 - 1 is still an id; a GT box sticking out of its image by less than the image's size
    (rounding, crops) is still evaluated; a box without image size only fails when absurd."""
    from taildet.data.lvis import MAX_SAFE_ID, id_problem
    from taildet.evaluation.lvis_eval import _box_problem

    assert id_problem(MAX_SAFE_ID, "image") is None and id_problem(-MAX_SAFE_ID, "image") is None
    assert "outside the supported range" in id_problem(MAX_SAFE_ID + 1, "image")
    im = {"id": 3, "width": 100, "height": 50}
    assert _box_problem([-5.0, -2.0, 104.0, 53.0], im) is None
    assert "far outside image id 3" in _box_problem([10.0, 10.0, 1e308, 5.0], im)
    assert "far outside" in _box_problem([250.0, 10.0, 5.0, 5.0], im)
    assert _box_problem([1e5, 1e5, 10.0, 10.0], {"id": 4}) is None
    assert "beyond" in _box_problem([1.0, 1.0, 1e300, 1.0], {"id": 4})


def test_the_real_command_line_prints_one_line(tmp_path):
    """As a user runs it (its own process: logging, warnings and progress bars as they are)."""
    root = corpus.make_base(tmp_path / "w")
    case = corpus.CASES["train_area_negative"](root)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "taildet", *case.argv], capture_output=True, text=True, env=env,
                          timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("taildet train: error: ") and "train_area.json" in lines[0]


def test_inference_with_no_proposal_at_all_returns_no_detection():
    """A badly trained (finite) model whose RPN keeps no proposal in a batch made inference fail
    with a reshape error inside torch (seen at the largest allowed lr); it detects nothing."""
    import torch

    from taildet.models import build_model

    kwargs = {k: v for k, v in corpus.MODEL.items() if k != "arch"}
    model = build_model("faster_rcnn", 5, **kwargs).eval()
    rh = model.roi_heads
    cls, reg = rh.box_predictor(torch.zeros(0, kwargs["representation_size"]))
    boxes, scores, labels = rh.postprocess_detections(cls, reg, [torch.zeros(0, 4), torch.zeros(0, 4)],
                                                      [(96, 96), (96, 96)])
    assert [b.shape for b in boxes] == [(0, 4), (0, 4)] and [s.numel() for s in scores] == [0, 0]


def test_eval_writes_where_output_dir_says(tmp_path):
    """``taildet eval --output-dir D`` wrote into the checkpoint's folder and ignored D."""
    from taildet.cli import main

    root = corpus.make_base(tmp_path / "w")
    before = sorted(p.name for p in (root / "ckpt").iterdir())
    assert main(["eval", str(corpus.write_config(root)), str(corpus.checkpoint(root)),
                 "--output-dir", str(root / "ev")]) == 0
    assert (root / "ev" / "metrics.json").exists() and (root / "ev" / "results_bbox.json").exists()
    assert sorted(p.name for p in (root / "ckpt").iterdir()) == before


@pytest.mark.parametrize("edit", [{"weight_decay": 1e308}, {"gamma": 1e308, "steps": [1], "iterations": 3, "lr": 1.0}])
def test_an_optimizer_step_that_overflows_is_the_divergence_stop(tmp_path, capsys, edit):
    """A step size float32 cannot hold (weight_decay, or an lr the schedule's gamma blows up) was
    a RuntimeError traceback from inside torch.optim; it is the divergence stop: exit status 3,
    one line naming the cause."""
    import logging

    from taildet.cli import main

    root = corpus.make_base(tmp_path / "w")
    logger = logging.getLogger("taildet")
    saved = list(logger.handlers)
    for h in saved:
        logger.removeHandler(h)
    logger.addHandler(logging.NullHandler())  # the start-up INFO lines are not the point here
    try:
        capsys.readouterr()
        rc = main(["train", str(corpus.write_config(root, edit=lambda c: c["train"].update(edit)))])
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
        for h in saved:
            logger.addHandler(h)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("taildet train: error:")]
    assert rc == 3 and len(err) == 1
    assert "the optimizer step overflowed" in err[0] and "Lower train.lr, train.weight_decay" in err[0]
