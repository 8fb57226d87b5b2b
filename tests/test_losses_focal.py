"""Numeric tests of the sigmoid focal loss against torchvision's reference implementation."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from taildet.losses.base import prior_bias
from taildet.losses.focal import SigmoidFocalLoss, dense_targets, focal_loss

C = 5


def _inputs(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, C, generator=g) * 3
    labels = torch.randint(-1, C + 1, (n,), generator=g)  # -1 ignored, C negative
    labels[0], labels[1], labels[2] = 0, C, -1
    return logits, labels


def _reference(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    valid = labels >= 0
    onehot = torch.zeros(int(valid.sum()), C)
    pos = labels[valid] < C
    onehot[pos.nonzero().squeeze(1), labels[valid][pos]] = 1.0
    num_pos = max(1, int(((labels >= 0) & (labels < C)).sum()))
    return sigmoid_focal_loss(logits[valid], onehot, alpha=alpha, gamma=gamma, reduction="sum") / num_pos


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 1.0), (-1.0, 2.0), (0.25, 0.0)])
def test_pure_function_matches_torchvision(alpha: float, gamma: float) -> None:
    logits = torch.randn(30, C) * 4
    targets = (torch.rand(30, C) > 0.7).float()
    ours = focal_loss(logits, targets, alpha, gamma)
    ref = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    torch.testing.assert_close(ours, ref)


def test_loss_equals_torchvision_sum_over_num_pos() -> None:
    logits, labels = _inputs()
    loss = SigmoidFocalLoss(C)
    torch.testing.assert_close(loss(logits, labels), _reference(logits, labels))
    # explicit normalizer is used as given (clamped to >= 1)
    ref_sum = _reference(logits, labels) * max(1, int(((labels >= 0) & (labels < C)).sum()))
    torch.testing.assert_close(loss(logits, labels, normalizer=7.0), ref_sum / 7.0)
    torch.testing.assert_close(loss(logits, labels, normalizer=torch.tensor(0.0)), ref_sum)


def test_custom_alpha_gamma_match_reference() -> None:
    logits, labels = _inputs(seed=3)
    loss = SigmoidFocalLoss(C, alpha=0.4, gamma=1.5)
    torch.testing.assert_close(loss(logits, labels), _reference(logits, labels, 0.4, 1.5))


def test_ignored_anchors_contribute_nothing() -> None:
    logits, labels = _inputs()
    loss = SigmoidFocalLoss(C)
    base = loss(logits, labels)
    changed = logits.clone()
    changed[labels == -1] = torch.randn(int((labels == -1).sum()), C) * 50
    torch.testing.assert_close(loss(changed, labels), base)
    x = logits.clone().requires_grad_(True)
    loss(x, labels).backward()
    assert torch.all(x.grad[labels == -1] == 0)
    assert torch.any(x.grad[labels >= 0] != 0)


def test_no_positive_normalizer_is_one() -> None:
    logits = torch.randn(10, C)
    labels = torch.full((10,), C)
    ref = sigmoid_focal_loss(logits, torch.zeros(10, C), reduction="sum")
    torch.testing.assert_close(SigmoidFocalLoss(C)(logits, labels), ref)


def test_all_ignored_gives_zero_with_grad() -> None:
    x = torch.randn(4, C, requires_grad=True)
    out = SigmoidFocalLoss(C)(x, torch.full((4,), -1))
    assert out.item() == 0.0
    out.backward()
    assert torch.all(x.grad == 0)


def test_saturated_logits_finite_loss_and_grad() -> None:
    x = torch.tensor([[100.0, -100.0, 100.0, -100.0, 0.0]] * 4, requires_grad=True)
    labels = torch.tensor([0, 1, C, -1])
    out = SigmoidFocalLoss(C)(x, labels)
    out.backward()
    assert torch.isfinite(out)
    assert torch.isfinite(x.grad).all()
    # a confidently wrong positive (x=-100 for its class) has a large but finite loss
    assert out.item() > 10


def test_interface_members() -> None:
    loss = SigmoidFocalLoss(C, prior=0.02)
    assert loss.kind == "one_stage" and loss.has_background is False
    assert loss.num_outputs() == C
    x = torch.randn(3, C)
    torch.testing.assert_close(loss.scores(x), torch.sigmoid(x))
    b = torch.zeros(C)
    loss.init_bias(b)
    torch.testing.assert_close(torch.sigmoid(b), torch.full((C,), 0.02))
    assert b[0].item() == pytest.approx(prior_bias(0.02))


def test_dense_targets() -> None:
    labels = torch.tensor([2, C, -1, 0])
    valid, t = dense_targets(labels, C, torch.float32)
    assert valid.tolist() == [True, True, False, True]
    assert t.shape == (3, C)
    assert t[0].tolist() == [0, 0, 1, 0, 0] and t[1].sum() == 0 and t[2, 0] == 1


def test_bad_inputs_raise() -> None:
    loss = SigmoidFocalLoss(C)
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        loss(torch.randn(3, C + 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        loss(torch.randn(3, C), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        SigmoidFocalLoss(C, prior=0.0)


def test_build_loss_name_maps_here() -> None:
    from taildet.losses import build_loss

    loss = build_loss("sigmoid_focal", C, gamma=1.0)
    assert isinstance(loss, SigmoidFocalLoss) and loss.gamma == 1.0
