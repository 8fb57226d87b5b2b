"""Federated loss (taildet.losses.federated): the loss against a transcription of its definition
(Zhou et al. 2021; detectron2's sigmoid_cross_entropy_loss with use_fed_loss), the class-set
rule, gradients, and the training set's frequencies reaching it through the engine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from taildet.errors import ConfigError
from taildet.losses import LOSSES, FederatedLoss, build_loss
from taildet.losses.federated import federated_classes

REPO = Path(__file__).resolve().parents[1]
C = 8
FREQ = [0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.0]


def _transcription(z: torch.Tensor, labels: torch.Tensor, S: list[int], w=None) -> torch.Tensor:
    """The definition, element by element: for each RoI i and each class j of the step's set S,
    BCE(z_ij, t_ij) = -[t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))] with t_ij = [y_i == j]
    (background rows: t = 0 everywhere), weighted by w_i, summed, divided by the number of RoIs."""
    n = z.shape[0]
    total = z.new_zeros(())
    for i in range(n):
        for j in S:
            t = 1.0 if int(labels[i]) == j else 0.0
            p = 1.0 / (1.0 + torch.exp(-z[i, j]))
            term = -(t * torch.log(p) + (1.0 - t) * torch.log(1.0 - p))
            total = total + (1.0 if w is None else w[i]) * term
    return total / n


def _inputs(seed: int = 0, n: int = 7):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, C, generator=g, dtype=torch.float64) * 2.0
    labels = torch.tensor([1, 3, C, 1, C, 6, C][:n])
    return z, labels


def test_registered_with_prior_bias_and_sigmoid_scores():
    assert LOSSES["federated"] is FederatedLoss
    loss = build_loss("federated", C, image_frequency=FREQ)
    assert (loss.num_outputs(), loss.num_fed_classes, loss.power, loss.has_background) == (C, 50, 0.5, False)
    bias = torch.empty(C)
    loss.init_bias(bias)
    torch.testing.assert_close(torch.sigmoid(bias), torch.full((C,), 0.01))


def test_loss_equals_the_transcription_on_random_input():
    z, labels = _inputs()
    w = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, 1.5, 0.3], dtype=torch.float64)
    loss = FederatedLoss(C, image_frequency=FREQ, num_fed_classes=5)
    torch.manual_seed(11)
    value = loss(z, labels)
    S = loss.last_classes.tolist()
    torch.manual_seed(11)  # the draw is reproducible from torch's RNG state
    assert federated_classes(labels, C, loss.sample_weight(), 5).tolist() == S
    assert len(S) == 5 and set(S) >= {1, 3, 6}
    torch.testing.assert_close(value, _transcription(z, labels, S))
    torch.manual_seed(11)
    torch.testing.assert_close(loss(z, labels, w), _transcription(z, labels, S, w))
    # every class in the set: the plain sigmoid BCE over all C columns
    everything = FederatedLoss(C, image_frequency=FREQ, num_fed_classes=C)
    torch.testing.assert_close(everything(z, labels), _transcription(z, labels, list(range(C - 1))))
    assert sorted(everything.last_classes.tolist()) == list(range(C - 1))  # f = 0: never drawn


def test_gradient_matches_autograd_of_the_transcription_and_is_zero_outside_the_set():
    z, labels = _inputs(seed=3)
    a = z.clone().requires_grad_(True)
    b = z.clone().requires_grad_(True)
    loss = FederatedLoss(C, image_frequency=FREQ, num_fed_classes=4)
    torch.manual_seed(5)
    loss(a, labels).backward()
    S = loss.last_classes.tolist()
    _transcription(b, labels, S).backward()
    torch.testing.assert_close(a.grad, b.grad)
    outside = [j for j in range(C) if j not in S]
    assert outside and bool((a.grad[:, outside] == 0).all())
    assert bool((a.grad[:, S].abs().sum(0) > 0).all())


def test_class_set_rule():
    weight = torch.tensor(FREQ, dtype=torch.float64).sqrt()
    labels = torch.tensor([2, 5, C, C, 2])
    for seed in range(20):
        torch.manual_seed(seed)
        S = federated_classes(labels, C, weight, 4).tolist()
        assert S[:2] == [2, 5]                     # GT classes always in, first
        assert C not in S and 7 not in S           # background never; f = 0 never drawn
        assert len(S) == len(set(S)) == 4          # without replacement, max(num_fed, #GT)
    # more GT classes than num_fed: exactly the GT classes
    many = torch.tensor([0, 1, 2, 3, 4, C])
    assert federated_classes(many, C, weight, 3).tolist() == [0, 1, 2, 3, 4]
    # fewer drawable classes (f > 0) than needed: all of them, no error
    sparse = torch.tensor([0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.1]).sqrt()
    assert sorted(federated_classes(torch.tensor([0, C]), C, sparse, 6).tolist()) == [0, 2, 7]
    # no GT class at all (every RoI background): a draw of num_fed classes
    assert len(federated_classes(torch.tensor([C, C]), C, weight, 3)) == 3


def test_draws_follow_frequency_to_the_power_half():
    """One draw per call (GT {0}, num_fed 2): class j != 0 comes out with probability
    f_j^0.5 / sum_{k != 0} f_k^0.5; tolerance 5 standard errors of a proportion over M draws."""
    f = torch.tensor(FREQ, dtype=torch.float64)
    loss = FederatedLoss(C, image_frequency=FREQ, num_fed_classes=2, generator=torch.Generator().manual_seed(0))
    weight = loss.sample_weight()
    torch.testing.assert_close(weight, f.sqrt().float().double(), rtol=1e-6, atol=0)
    M = 3000
    counts = torch.zeros(C)
    for _ in range(M):
        counts[federated_classes(torch.tensor([0]), C, weight, 2, loss.generator)[1]] += 1
    p = f.sqrt().clone()
    p[0] = 0.0
    p = p / p.sum()
    for j in range(C):
        tol = 5.0 * math.sqrt(max(float(p[j] * (1 - p[j])), 1e-12) / M) + 1e-12
        assert abs(float(counts[j]) / M - float(p[j])) <= tol, (j, float(counts[j]) / M, float(p[j]))
    assert counts[0] == 0 and counts[7] == 0


def test_bad_arguments_name_the_loss():
    with pytest.raises(ConfigError, match="num_fed_classes"):
        build_loss("federated", C, image_frequency=FREQ, num_fed_classes=0)
    with pytest.raises(ConfigError, match="image_frequency"):
        build_loss("federated", C, image_frequency=[2.0] * C)
    with pytest.raises(ConfigError, match="image_frequency"):
        build_loss("federated", C)
    with pytest.raises(ValueError, match="FederatedLoss"):
        FederatedLoss(C, image_frequency=FREQ)(torch.zeros(3, C + 1), torch.tensor([0, 1, C]))


class _OtherStats:
    """A training set with other image frequencies (only the rarest class drawable)."""

    def __init__(self, num_classes: int):
        self.image_frequency = [0.0] * (num_classes - 1) + [0.5]
        self.image_counts = [0] * num_classes
        self.instance_counts = [0] * num_classes


def test_config_through_the_engine_hands_the_training_frequencies_to_the_loss(tmp_path):
    """configs/demo_faster_tiny_fed.yaml built by the engine: the loss is the federated loss with
    the config's num_fed_classes and this training set's image frequencies; another training set's
    frequencies change the drawn classes."""
    from taildet.config import apply_overrides, load_config
    from taildet.engine.builders import build_datasets, build_model_from_cfg

    cfg = load_config(REPO / "configs" / "demo_faster_tiny_fed.yaml")
    cfg = apply_overrides(cfg, [f"data.root={tmp_path / 'data'}", "data.synthetic.scale=0.05",
                                f"output_dir={tmp_path / 'run'}", "model.representation_size=16",
                                "train.device=cpu"])
    train_set, _, _ = build_datasets(cfg)
    model = build_model_from_cfg(cfg, train_set.num_classes, train_dataset=train_set)
    loss = model.cls_head.loss
    assert isinstance(loss, FederatedLoss) and loss.num_fed_classes == 16
    n = len(train_set)
    expected = torch.tensor(train_set.image_counts, dtype=torch.float64) / n
    torch.testing.assert_close(loss.image_frequency.double(), expected, rtol=1e-6, atol=0)
    other = build_model_from_cfg(cfg, train_set.num_classes, train_dataset=_OtherStats(train_set.num_classes))
    K = train_set.num_classes
    z, labels = torch.zeros(4, K), torch.tensor([0, 0, K, K])
    torch.manual_seed(0)
    loss(z, labels)
    torch.manual_seed(0)
    other.cls_head.loss(z, labels)
    assert other.cls_head.loss.last_classes.tolist() == [0, K - 1]
    assert len(loss.last_classes) == 16 and loss.last_classes.tolist() != [0, K - 1]
