"""taildet.ops.efl_kernel: the fast path of EFL / EQFL / QFL (no target matrix) equals the plainly
written losses (:func:`taildet.losses.equalized_focal.equalized_focal_loss`, QFL on a dense target):
values, gradients and EFL's gradient statistics, on random inputs and the edge cases (ignored
anchors, no positive anchor, every anchor ignored, no anchor at all, every class positive,
saturated logits, half precision); and the per-device selection picks it."""

from __future__ import annotations

import copy

import pytest
import torch

from taildet.losses import equalized_focal as efl_mod
from taildet.losses import quality_focal as qfl_mod
from taildet.losses.equalized_focal import EqualizedFocalLoss, EqualizedQualityFocalLoss
from taildet.losses.quality_focal import QualityFocalLoss
from taildet.ops import efl_kernel, fast_path

C = 5
STATE = ([0.5, 0.0, 3.0, 0.1, 2.0], [1.0, 4.0, 1.0, 10.0, 8.0])  # ratios 0.5, 0, 1, 0.01, 0.25


def _with_state(loss: EqualizedFocalLoss) -> EqualizedFocalLoss:
    loss.pos_grad.copy_(torch.tensor(STATE[0], dtype=loss.pos_grad.dtype))
    loss.neg_grad.copy_(torch.tensor(STATE[1], dtype=loss.neg_grad.dtype))
    loss.pos_neg_ratio.copy_((loss.pos_grad / (loss.neg_grad + 1e-10)).clamp(0, 1))
    return loss


def _losses() -> dict[str, torch.nn.Module]:
    return {
        "efl": _with_state(EqualizedFocalLoss(C)),
        "efl_no_alpha": _with_state(EqualizedFocalLoss(C, gamma_b=1.5, scale=4.0, alpha=-1.0)),
        "eqfl": _with_state(EqualizedQualityFocalLoss(C)),
        "qfl": QualityFocalLoss(C, beta=2.0),
    }


def _random(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n, C, generator=g, dtype=torch.float64)
    labels = torch.randint(-1, C + 1, (n,), generator=g)
    quality = torch.rand(n, generator=g, dtype=torch.float64)
    return logits, labels, quality


def _cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = {f"random_{n}": _random(n, seed) for seed, n in enumerate((1, 7, 64, 301))}
    z, _, q = _random(24, 10)
    out["no_positives"] = (z, torch.tensor([C, -1] * 12), q)
    out["all_ignored"] = (z, torch.full((24,), -1), q)
    out["no_anchors"] = (z[:0], torch.zeros(0, dtype=torch.long), q[:0])
    out["every_class_positive"] = (z[:C], torch.arange(C), q[:C])
    out["only_positives"] = (z, torch.arange(24) % C, q)
    sat = torch.tensor([100.0, -100.0, 100.0, -100.0, 0.0, 100.0], dtype=torch.float64)[:, None].repeat(1, C)
    sat[:, 1::2] *= -1
    out["saturated"] = (sat, torch.tensor([0, 1, C, C, 2, -1]), torch.tensor([0.9, 0.0, 1.0, 0.3, 0.5, 0.2]).double())
    return out


def _run(loss, logits, labels, quality, dtype=torch.float64):
    """Value, gradient (of 2.5 x the loss: a factor downstream) and the loss's state afterwards."""
    x = logits.to(dtype).clone().requires_grad_(True)
    kw = {"quality": quality.to(dtype)} if loss.uses_quality else {}
    value = loss(x, labels, **kw)
    (g,) = torch.autograd.grad(2.5 * value, x)
    return value.detach(), g, {k: v.clone() for k, v in loss.state_dict().items()}


def _both(base, *args, **kwargs):
    fast, plain = copy.deepcopy(base), copy.deepcopy(base)
    with fast_path(True):
        got_fast = _run(fast, *args, **kwargs)
    with fast_path(False):
        got_plain = _run(plain, *args, **kwargs)
    return got_fast, got_plain


@pytest.mark.parametrize("case", sorted(_cases()))
@pytest.mark.parametrize("name", sorted(_losses()))
def test_fast_path_equals_plain_values_gradients_and_state(name, case):
    base = _losses()[name].double()
    (v_fast, g_fast, s_fast), (v_plain, g_plain, s_plain) = _both(base, *_cases()[case])
    msg = f"{name} / {case}"
    assert torch.isfinite(v_fast) and torch.isfinite(g_fast).all(), msg
    torch.testing.assert_close(v_fast, v_plain, rtol=1e-12, atol=1e-12, msg=msg)
    torch.testing.assert_close(g_fast, g_plain, rtol=1e-10, atol=1e-14, msg=msg)
    assert s_fast.keys() == s_plain.keys()
    for key in s_fast:  # EFL / EQFL: G+ / G- / r after the backward
        torch.testing.assert_close(s_fast[key], s_plain[key], rtol=1e-10, atol=1e-14, msg=f"{msg}: {key}")
    if case == "random_301" and name != "qfl":
        assert not torch.equal(s_fast["pos_grad"], base.pos_grad)  # the state did change


@pytest.mark.parametrize("name", sorted(_losses()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_equals_plain_in_lower_precision(name, dtype):
    base = _losses()[name]
    (v_fast, g_fast, s_fast), (v_plain, g_plain, s_plain) = _both(base, *_random(50, 3), dtype=dtype)
    assert v_fast.dtype == v_plain.dtype == torch.float32 and g_fast.dtype == g_plain.dtype == dtype
    torch.testing.assert_close(v_fast, v_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fast.float(), g_plain.float(), rtol=1e-2, atol=1e-5)
    for key in s_fast:
        torch.testing.assert_close(s_fast[key], s_plain[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", sorted(_losses()))
def test_fast_path_equals_plain_without_grad(name):
    loss = _losses()[name].double()
    logits, labels, quality = _random(40, 4)
    kw = {"quality": quality} if loss.uses_quality else {}
    with torch.no_grad():
        with fast_path(True):
            fast = loss(logits, labels, normalizer=6.0, **kw)
        with fast_path(False):
            plain = loss(logits, labels, normalizer=6.0, **kw)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [EqualizedFocalLoss, EqualizedQualityFocalLoss])
def test_fast_path_equals_plain_multilabel(make):
    """Several positives per row: a row with every class positive, a row with none."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(16, C, generator=g, dtype=torch.float64) * 2
    targets = (torch.rand(16, C, generator=g) > 0.6).double()
    targets[0], targets[1] = 1.0, 0.0
    quality = torch.rand(16, C, generator=g, dtype=torch.float64)
    base = _with_state(make(C).double())
    out = {}
    for enabled in (True, False):
        loss = copy.deepcopy(base)
        x = logits.clone().requires_grad_(True)
        with fast_path(enabled):
            value = loss.forward_multilabel(x, targets, quality=quality)
            value.backward()
        out[enabled] = (value.detach(), x.grad, loss.pos_grad.clone(), loss.neg_grad.clone())
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", sorted(_losses()))
def test_the_fast_path_is_selected_per_device(name, monkeypatch):
    """With the fast path on for the CPU the kernel runs; off, the plain form does."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return efl_kernel.sparse_focal_loss_and_grad(*args, **kwargs)

    module = qfl_mod if name == "qfl" else efl_mod
    monkeypatch.setattr(module, "sparse_focal_loss_and_grad", spy)
    loss = _losses()[name].double()
    logits, labels, quality = _random(12, 5)
    with fast_path(False):
        _run(loss, logits, labels, quality)
    assert calls == []
    with fast_path(True):
        _run(loss, logits, labels, quality)
    assert calls == [1]
