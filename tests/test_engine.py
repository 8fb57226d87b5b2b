"""Training engine on small stand-ins (tiny dataset, tiny torchvision Faster R-CNN), plus one
end-to-end run with taildet's own data and model modules when they are importable."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from taildet.config import config_from_dict
from taildet.engine import (TrainingDivergedError, inference, last_checkpoint, load_checkpoint, lr_factor,
                            train)
from taildet.engine.finetune import finetune
from taildet.engine.schedule import build_scheduler
from taildet.utils.host_sync import checks_deferred, expect

# ----------------------------------------------------------------------------- stand-ins


class TinyDetSet(torch.utils.data.Dataset):
    """``n`` random 96x96 images with 1-2 boxes; random horizontal flip (global torch RNG)."""

    def __init__(self, n=10, num_classes=3, flip=True, seed=0, size=96):
        g = torch.Generator().manual_seed(seed)
        self.num_classes, self.flip, self.size = num_classes, flip, size
        self.cat_ids = [10 * (c + 1) for c in range(num_classes)]
        self.images = [{"id": 100 + i, "width": size, "height": size} for i in range(n)]
        self._imgs = torch.rand(n, 3, size, size, generator=g)
        self._boxes, self._labels = [], []
        for _ in range(n):
            k = int(torch.randint(1, 3, (1,), generator=g))
            xy = torch.rand(k, 2, generator=g) * (size - 40)
            wh = 12 + torch.rand(k, 2, generator=g) * 24
            self._boxes.append(torch.cat([xy, xy + wh], 1))
            self._labels.append(torch.randint(0, num_classes, (k,), generator=g))
        self.labels_per_image = [sorted(set(l.tolist())) for l in self._labels]

    def __len__(self):
        return len(self._imgs)

    def __getitem__(self, i):
        img, boxes = self._imgs[i].clone(), self._boxes[i].clone()
        if self.flip and float(torch.rand(())) < 0.5:
            img = img.flip(-1)
            boxes = torch.stack([self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]], 1)
        s = self.size
        return img, {"boxes": boxes, "labels": self._labels[i].clone(), "image_id": self.images[i]["id"],
                     "orig_size": torch.tensor([s, s]), "size": torch.tensor([s, s])}


class EmaState(nn.Module):
    """A loss-like submodule with a buffer that updates every training step."""

    def __init__(self, num_classes):
        super().__init__()
        self.register_buffer("ema", torch.zeros(num_classes))

    def update(self, labels):
        freq = torch.bincount(labels, minlength=self.ema.numel()).float()
        self.ema.mul_(0.9).add_(0.1 * freq / freq.sum().clamp(min=1))


class TinyFasterRCNN(FasterRCNN):
    def __init__(self, num_classes=3, nan_at=None):
        backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        backbone.out_channels = 16
        super().__init__(
            backbone, num_classes=None, min_size=96, max_size=96,
            rpn_anchor_generator=AnchorGenerator(((16, 32),), ((1.0,),)),
            box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
            box_head=TwoMLPHead(16 * 49, 32), box_predictor=FastRCNNPredictor(32, num_classes + 1),
            rpn_batch_size_per_image=32, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
            rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=32,
            box_detections_per_img=20, box_score_thresh=0.0)
        self.loss_state = EmaState(num_classes)
        self.nan_at, self.calls = nan_at, 0

    def forward(self, images, targets=None):
        out = super().forward(images, targets)
        if self.training:
            self.calls += 1
            self.loss_state.update(torch.cat([t["labels"] for t in targets]))
            if self.nan_at is not None and self.calls >= self.nan_at:
                out["loss_classifier"] = out["loss_classifier"] * float("nan")
        return out


def make_cfg(tmp_path, name="run", **train_kw):
    train = {"iterations": 6, "lr": 0.01, "warmup_iters": 2, "schedule": "cosine", "log_period": 1,
             "checkpoint_period": 3, "device": "cpu", "seed": 0}
    train.update(train_kw)
    return config_from_dict({
        "data": {"synthetic": {"seed": 0}, "batch_size": 2, "num_workers": 0},
        "train": train, "eval": {"enabled": False}, "output_dir": str(tmp_path / name)})


def run(cfg, model=None, dataset=None, **kw):
    torch.manual_seed(0)
    model = model or TinyFasterRCNN()
    return train(cfg, progress=False, model=model, train_dataset=dataset or TinyDetSet(), **kw), model


class Killed(Exception):
    pass


# ----------------------------------------------------------------------------- schedule


def test_schedule_values():
    kw = dict(max_iter=1000, warmup_iters=100, warmup_factor=0.001)
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(0.001)
    assert lr_factor(50, schedule="cosine", **kw) == pytest.approx((0.001 * 0.5 + 0.5) * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    assert lr_factor(500, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(1000, schedule="cosine", **kw) == pytest.approx(0.0)
    step = dict(kw, schedule="step", steps=[0.5, 0.75], gamma=0.1)
    assert lr_factor(499, **step) == 1.0 and lr_factor(500, **step) == pytest.approx(0.1)
    assert lr_factor(750, **step) == pytest.approx(0.01)
    assert lr_factor(300, max_iter=1000, schedule="step", steps=[300, 600]) == pytest.approx(0.1)
    # LambdaLR integration: the lr used at iteration k is base_lr * lr_factor(k)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.02)
    sched = build_scheduler(opt, schedule="cosine", **kw)
    for k in range(120):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * lr_factor(k, schedule="cosine", **kw))
        opt.step()
        sched.step()


# ----------------------------------------------------------------------------- training


def test_train_writes_run_dir(tmp_path):
    out, _ = run(make_cfg(tmp_path, iterations=4, checkpoint_period=None))
    rd = out["run_dir"]
    names = set(os.listdir(rd))
    # epoch = 10 images / batch 2 = 5 iterations > 4: only the final checkpoint
    assert {"config.yaml", "metrics.jsonl", "model_final.pth", "last_checkpoint"} <= names
    lines = [json.loads(l) for l in open(os.path.join(rd, "metrics.jsonl"))]
    assert [l["iteration"] for l in lines] == [1, 2, 3, 4]
    assert {"lr", "loss", "loss_classifier", "loss_box_reg", "time_per_iter"} <= set(lines[0])
    assert lines[0]["lr"] == pytest.approx(0.01 * 0.001)
    ck = load_checkpoint(out["checkpoint"])
    assert ck["iteration"] == 4 and "loss_state.ema" in ck["model"] and ck["config"]["train"]["iterations"] == 4
    assert {"python", "numpy", "torch"} <= set(ck["rng"])
    assert last_checkpoint(rd) == out["checkpoint"]


def _flat_opt(sd):
    return {(k, n): v for k, st in sd["state"].items() for n, v in st.items()}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_identical(tmp_path, workers):
    # one uninterrupted run of 7 iterations; epochs of 5 iterations, checkpoints every 3
    def make_cfg(tmp_path, name, iterations):
        cfg = globals()["make_cfg"](tmp_path, name, iterations=iterations)
        cfg.data.num_workers = workers  # per-sample seeding makes worker processes resume exactly too
        return cfg

    full, model_a = run(make_cfg(tmp_path, "a", iterations=7))
    # the same run killed right after the checkpoint at iteration 3 (mid-epoch) ...
    def kill(it, state):
        if it == 3:
            raise Killed()

    with pytest.raises(Killed):
        run(make_cfg(tmp_path, "b", iterations=7), hooks=[kill])
    rd_b = str(tmp_path / "b")
    assert last_checkpoint(rd_b).endswith("checkpoint_0000003.pth")
    # ... then resumed in a fresh "process" (new model object, other global RNG state)
    torch.manual_seed(1234)
    out_b = train(make_cfg(tmp_path, "b", iterations=7), resume=True, progress=False, model=TinyFasterRCNN(),
                  train_dataset=TinyDetSet())
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(out_b["checkpoint"])
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not torch.equal(a["model"]["loss_state.ema"], torch.zeros(3))
    oa, ob = _flat_opt(a["optimizer"]), _flat_opt(b["optimizer"])
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    assert a["scheduler"] == b["scheduler"] and a["iteration"] == b["iteration"] == 7
    assert a["epoch"] == b["epoch"] == 1 and a["epoch_iteration"] == b["epoch_iteration"] == 2
    la = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    lb = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert [l["iteration"] for l in lb] == list(range(1, 8))
    assert [l["loss"] for l in la] == [l["loss"] for l in lb]


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, iterations=8, checkpoint_period=2)
    with pytest.raises(TrainingDivergedError) as ei:
        run(cfg, model=TinyFasterRCNN(nan_at=4))
    msg = str(ei.value)
    assert "iteration 4" in msg and "loss_classifier=nan" in msg and "loss_box_reg" in msg
    assert ei.value.iteration == 4 and math.isnan(ei.value.loss_terms["loss_classifier"])
    ck = last_checkpoint(cfg.output_dir)
    assert ck.endswith("checkpoint_0000002.pth") and ei.value.checkpoint == ck
    state = load_checkpoint(ck)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not os.path.exists(os.path.join(cfg.output_dir, "model_final.pth"))


def test_epoch_based_run_checkpoints_each_epoch(tmp_path):
    cfg = make_cfg(tmp_path, iterations=None, epochs=2, checkpoint_period=None, grad_clip=5.0)
    out, _ = run(cfg)
    names = sorted(n for n in os.listdir(out["run_dir"]) if n.endswith(".pth"))
    assert names == ["checkpoint_0000005.pth", "model_final.pth"]
    assert load_checkpoint(out["checkpoint"])["epoch"] == 2


def test_finetune_freezes_and_resets(tmp_path):
    stage1, _ = run(make_cfg(tmp_path, "s1", iterations=2))
    s1 = load_checkpoint(stage1["checkpoint"])["model"]
    cfg = config_from_dict({
        "data": {"synthetic": {"seed": 0}, "batch_size": 2, "num_workers": 0},
        "model": {"reset_classifier": True},
        "train": {"iterations": 3, "lr": 0.02, "warmup_iters": 0, "device": "cpu", "log_period": 1,
                  "freeze": [r"^backbone\.", r"^roi_heads\.box_head\."]},
        "eval": {"enabled": False}, "output_dir": str(tmp_path / "s2")})
    model = TinyFasterRCNN()
    out = finetune(cfg, stage1["checkpoint"], progress=False, model=model, train_dataset=TinyDetSet())
    s2 = load_checkpoint(out["checkpoint"])
    assert s2["iteration"] == 3
    for k, v in s1.items():
        if k.startswith("backbone.") or k.startswith("roi_heads.box_head."):
            assert torch.equal(v, s2["model"][k]), k  # frozen (incl. BatchNorm running stats)
    assert not torch.equal(s1["roi_heads.box_predictor.bbox_pred.weight"],
                           s2["model"]["roi_heads.box_predictor.bbox_pred.weight"])
    assert any("cls_score" in k for k in out["not_loaded"])
    total = sum(p.numel() for p in model.parameters())
    assert 0 < out["trainable_parameters"] < total


# ----------------------------------------------------------------------------- inference


class FixedDetector(nn.Module):
    """Eval-mode stand-in: 5 boxes in input coordinates, labels 0..4 % C, optional masks."""

    def __init__(self, masks=False):
        super().__init__()
        self.masks = masks
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images, targets=None):
        outs = []
        for im in images:
            h, w = im.shape[-2:]
            boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]]).repeat(5, 1)
            o = {"boxes": boxes, "labels": torch.tensor([0, 1, 2, 1, 0]),
                 "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.00001])}
            if self.masks:
                m = torch.zeros(5, 1, h, w)
                m[:, :, 20:40, 10:30] = 1.0
                o["masks"] = m
            outs.append(o)
        return outs


class HalfSizeSet(TinyDetSet):
    """Images resized to 48x48 by the 'transforms'; orig_size stays 96x96."""

    def __getitem__(self, i):
        img, t = super().__getitem__(i)
        img = torch.nn.functional.interpolate(img[None], size=(48, 48))[0]
        t["size"] = torch.tensor([48, 48])
        return img, t


@pytest.mark.parametrize("masks", [False, True])
def test_inference_maps_ids_and_boxes(masks):
    ds = HalfSizeSet(n=3, flip=False)
    res = inference(FixedDetector(masks), ds, batch_size=2, device="cpu", max_dets=3, score_thresh=1e-4,
                    progress=False)
    assert len(res) == 9  # 4 pass the threshold, top 3 kept per image
    assert {r["image_id"] for r in res} == {100, 101, 102}
    first = [r for r in res if r["image_id"] == 100]
    assert [r["category_id"] for r in first] == [10, 20, 30]
    assert [r["score"] for r in first] == pytest.approx([0.9, 0.8, 0.7])
    assert first[0]["bbox"] == pytest.approx([20.0, 40.0, 40.0, 40.0])
    if masks:
        import pycocotools.mask as mask_util

        seg = first[0]["segmentation"]
        assert isinstance(seg["counts"], str) and seg["size"] == [96, 96]
        assert mask_util.area(seg) == pytest.approx(40 * 40, rel=0.05)
        json.dumps(res)
    else:
        assert "segmentation" not in first[0]


# ----------------------------------------------------------------------------- end to end (real modules)


def test_end_to_end_tiny_faster_rcnn(tmp_path):
    from taildet.config import apply_overrides, load_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(repo, "configs", "demo_faster_tiny_ce_rfs.yaml"))
    cfg = apply_overrides(cfg, [f"output_dir={tmp_path / 'e2e'}", f"data.root={tmp_path / 'data'}",
                                "data.synthetic.scale=0.1", "train.iterations=3", "train.warmup_iters=1",
                                "train.checkpoint_period=2", "data.batch_size=2", "train.device=cpu",
                                "eval.max_dets=50"])
    out = train(cfg, progress=False)
    assert os.path.isfile(os.path.join(out["run_dir"], "results_bbox.json"))
    metrics = json.load(open(os.path.join(out["run_dir"], "metrics.json")))
    assert "bbox" in metrics and "AP" in metrics["bbox"] and "bbox" in out["metrics"]
    results = json.load(open(os.path.join(out["run_dir"], "results_bbox.json")))
    import taildet.data.lvis as lvis

    val = lvis.load_lvis(cfg.data.root + "/annotations/val.json", cfg.data.root + "/images")
    assert {r["category_id"] for r in results} <= set(val.cat_ids)
    # resume from the final checkpoint: nothing left to train, evaluation only
    out2 = train(cfg, resume=True, progress=False, evaluate=False)
    assert out2["checkpoint"] == out["checkpoint"]


# ----------------------------------------------------------------------------- run directory hygiene


def test_resume_refuses_a_changed_config_and_accepts_logging_changes(tmp_path):
    from taildet.errors import ConfigError

    def kill(it, state):
        if it == 3:
            raise Killed()

    with pytest.raises(Killed):
        run(make_cfg(tmp_path, "r", iterations=6), hooks=[kill])
    with pytest.raises(ConfigError, match=r"different config \(train\.lr: 0\.01 -> 0\.2\)"):
        train(make_cfg(tmp_path, "r", iterations=6, lr=0.2), resume=True, progress=False,
              model=TinyFasterRCNN(), train_dataset=TinyDetSet())
    with pytest.raises(ConfigError, match=r"train\.iterations: 6 -> 9"):
        train(make_cfg(tmp_path, "r", iterations=9), resume=True, progress=False,
              model=TinyFasterRCNN(), train_dataset=TinyDetSet())
    cfg = make_cfg(tmp_path, "r", iterations=6, log_period=2, checkpoint_period=2)  # may change
    out = train(cfg, resume=True, progress=False, model=TinyFasterRCNN(), train_dataset=TinyDetSet())
    assert load_checkpoint(out["checkpoint"])["iteration"] == 6


def test_new_run_sets_an_old_runs_checkpoints_aside_and_temp_files_go(tmp_path):
    out, _ = run(make_cfg(tmp_path, "d", iterations=3))
    rd = out["run_dir"]
    (tmp_path / "d" / ".checkpoint_0000009.pth.abc123.tmp").write_bytes(b"partial")
    # a new run in the same directory, killed before its first checkpoint ...
    def kill(it, state):
        if it == 1:
            raise Killed()

    with pytest.raises(Killed):
        run(make_cfg(tmp_path, "d", iterations=6, lr=0.02), hooks=[kill])
    names = os.listdir(rd)
    assert not any(n.endswith(".tmp") for n in names)
    assert not any(n.startswith("checkpoint_") or n == "model_final.pth" for n in names)
    aside = [n for n in names if n.startswith("superseded-")]
    assert len(aside) == 1 and "model_final.pth" in os.listdir(os.path.join(rd, aside[0]))
    # ... so its --resume starts from scratch instead of continuing the old run's weights
    assert last_checkpoint(rd) is None


class QueuesACheck(TinyFasterRCNN):
    """Queues a loss-style input check (``expect``) in every training forward; it fails from
    forward ``fail_at`` on. Records whether checks were deferred (queued, not read at once)."""

    def __init__(self, fail_at):
        super().__init__()
        self.fail_at, self.deferred = fail_at, []

    def forward(self, images, targets=None):
        out = super().forward(images, targets)
        if self.training:
            self.deferred.append(checks_deferred())
            bad = torch.tensor(self.calls >= self.fail_at)

            def diagnose():
                raise ValueError(f"SomeLoss: labels must be in 0..3, got values in [0, 9] (forward {self.calls})")

            expect(~bad, diagnose)
        return out


def test_trainer_reads_the_losses_queued_checks_once_per_step(tmp_path):
    """The trainer runs the forward inside deferred_checks() (issue 18: no host read inside a loss)
    and reads the queued checks in its one host read of the step: the loss's own error comes out of
    the step whose forward queued it, before its backward, and the last checkpoint stays."""
    cfg = make_cfg(tmp_path, iterations=8, checkpoint_period=2)
    model = QueuesACheck(fail_at=5)
    with pytest.raises(ValueError, match=r"SomeLoss: labels must be in 0\.\.3, got values in \[0, 9\] \(forward 5\)"):
        run(cfg, model=model)
    assert model.deferred == [True] * 5
    assert last_checkpoint(cfg.output_dir).endswith("checkpoint_0000004.pth")
    assert not os.path.exists(os.path.join(cfg.output_dir, "model_final.pth"))
