"""taildet.classify: a tiny end-to-end train / eval / resume, cRT, the CLI and config errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml

from taildet.classify.config import classify_config_from_dict, load_classify_config
from taildet.classify.engine import train_classifier
from taildet.classify.models import build_classifier
from taildet.classify.splits import make_split
from taildet.cli import main
from taildet.errors import ConfigError
from helpers import write_separable_images

pytestmark = pytest.mark.usefixtures("one_thread")


class _Stop(Exception):
    """Raised from a training hook to interrupt a run at a chosen iteration (the resume tests)."""


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    src = write_separable_images(d / "src.npz")
    return make_split(str(src), d / "lt", 4, test_per_class=4, val_per_class=2)["manifest"]


def _cfg(manifest, out, **over):
    raw = {"data": {"manifest": manifest, "batch_size": 4, "augment": ["flip"]},
           "model": {"arch": "resnet32", "loss": "balanced_softmax"},
           "train": {"iterations": 6, "lr": 0.05, "warmup_iters": 2, "checkpoint_period": 2, "device": "cpu",
                     "log_period": 1},
           "output_dir": str(out)}
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    return classify_config_from_dict(raw)


def test_train_eval_resume_gives_the_uninterrupted_weights(manifest, tmp_path):
    full = train_classifier(_cfg(manifest, tmp_path / "full"), progress=False)
    m = full["metrics"]
    assert set(m["methods"]) == {"raw", "logit_adjust", "logn", "tau_norm"}
    assert m["train_counts"] == [14, 7, 3]  # n_max 14 at imbalance 4: 14, 14 / 2, 14 / 4
    assert m["methods"]["raw"]["num_samples"] == 12 and len(m["methods"]["raw"]["per_class"]) == 3
    assert os.path.isfile(os.path.join(full["run_dir"], "per_class_accuracy.png"))
    lines = [json.loads(x) for x in open(os.path.join(full["run_dir"], "metrics.jsonl"))]
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4, 5, 6] and "loss_cls" in lines[0]

    def stop(it, state):
        if it == 3:
            raise _Stop

    cfg = _cfg(manifest, tmp_path / "cut")
    with pytest.raises(_Stop):
        train_classifier(cfg, progress=False, hooks=[stop])
    resumed = train_classifier(cfg, resume=True, progress=False)
    a = torch.load(full["checkpoint"], weights_only=False)["model"]
    b = torch.load(resumed["checkpoint"], weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _same(resumed["metrics"]["methods"], m["methods"])
    # eval of the checkpoint alone equals the metrics written after training
    assert main(["classify", "eval", cfg.source or _write(cfg, tmp_path), resumed["checkpoint"],
                 "--output-dir", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert _same(ev["methods"], m["methods"])


def _same(a, b) -> bool:
    """Equal, NaN (a split without classes) equal to NaN."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _write(cfg, tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(p)


def test_crt_freezes_features_and_retrains_the_classifier_balanced(manifest, tmp_path):
    stage1 = train_classifier(_cfg(manifest, tmp_path / "s1", model={"loss": "softmax_ce"}), progress=False,
                              evaluate=False)
    cfg = _cfg(manifest, tmp_path / "crt", model={"loss": "softmax_ce", "stage": "crt",
                                                  "init_from": stage1["checkpoint"]},
               data={"sampler": "class_balanced"})
    seen = []
    out = train_classifier(cfg, progress=False, evaluate=False,
                           hooks=[lambda it, st: seen.append(st["model"].fc.weight.requires_grad)])
    a = torch.load(stage1["checkpoint"], weights_only=False)["model"]
    b = torch.load(out["checkpoint"], weights_only=False)["model"]
    feats = [k for k in a if k.startswith("features.")]
    assert feats and all(torch.equal(a[k], b[k]) for k in feats)  # BN statistics included: eval mode
    assert not torch.equal(a["fc.weight"], b["fc.weight"]) and seen == [True] * 6
    saved = yaml.safe_load(open(os.path.join(out["run_dir"], "config.yaml")))
    assert saved["data"]["sampler"] == "class_balanced" and saved["model"]["stage"] == "crt"


def test_torchvision_classifier_by_name_on_small_inputs():
    model = build_classifier("resnet18", 5).eval()
    assert isinstance(model.fc, torch.nn.Linear) and model.fc.in_features == 512
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 5)
    with pytest.raises(ConfigError, match="neither 'resnet32' nor a torchvision classifier"):
        build_classifier("resnet_nope", 5)


def test_config_errors_name_the_key(tmp_path, manifest):
    with pytest.raises(ConfigError, match=r"model\.loss: expected one of"):
        classify_config_from_dict({"data": {"manifest": manifest}, "model": {"loss": "qfl"}})
    with pytest.raises(ConfigError, match=r"train\.lr"):
        classify_config_from_dict({"data": {"manifest": manifest}, "train": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"data\.manifest: required"):
        classify_config_from_dict({})
    with pytest.raises(ConfigError, match=r"model\.init_from"):
        classify_config_from_dict({"data": {"manifest": manifest}, "model": {"stage": "crt"}})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"data": {"manifest": manifest}, "train": {"epochs": 2}}))
    cfg = load_classify_config(p, ["train.iterations=5", "data.sampler=class_balanced"])
    assert cfg.train.iterations == 5 and cfg.train.epochs is None and cfg.data.sampler == "class_balanced"


@pytest.mark.slow
def test_two_process_gloo_training(manifest, tmp_path):
    """torchrun-style 2-process run: both ranks train (the sampler shards the epoch), rank 0 alone
    writes the checkpoints and metrics."""
    import socket
    import subprocess
    import sys

    cfg = _cfg(manifest, tmp_path / "ddp", train={"iterations": 4, "checkpoint_period": 2, "device": "cpu"})
    path = _write(cfg, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, "-m", "taildet", "classify", "train", path], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            assert p.returncode == 0, out
    finally:
        for q in procs:
            if q.poll() is None:
                q.kill()
                q.wait()
    run = tmp_path / "ddp"
    state = torch.load(run / "model_final.pth", weights_only=False)
    assert state["world_size"] == 2 and state["iteration"] == 4
    assert json.loads((run / "metrics.json").read_text())["methods"]["raw"]["num_samples"] == 12


def test_crt_raises_the_few_shot_class(tmp_path):
    """Constructed problem: 3 classes of 4 x 4 images (brightness by class, noisy), 40 / 8 / 2
    training images. CE never predicts the 2-image class; cRT (frozen features, a classifier
    re-trained with class-balanced sampling) does."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 60)
    images = np.clip(rng.normal(0, 50, (180, 4, 4, 1)) + 60 * labels[:, None, None, None] + 40, 0, 255)
    np.savez(tmp_path / "src.npz", images=images.astype(np.uint8), labels=labels)
    man = make_split(str(tmp_path / "src.npz"), tmp_path / "lt", 20, test_per_class=20, val_per_class=0, n_max=40)
    assert man["counts"] == [40, 8, 2]

    def cfg(out, **over):
        raw = {"data": {"manifest": man["manifest"], "batch_size": 8}, "model": {"loss": "softmax_ce"},
               "train": {"iterations": 20, "lr": 0.05, "warmup_iters": 2, "device": "cpu", "log_period": 5},
               "eval": {"posthoc": []}, "output_dir": str(tmp_path / out)}
        for k, v in over.items():
            raw[k] = {**raw[k], **v}
        return classify_config_from_dict(raw)

    ce = train_classifier(cfg("ce"), progress=False)["metrics"]["methods"]["raw"]
    crt = train_classifier(cfg("crt", model={"stage": "crt", "init_from": str(tmp_path / "ce" / "model_final.pth")},
                               data={"sampler": "class_balanced"}), progress=False)["metrics"]["methods"]["raw"]
    assert ce["per_class"][2] == 0.0 and crt["per_class"][2] >= 50.0
    assert crt["few"] > ce["few"]
