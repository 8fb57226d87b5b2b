"""Long-tail classification metrics: top-1 overall and on many / medium / few-shot classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from taildet.evaluation import long_tail_accuracy, shot_split

COUNTS = [500, 101, 100, 20, 19, 0]  # many, many, medium, medium, few, few


def test_shot_split_boundaries():
    assert shot_split(COUNTS).tolist() == ["many", "many", "medium", "medium", "few", "few"]


def test_accuracies_by_hand():
    labels = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4, 4, 5])
    pred = torch.tensor([0, 1, 1, 2, 0, 3, 4, 0, 0, 5])
    m = long_tail_accuracy(pred, labels, COUNTS)
    assert m["top1"] == pytest.approx(60.0)
    assert m["many"] == pytest.approx(100 * 2 / 3)   # samples of classes 0, 1: 2 of 3
    assert m["medium"] == pytest.approx(100 * 2 / 3)  # classes 2, 3: 2 of 3
    assert m["few"] == pytest.approx(50.0)            # classes 4, 5: 2 of 4
    per_class = [0.5, 1.0, 0.5, 1.0, 1 / 3, 1.0]
    assert m["mean_class_acc"] == pytest.approx(100 * np.mean(per_class))
    assert m["num_samples"] == 10 and m["num_classes"] == {"many": 2, "medium": 2, "few": 2}
    # scores: top-1 is the argmax; numpy input too
    scores = np.eye(6)[pred.numpy()] * 3.0 - 1.0
    assert long_tail_accuracy(scores, labels.numpy(), COUNTS) == m


def test_empty_split_is_nan_and_bad_input_errors():
    m = long_tail_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1]), COUNTS)
    assert m["many"] == 100.0 and math.isnan(m["medium"]) and math.isnan(m["few"])
    with pytest.raises(ValueError, match="labels must be in 0..5; sample 1 has label 6"):
        long_tail_accuracy(torch.tensor([0, 1]), torch.tensor([0, 6]), COUNTS)
    with pytest.raises(ValueError, match=r"scores must be \[N, C\] = \[2, 6\]"):
        long_tail_accuracy(torch.zeros(2, 5), torch.tensor([0, 1]), COUNTS)
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        long_tail_accuracy(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), COUNTS)
    with pytest.raises(ValueError, match="class 1 has -1"):
        long_tail_accuracy(torch.tensor([0]), torch.tensor([0]), [3, -1])
    with pytest.raises(ValueError, match="integer class indices"):
        long_tail_accuracy(torch.tensor([0.5]), torch.tensor([0]), [3])
