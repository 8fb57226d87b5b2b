"""Numeric tests of the basic two-stage losses (softmax CE, sigmoid BCE) and the loss table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from taildet.errors import ConfigError
from taildet.losses import LOSSES, SigmoidBCELoss, SoftmaxCrossEntropyLoss, build_loss

C = 5


def _batch(n: int = 12, k: int = C + 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, requires_grad=True)
    labels = torch.randint(0, C + 1, (n,), generator=g)
    labels[:3] = C  # some background for sure
    return logits, labels


def test_softmax_ce_equals_cross_entropy():
    loss = SoftmaxCrossEntropyLoss(C)
    assert loss.num_outputs() == C + 1 and loss.has_background
    logits, labels = _batch()
    out = loss(logits, labels)
    torch.testing.assert_close(out, F.cross_entropy(logits, labels))
    out.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_softmax_ce_weighted_is_weighted_sum_over_num_rois():
    loss = SoftmaxCrossEntropyLoss(C)
    logits, labels = _batch()
    w = torch.rand(labels.shape[0])
    expected = (F.cross_entropy(logits, labels, reduction="none") * w).sum() / labels.shape[0]
    torch.testing.assert_close(loss(logits, labels, w), expected)
    torch.testing.assert_close(loss(logits, labels, torch.ones_like(w)), F.cross_entropy(logits, labels))


def test_softmax_scores_drop_background():
    loss = SoftmaxCrossEntropyLoss(C)
    logits, _ = _batch()
    s = loss.scores(logits)
    assert s.shape == (logits.shape[0], C)
    torch.testing.assert_close(s, torch.softmax(logits, -1)[:, :C])


def test_sigmoid_bce_equals_bce_with_logits_sum_over_n():
    loss = SigmoidBCELoss(C)
    assert loss.num_outputs() == C and not loss.has_background
    logits, labels = _batch(k=C)
    onehot = torch.zeros(labels.shape[0], C)
    fg = labels < C
    onehot[fg, labels[fg]] = 1.0
    expected = F.binary_cross_entropy_with_logits(logits, onehot, reduction="sum") / labels.shape[0]
    torch.testing.assert_close(loss(logits, labels), expected)
    w = torch.rand(labels.shape[0])
    expected_w = (F.binary_cross_entropy_with_logits(logits, onehot, reduction="none") * w[:, None]).sum() / len(w)
    torch.testing.assert_close(loss(logits, labels, w), expected_w)


def test_sigmoid_bce_scores_and_bias_prior():
    loss = SigmoidBCELoss(C)
    logits, _ = _batch(k=C)
    s = loss.scores(logits)
    assert s.shape == (logits.shape[0], C)
    torch.testing.assert_close(s, torch.sigmoid(logits))
    bias = torch.empty(C)
    loss.init_bias(bias)
    torch.testing.assert_close(torch.sigmoid(bias), torch.full((C,), 0.01))
    assert math.isclose(bias[0].item(), -math.log(99.0), rel_tol=1e-6)


def test_empty_batch_gives_zero_connected_loss():
    for loss, k in ((SoftmaxCrossEntropyLoss(C), C + 1), (SigmoidBCELoss(C), C)):
        logits = torch.zeros(0, k, requires_grad=True)
        out = loss(logits, torch.zeros(0, dtype=torch.int64))
        assert out.item() == 0.0
        out.backward()


def test_wrong_width_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        SoftmaxCrossEntropyLoss(C)(torch.zeros(4, C), torch.zeros(4, dtype=torch.int64))


def test_loss_table_and_build_loss():
    assert isinstance(LOSSES, dict)
    assert {"softmax_ce", "sigmoid_bce", "sigmoid_focal"} <= set(LOSSES)
    assert isinstance(build_loss("softmax_ce", C), SoftmaxCrossEntropyLoss)
    bce = build_loss("sigmoid_bce", C, prior=0.001)
    assert isinstance(bce, SigmoidBCELoss) and bce.prior == 0.001
    with pytest.raises(ConfigError, match="softmax_ce"):
        build_loss("no_such_loss", C)
    with pytest.raises(ConfigError, match="priorr"):
        build_loss("sigmoid_bce", C, priorr=0.1)


def test_sigmoid_focal_entry_is_lazy():
    pytest.importorskip("taildet.losses.focal")
    loss = build_loss("sigmoid_focal", C)
    assert loss.num_classes == C
