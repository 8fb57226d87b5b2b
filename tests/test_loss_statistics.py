"""The engine fills a loss's training-set statistics (counts, frequencies) from the dataset."""

from __future__ import annotations

import os

import pytest
import torch

from taildet.config import apply_overrides, load_config
from taildet.engine import evaluate_checkpoint, train
from taildet.errors import ConfigError
from taildet.losses import dataset_statistics_needed, fill_dataset_statistics

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Stats:
    instance_counts = [5, 1, 2]
    image_counts = [4, 1, 2]
    image_frequency = [0.4, 0.1, 0.2]


def test_needed_statistics_by_name():
    assert dataset_statistics_needed("softmax_ce") == ()
    assert dataset_statistics_needed("balanced_softmax") == ("instance_counts",)
    assert dataset_statistics_needed("balanced_sigmoid") == ("image_frequency",)
    assert dataset_statistics_needed("eql") == ("image_frequency",)


def test_declared_statistics_are_constructor_keywords_of_every_loss_class():
    """``needs`` is data on the class; it names exactly the constructor's statistic keywords."""
    import inspect

    from taildet.losses import DATASET_STATISTICS, LOSSES
    from taildet.losses.base import ClassificationLoss

    for name, factory in LOSSES.items():
        if not inspect.isclass(factory):
            continue
        params = inspect.signature(factory).parameters
        assert factory.needs == tuple(k for k in DATASET_STATISTICS if k in params), name
    with pytest.raises(TypeError, match="not in DATASET_STATISTICS"):
        type("Bad", (ClassificationLoss,), {"needs": ("class_prior",)})


def test_reduce_loss_weights_rows_and_divides_by_the_normalizer():
    from taildet.losses.base import reduce_loss

    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert float(reduce_loss(values, 3)) == pytest.approx(7.0)
    w = torch.tensor([1.0, 0.0, 0.5])
    assert float(reduce_loss(values, 2.0, w)) == pytest.approx((3.0 + 5.5) / 2.0)
    assert float(reduce_loss(values[:, 0], torch.tensor(2.0), w)) == pytest.approx(3.5 / 2.0)


def test_fill_keeps_explicit_values_and_errors_without_dataset():
    filled = fill_dataset_statistics("balanced_softmax", None, Stats())
    assert filled["instance_counts"] == [5.0, 1.0, 2.0]
    explicit = fill_dataset_statistics("balanced_softmax", {"instance_counts": [1, 1, 1]}, Stats())
    assert explicit["instance_counts"] == [1, 1, 1]
    with pytest.raises(ConfigError, match="needs instance_counts"):
        fill_dataset_statistics("balanced_softmax", None, None)


def test_train_and_eval_with_dataset_statistics_loss(tmp_path):
    cfg = load_config(os.path.join(REPO, "configs", "demo_faster_tiny_ce.yaml"))
    cfg = apply_overrides(cfg, [f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
                                "data.synthetic.scale=0.05", "train.iterations=2", "train.warmup_iters=1",
                                "data.batch_size=2", "train.device=cpu", "eval.max_dets=20",
                                "model.loss=balanced_softmax"])
    out = train(cfg, progress=False)
    state = torch.load(out["checkpoint"], map_location="cpu", weights_only=False)["model"]
    counts = [v for k, v in state.items() if k.endswith("instance_counts") or k.endswith("counts")]
    assert counts, "the loss's counts travel in the checkpoint"
    metrics = evaluate_checkpoint(cfg, out["checkpoint"])
    assert 0.0 <= metrics["bbox"]["AP"] <= 1.0
