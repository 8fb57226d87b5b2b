"""taildet.classify: every method moves predictions the expected way on a constructed imbalanced
problem, the classification adapters of the losses, and the post-hoc maths by hand."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taildet.classify.losses import CLASSIFY_LOSSES, ClassifierLoss
from taildet.classify.posthoc import choose_tau, logit_adjust, logn, tau_normalized_logits
from taildet.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

COUNTS = [400, 120, 30, 8]          # training images per class (many, many, medium, few)
CENTRES = torch.tensor([[0.0, 0.0], [1.6, 0.0], [0.0, 1.6], [1.6, 1.6]])


class _Stats:
    """The training-set statistics a loss may need (one instance per image)."""

    def __init__(self, counts):
        self.instance_counts = [float(c) for c in counts]
        self.image_counts = self.instance_counts
        self.image_frequency = [c / sum(counts) for c in counts]


def _data(counts, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    return CENTRES[y] + torch.randn(len(y), 2, generator=g), y


def _few_share(name: str, **kw) -> float:
    """Share of balanced test points predicted as the two tail classes by a linear classifier
    trained with loss ``name`` (full batch, Adam, fixed seed)."""
    x, y = _data(COUNTS, 0)
    xt, _ = _data([300] * 4, 1)
    torch.manual_seed(0)
    fc = torch.nn.Linear(2, 4)
    loss = ClassifierLoss(name, 4, kw, _Stats(COUNTS)).train()
    loss.init_bias(fc.bias)
    opt = torch.optim.Adam(fc.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        loss(fc(x), y).backward()
        opt.step()
    with torch.no_grad():
        pred = fc(xt).argmax(1)
    return float((pred >= 2).float().mean())


@functools.lru_cache(maxsize=None)
def _base_share(name: str) -> float:
    return _few_share(name)


@pytest.mark.parametrize("method, kwargs, base", [
    ("balanced_softmax", {}, "softmax_ce"),
    ("seesaw", {}, "softmax_ce"),
    # EQL's rare classes: image frequency below lambda (classes 2 and 3 here: 30 / 558, 8 / 558)
    ("eql", {"lambda_": 0.06}, "sigmoid_bce"),
    ("efl", {}, "sigmoid_focal"),
])
def test_long_tail_loss_raises_tail_predictions(method, kwargs, base):
    m, b = _few_share(method, **kwargs), _base_share(base)
    assert m > b + 0.01, (method, m, base, b)  # at least 12 more of the 1,200 test points


def test_softmax_losses_with_background_equal_plain_cross_entropy():
    z = torch.randn(6, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    ce = ClassifierLoss("softmax_ce", 5)
    assert ce.pad_background and not ce.sigmoid
    assert torch.allclose(ce(z, y), F.cross_entropy(z, y), atol=1e-6)
    bs = ClassifierLoss("balanced_softmax", 5, {}, _Stats([8, 4, 2, 1, 1]))
    assert not bs.pad_background and not bs.sigmoid
    ref = F.cross_entropy(z + torch.log(torch.tensor([8.0, 4, 2, 1, 1])), y)
    assert torch.allclose(bs(z, y), ref, atol=1e-6)
    bce = ClassifierLoss("sigmoid_bce", 5)
    assert bce.sigmoid
    assert torch.allclose(bce(z, y), F.binary_cross_entropy_with_logits(z, F.one_hot(y, 5).float(),
                                                                         reduction="sum") / 6, atol=1e-6)
    assert set(CLASSIFY_LOSSES) >= {"softmax_ce", "balanced_softmax", "sigmoid_focal", "eql", "seesaw", "efl"}
    with pytest.raises(ConfigError, match="qfl.*no classification form"):
        ClassifierLoss("qfl", 5)
    with pytest.raises(ConfigError, match="instance_counts"):
        ClassifierLoss("balanced_softmax", 5)


def _imbalanced_logits():
    """Logits of a CE classifier biased to the head: the head column is larger on every sample."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(50)
    z = torch.randn(200, 4, generator=g) + 2.0 * F.one_hot(y, 4) + torch.tensor([2.5, 1.5, 0.0, -1.0])
    return z, y


def test_logit_adjustment_and_logn_by_hand_and_direction():
    z, _ = _imbalanced_logits()
    counts = [100, 40, 10, 2]
    pi = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    la = logit_adjust(z.double(), counts, tau=1.0)
    assert torch.allclose(la, z.double() - torch.log(pi))
    train_z = z[:120]
    mu, var = train_z.double().mean(0), train_z.double().var(0, unbiased=False)
    ln = logn(z, train_z)
    assert torch.allclose(ln.double(), (z.double() - mu) / torch.sqrt(var + 1e-11), atol=1e-5)
    few = lambda s: float((s.argmax(1) >= 2).float().mean())  # noqa: E731
    assert few(la) > few(z) + 0.1 and few(ln) > few(z) + 0.1


def test_tau_normalisation_by_hand_and_tau_choice():
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])   # the head class's weight norm is 3x the tail's
    f = torch.tensor([[1.0, 2.0], [2.0, 1.0], [1.0, 1.5]])
    assert torch.allclose(tau_normalized_logits(f, w, 0.0), f @ w.t())
    assert torch.allclose(tau_normalized_logits(f, w, 1.0), f @ torch.tensor([[1.0, 0], [0, 1.0]]))
    half = tau_normalized_logits(f, w, 0.5)
    assert torch.allclose(half, f @ torch.tensor([[3 / math.sqrt(3), 0], [0, 1.0]]).t())
    # raw predicts class 0 for [1, 1.5]; tau = 1 predicts class 1 (the tail gains)
    assert f[2] @ w[0] > f[2] @ w[1] and int(tau_normalized_logits(f[2:], w, 1.0).argmax()) == 1
    # labels [1, 0, 1]. tau 0: all predicted 0 (class accuracies 100, 0: mean 50); tau 0.5 (w_0 -> 1.73):
    # [1.73, 2] -> 1, [3.46, 1] -> 0, [1.73, 1.5] -> 0 (100, 50: 75); tau 1: 1, 0, 1 (100)
    tau, curve = choose_tau(f, w, np.array([1, 0, 1]), [0.0, 0.5, 1.0])
    assert tau == 1.0 and curve == [pytest.approx(50.0), pytest.approx(75.0), pytest.approx(100.0)]


@pytest.mark.parametrize("name", CLASSIFY_LOSSES)
def test_every_classification_loss_trains_a_step(name):
    """Each loss name builds, gives a finite loss with a gradient on the C logits only, and its
    scores are [N, C] probabilities (sigmoid for the sigmoid losses)."""
    z = torch.randn(8, 4, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 0])
    loss = ClassifierLoss(name, 4, {}, _Stats(COUNTS)).train()
    value = loss(z, y)
    value.backward()
    assert torch.isfinite(value) and z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    s = loss.scores(z.detach())
    assert s.shape == (8, 4) and bool(((s >= 0) & (s <= 1)).all())
    assert torch.allclose(s.sum(1), torch.ones(8)) != loss.sigmoid
