"""Plain helpers shared by the test files (``from helpers import ...``; tests/ is on pytest's
``pythonpath``). Fixtures are in conftest.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

#: The repository root (benchmarks/ scripts are loaded from it by :func:`load_benchmark`).
ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_separable_images(path: Path, num_classes: int = 3, per_class: int = 20) -> Path:
    """A tiny ``.npz`` image source for taildet.classify (``images`` [N, 4, 4, 1] uint8, ``labels``
    [N]) whose classes are separable by brightness: class c's pixels lie in [90 c, 90 c + 60)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(num_classes), per_class)
    images = (rng.integers(0, 60, (len(labels), 4, 4, 1)) + 90 * labels[:, None, None, None]).astype(np.uint8)
    np.savez(path, images=images, labels=labels)
    return path


#: The vendored LVIS v0.5 val sample (100 images), see tests/data/README.md.
LVIS_VAL_100 = Path(__file__).parent / "data" / "lvis_v0.5_val_100.json"

#: The tiny two-stage detector's RPN / RoI sizes for 96 px images (``build_faster_rcnn(C, **SMALL)``).
SMALL = dict(
    min_size=96,
    max_size=96,
    representation_size=64,
    box_batch_size_per_image=64,
    rpn_pre_nms_top_n_train=300,
    rpn_post_nms_top_n_train=150,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=150,
)


def two_image_batch():
    """Two fixed 96 px images (seed 0), two boxes each, of classes 0, 3 and 4, 1 (needs C >= 5)."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=g) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 40.0, 44.0], [50.0, 20.0, 90.0, 70.0]]), "labels": torch.tensor([0, 3])},
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 60.0], [40.0, 40.0, 80.0, 90.0]]), "labels": torch.tensor([4, 1])},
    ]
    return images, targets


def random_batch(num_classes: int, batch: int = 2, seed: int = 0, size: int = 96):
    """``batch`` random ``size`` px images with 1-3 random boxes each (labels in 0..num_classes-1)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(batch)]
    targets = []
    for i in range(batch):
        n = 1 + i % 3
        xy = torch.randint(0, 50, (n, 2), generator=g).float()
        wh = torch.randint(14, 40, (n, 2), generator=g).float()
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets
