"""docs/ARCHITECTURE.md stays true: its three recipes (add a loss, a detector, a calibration
method) done as it describes them, in-process, and every module path or name it mentions exists."""

from __future__ import annotations

import functools
import importlib
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import SMALL, random_batch
from taildet.calibration import CALIBRATORS, Calibrator, build_calibrator
from taildet.compare.posthoc import posthoc_calibration
from taildet.config import config_from_dict
from taildet.engine.builders import build_model_from_cfg
from taildet.losses import LOSSES
from taildet.losses.base import ClassificationLoss, reduce_loss
from taildet.models import build as model_build
from taildet.models.two_stage import build_faster_rcnn

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
C = 5


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared
    yield
    torch.set_num_threads(n)


def _cfg(**model):
    return config_from_dict({"model": {"backbone": "tiny", "min_size": 96, "max_size": 96, **SMALL, **model},
                             "data": {"synthetic": {}}, "train": {"iterations": 1}})


def _train_step(model):
    model.train()
    images, targets = random_batch(C)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = model(images, targets)
    total = sum(losses.values())
    model.cls_head.before_backward(1.0)
    total.backward()
    opt.step()
    model.cls_head.sync_state()
    return losses


class HalfSoftmaxCE(ClassificationLoss):
    """A new two-stage loss: softmax cross-entropy at half weight, reduced with reduce_loss."""

    def __init__(self, num_classes: int, scale: float = 0.5):
        super().__init__(num_classes)
        self.scale = float(scale)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def update(self, logits, labels, gt_index=None):
        self.steps += 1

    def forward(self, logits, labels, weight=None):
        terms = F.cross_entropy(logits, labels, reduction="none") * self.scale
        return reduce_loss(terms, max(labels.numel(), 1), weight)


def test_add_a_loss(monkeypatch):
    monkeypatch.setitem(LOSSES, "half_ce", HalfSoftmaxCE)
    cfg = _cfg(arch="faster_rcnn", loss="half_ce", loss_kwargs={"scale": 0.5})
    torch.manual_seed(0)
    model = build_model_from_cfg(cfg, C)
    assert isinstance(model.cls_head.loss, HalfSoftmaxCE)
    losses = _train_step(model)
    assert all(torch.isfinite(v) for v in losses.values())
    assert int(model.cls_head.loss.steps) == 1  # the update hook ran
    rec = model.cls_head.record
    assert rec is not None and rec.logits.shape[1] == C + 1
    model.eval()
    with torch.no_grad():
        out = model(random_batch(C)[0])
    assert len(out) == 2


def test_add_a_detector(monkeypatch):
    @functools.wraps(build_faster_rcnn)  # the signature (options) and cls_stage come along
    def build_small_faster(num_classes, **options):
        options.setdefault("representation_size", 16)
        return build_faster_rcnn(num_classes, **options)

    assert build_small_faster.cls_stage == "roi_heads"
    monkeypatch.setitem(model_build.ARCHITECTURES, "small_faster", build_small_faster)
    cfg = _cfg(arch="small_faster", logit_bn=True)
    torch.manual_seed(0)
    model = build_model_from_cfg(cfg, C)
    assert model.cls_head.stage == "roi_heads"
    assert model.roi_heads.box_head.fc6.out_features == SMALL["representation_size"]
    assert all(torch.isfinite(v) for v in _train_step(model).values())


class Temperature(nn.Module):
    """A logit transform: logits / t (background column kept)."""

    def __init__(self, num_outputs: int, t: float):
        super().__init__()
        self.num_outputs, self.background_index, self.t = num_outputs, num_outputs - 1, t

    def forward(self, logits):
        return logits / self.t


class TemperatureScaling(Calibrator):
    """A new post-hoc method with no inputs."""

    def __init__(self, t: float = 2.0):
        super().__init__()
        self.t = float(t)

    def fit(self, head, **inputs):
        return Temperature(head.num_outputs, self.t)


def test_add_a_calibration_method(monkeypatch, tmp_path):
    monkeypatch.setitem(CALIBRATORS, "temperature", TemperatureScaling)
    assert isinstance(build_calibrator("temperature", t=3.0), TemperatureScaling)
    cfg = _cfg(arch="faster_rcnn")
    torch.manual_seed(0)
    model = build_model_from_cfg(cfg, C).eval()
    logits = torch.randn(4, C + 1)
    before = model.cls_head.scores(logits)
    calibrate = posthoc_calibration("temperature", cfg, "unused.pth", tmp_path, t=3.0)
    model = calibrate(model)
    assert isinstance(model.cls_head.logit_transform, Temperature)
    torch.testing.assert_close(model.cls_head.scores(logits), torch.softmax(logits / 3.0, -1)[:, :C])
    assert not torch.allclose(before, model.cls_head.scores(logits))


_BACKTICKED = re.compile(r"`([^`\s]+)`")


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_module_the_doc_names_exists():
    text = DOC.read_text(encoding="utf-8")
    names = [m for m in _BACKTICKED.findall(text) if m.startswith("taildet.")]
    paths = [m for m in _BACKTICKED.findall(text) if m.startswith(("src/", "tests/", "docs/"))]
    assert len(names) > 10 and len(paths) > 3
    missing = [n for n in names if not _resolves(n)] + [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"docs/ARCHITECTURE.md names what does not exist: {missing}"
    for registry in ("LOSSES", "ARCHITECTURES", "CALIBRATORS", "SAMPLERS", "ClassificationLoss",
                     "ClassificationHead", "SampledLogits"):
        assert f"`{registry}`" in text


def test_readme_links_the_doc():
    assert "docs/ARCHITECTURE.md" in (ROOT / "README.md").read_text(encoding="utf-8")
