"""Equalized Focal Loss / Equalized Quality Focal Loss / Quality Focal Loss: values against direct
transcriptions of the equations (float64), the analytic gradient against autograd, the state
(accumulated gradients and ratio) against hand computations, and the equivalences
(all ratios 1 => focal loss / QFL)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from taildet.losses import build_loss
from taildet.losses.equalized_focal import (
    EqualizedFocalLoss,
    EqualizedQualityFocalLoss,
    equalized_focal_loss_grad,
    equalized_focal_loss_terms,
    equalized_quality_focal_loss_grad,
    equalized_quality_focal_loss_terms,
    set_grad_scale,
)
from taildet.losses.focal import SigmoidFocalLoss
from taildet.losses.quality_focal import QualityFocalLoss, quality_focal_loss

C = 5


def _inputs(n: int = 40, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, C, generator=g) * 3).to(dtype)
    labels = torch.randint(-1, C + 1, (n,), generator=g)
    labels[0], labels[1], labels[2], labels[3] = 0, C, -1, 2
    quality = torch.rand(n, generator=g).to(dtype)
    return logits, labels, quality


def _onehot(labels: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    valid = labels >= 0
    t = torch.zeros(int(valid.sum()), C + 1, dtype=dtype)
    t[torch.arange(t.shape[0]), labels[valid]] = 1.0
    return t[:, :C]


def _num_pos(labels: torch.Tensor) -> int:
    return max(1, int(((labels >= 0) & (labels < C)).sum()))


def _set_state(loss: EqualizedFocalLoss, pos, neg) -> None:
    loss.pos_grad.copy_(torch.as_tensor(pos, dtype=loss.pos_grad.dtype))
    loss.neg_grad.copy_(torch.as_tensor(neg, dtype=loss.neg_grad.dtype))
    loss.pos_neg_ratio.copy_((loss.pos_grad / (loss.neg_grad + 1e-10)).clamp(0, 1))


STATE = ([0.5, 0.0, 3.0, 0.1, 2.0], [1.0, 4.0, 1.0, 10.0, 8.0])  # ratios 0.5, 0, 1, 0.01, 0.25


def _naive_efl(x, labels, ratio, gamma_b=2.0, s=8.0, alpha=0.25, normalizer=None):
    """Per-element transcription of the equations (python floats, no vectorisation)."""
    total = 0.0
    for i in range(x.shape[0]):
        if labels[i] < 0:
            continue
        for j in range(C):
            t = 1.0 if labels[i] == j else 0.0
            xv = float(x[i, j])
            p = 1.0 / (1.0 + math.exp(-xv))
            p_t = p * t + (1 - p) * (1 - t)
            a_t = alpha * t + (1 - alpha) * (1 - t)
            gam = gamma_b + s * (1 - float(ratio[j]))
            w = gam / gamma_b
            total += a_t * w * (1 - p_t) ** gam * -math.log(p_t)
    return total / (normalizer or _num_pos(labels))


def _naive_eqfl(x, labels, quality, ratio, gamma_b=2.0, s=8.0):
    total = 0.0
    for i in range(x.shape[0]):
        if labels[i] < 0:
            continue
        for j in range(C):
            q = float(quality[i]) if labels[i] == j else 0.0
            p = 1.0 / (1.0 + math.exp(-float(x[i, j])))
            gam = gamma_b + s * (1 - float(ratio[j]))
            bce = -(q * math.log(p) + (1 - q) * math.log(1 - p))
            total += gam / gamma_b * abs(q - p) ** gam * bce
    return total / _num_pos(labels)


def _autograd_efl(x, labels, ratio, alpha=0.25, gamma_b=2.0, s=8.0, normalizer=None):
    """The same loss written naively with torch ops (autograd gives the reference gradient)."""
    valid = labels >= 0
    t = _onehot(labels, x.dtype)
    xv = x[valid]
    p = torch.sigmoid(xv)
    p_t = p * t + (1 - p) * (1 - t)
    a_t = alpha * t + (1 - alpha) * (1 - t)
    gam = gamma_b + s * (1 - ratio.to(x.dtype))
    ce = torch.nn.functional.binary_cross_entropy_with_logits(xv, t, reduction="none")
    return (a_t * (gam / gamma_b) * (1 - p_t) ** gam * ce).sum() / (normalizer or _num_pos(labels))


# ----------------------------------------------------------------------------------------------
# equivalences


def test_all_ratios_one_is_focal_loss_value_and_gradient() -> None:
    logits, labels, _ = _inputs(dtype=torch.float32)
    efl, ours = EqualizedFocalLoss(C), SigmoidFocalLoss(C)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    x3 = logits.clone().requires_grad_(True)
    a = efl(x1, labels)
    b = ours(x2, labels)
    valid = labels >= 0
    c = sigmoid_focal_loss(x3[valid], _onehot(labels, torch.float32), reduction="sum") / _num_pos(labels)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    a.backward(), b.backward(), c.backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(x1.grad, x3.grad)


def test_eqfl_with_ratios_one_is_qfl() -> None:
    logits, labels, quality = _inputs()
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    a = EqualizedQualityFocalLoss(C).double()(x1, labels, quality=quality)
    b = QualityFocalLoss(C)(x2, labels, quality=quality)
    torch.testing.assert_close(a, b)
    a.backward(), b.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_build_by_name() -> None:
    for name, cls in [("efl", EqualizedFocalLoss), ("equalized_focal", EqualizedFocalLoss),
                      ("eqfl", EqualizedQualityFocalLoss), ("equalized_quality_focal", EqualizedQualityFocalLoss),
                      ("qfl", QualityFocalLoss), ("quality_focal", QualityFocalLoss)]:
        loss = build_loss(name, C)
        assert type(loss) is cls and loss.kind == "one_stage" and loss.num_outputs() == C
    assert build_loss("eqfl", C).uses_quality and not build_loss("efl", C).uses_quality
    bias = torch.zeros(C)
    build_loss("efl", C).init_bias(bias)
    torch.testing.assert_close(torch.sigmoid(bias), torch.full((C,), 0.001))


# ----------------------------------------------------------------------------------------------
# values and gradients (float64)


def test_efl_value_equals_transcription() -> None:
    logits, labels, _ = _inputs()
    loss = EqualizedFocalLoss(C).double()
    _set_state(loss, *STATE)
    ratio = loss.pos_neg_ratio.clone()
    got = loss(logits, labels)
    torch.testing.assert_close(got.item(), _naive_efl(logits, labels, ratio), rtol=1e-12, atol=1e-12)
    # explicit normalizer, other hyper-parameters, no alpha
    loss2 = EqualizedFocalLoss(C, gamma_b=1.5, scale=4.0, alpha=-1).double()
    _set_state(loss2, *STATE)
    got = loss2(logits, labels, normalizer=7.0)
    ref = _naive_efl(logits, labels, ratio, gamma_b=1.5, s=4.0, alpha=-1, normalizer=7.0)
    # alpha < 0 means no alpha_t at all (both branches 1): transcription with alpha_t = 1
    ref_no_alpha = 0.0
    for i in range(logits.shape[0]):
        for j in range(C):
            if labels[i] < 0:
                continue
            t = 1.0 if labels[i] == j else 0.0
            p = 1 / (1 + math.exp(-float(logits[i, j])))
            p_t = p * t + (1 - p) * (1 - t)
            gam = 1.5 + 4.0 * (1 - float(ratio[j]))
            ref_no_alpha += gam / 1.5 * (1 - p_t) ** gam * -math.log(p_t)
    torch.testing.assert_close(got.item(), ref_no_alpha / 7.0, rtol=1e-12, atol=1e-12)
    assert ref != ref_no_alpha


def test_eqfl_value_equals_transcription() -> None:
    logits, labels, quality = _inputs(seed=1)
    loss = EqualizedQualityFocalLoss(C).double()
    _set_state(loss, *STATE)
    got = loss(logits, labels, quality=quality)
    ref = _naive_eqfl(logits, labels, quality, loss.pos_neg_ratio)
    torch.testing.assert_close(got.item(), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="quality"):
        loss(logits, labels)


def test_pure_functions_match_autograd() -> None:
    logits, labels, quality = _inputs(seed=2)
    gamma = torch.tensor([2.0, 10.0, 2.0, 9.92, 8.0], dtype=torch.float64)
    weight = gamma / 2.0
    t = (torch.rand(40, C, generator=torch.Generator().manual_seed(5)) > 0.7).double()
    x = logits.clone().requires_grad_(True)
    terms = equalized_focal_loss_terms(x, t, gamma, weight, 0.25)
    ref = sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, reduction="none")
    torch.testing.assert_close(terms[:, [0, 2]], ref[:, [0, 2]])  # w = 1, gamma = 2 columns
    (auto,) = torch.autograd.grad(terms.sum(), x)
    torch.testing.assert_close(equalized_focal_loss_grad(logits, t, gamma, weight, 0.25), auto)
    soft = t * quality[:, None]
    terms = equalized_quality_focal_loss_terms(x, soft, gamma, weight)
    torch.testing.assert_close(terms[:, 0], quality_focal_loss(logits, soft)[:, 0])
    (auto,) = torch.autograd.grad(terms.sum(), x)
    torch.testing.assert_close(equalized_quality_focal_loss_grad(logits, soft, gamma, weight), auto)


def test_accumulated_gradient_equals_autograd_gradient() -> None:
    """The backward's g (alpha_t, w_j, normalizer, an upstream factor of 3) is autograd's."""
    logits, labels, _ = _inputs(seed=3)
    loss = EqualizedFocalLoss(C).double()
    _set_state(loss, *STATE)
    ratio = loss.pos_neg_ratio.clone()
    before_pos, before_neg = loss.pos_grad.clone(), loss.neg_grad.clone()
    x = logits.clone().requires_grad_(True)
    (3.0 * loss(x, labels, normalizer=6.0)).backward()

    xr = logits.clone().requires_grad_(True)
    (3.0 * _autograd_efl(xr, labels, ratio, normalizer=6.0)).backward()
    torch.testing.assert_close(x.grad, xr.grad)
    valid = labels >= 0
    g, t = xr.grad[valid].abs(), _onehot(labels)
    torch.testing.assert_close(loss.pos_grad - before_pos, (g * t).sum(0))
    torch.testing.assert_close(loss.neg_grad - before_neg, (g * (1 - t)).sum(0))
    torch.testing.assert_close(loss.pos_neg_ratio, (loss.pos_grad / (loss.neg_grad + 1e-10)).clamp(0, 1))


def test_eqfl_accumulated_gradient_equals_autograd_gradient() -> None:
    logits, labels, quality = _inputs(seed=4)
    loss = EqualizedQualityFocalLoss(C).double()
    _set_state(loss, *STATE)
    gamma = 2.0 + 8.0 * (1 - loss.pos_neg_ratio)
    x = logits.clone().requires_grad_(True)
    loss(x, labels, quality=quality).backward()
    valid = labels >= 0
    t = _onehot(labels)
    xr = logits.clone()[valid].requires_grad_(True)
    q = t * quality[valid][:, None]
    p = torch.sigmoid(xr)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(xr, q, reduction="none")
    ((gamma / 2.0) * (q - p).abs() ** gamma * bce).sum().div(_num_pos(labels)).backward()
    torch.testing.assert_close(x.grad[valid], xr.grad)
    torch.testing.assert_close(loss.pos_grad - torch.tensor(STATE[0], dtype=torch.float64), (xr.grad.abs() * t).sum(0))


def test_gradcheck_float64() -> None:
    logits, labels, quality = _inputs(n=12, seed=5)
    for loss, kw in [(EqualizedFocalLoss(C), {}), (EqualizedQualityFocalLoss(C), {"quality": quality})]:
        loss = loss.double()
        _set_state(loss, *STATE)
        loss.update_state = False  # gradcheck runs the backward many times
        x = logits.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda z: loss(z, labels, **kw), (x,))  # noqa: B023 (called within this iteration only)
        torch.testing.assert_close(loss.pos_grad, torch.tensor(STATE[0], dtype=torch.float64))


def test_ignored_anchors_contribute_nothing() -> None:
    logits, labels, quality = _inputs(seed=6)
    for make, kw in [(EqualizedFocalLoss, {}), (EqualizedQualityFocalLoss, {"quality": quality})]:
        a, b = make(C).double(), make(C).double()
        _set_state(a, *STATE), _set_state(b, *STATE)
        x = logits.clone().requires_grad_(True)
        la = a(x, labels, **kw)
        la.backward()
        valid = labels >= 0
        xb = logits[valid].clone().requires_grad_(True)
        kwb = {"quality": quality[valid]} if kw else {}
        lb = b(xb, labels[valid], **kwb)
        lb.backward()
        torch.testing.assert_close(la, lb)
        assert torch.all(x.grad[~valid] == 0)
        torch.testing.assert_close(x.grad[valid], xb.grad)
        torch.testing.assert_close(a.pos_grad, b.pos_grad)
        torch.testing.assert_close(a.neg_grad, b.neg_grad)
        # changing an ignored anchor's logits changes nothing (same state as before the backward)
        c = make(C).double()
        _set_state(c, *STATE)
        x2 = logits.clone()
        x2[~valid] = 1e3
        torch.testing.assert_close(c(x2, labels, **kw), la.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturated_logits_are_finite(dtype) -> None:
    labels = torch.tensor([0, 1, C, C, 2, -1])
    logits = torch.tensor([100.0, -100.0, 100.0, -100.0, 0.0, 100.0], dtype=dtype)[:, None].repeat(1, C)
    logits[:, 1::2] *= -1
    quality = torch.tensor([0.9, 0.0, 1.0, 0.3, 0.5, 0.2], dtype=dtype)
    for loss, kw in [(EqualizedFocalLoss(C), {}), (EqualizedQualityFocalLoss(C), {"quality": quality})]:
        loss = loss.to(dtype)
        _set_state(loss, *STATE)
        x = logits.clone().requires_grad_(True)
        out = loss(x, labels, **kw)
        out.backward()
        assert torch.isfinite(out) and out > 0
        assert torch.isfinite(x.grad).all()
        assert torch.isfinite(loss.pos_grad).all() and torch.isfinite(loss.neg_grad).all()
        assert torch.isfinite(loss.pos_neg_ratio).all()


# ----------------------------------------------------------------------------------------------
# state


def test_state_over_three_iterations_matches_hand_computation() -> None:
    """Iteration t's forward uses the ratio left by iteration t-1's backward."""
    loss = EqualizedFocalLoss(C).double()
    gen = torch.Generator().manual_seed(7)
    pos, neg = torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    ratio = torch.ones(C, dtype=torch.float64)
    for it in range(3):
        logits = torch.randn(30, C, generator=gen, dtype=torch.float64) * 2
        labels = torch.randint(0, C + 1, (30,), generator=gen)
        labels[it] = 1
        torch.testing.assert_close(loss.pos_neg_ratio, ratio)
        x = logits.clone().requires_grad_(True)
        value = loss(x, labels)
        torch.testing.assert_close(value.item(), _naive_efl(logits, labels, ratio), rtol=1e-12, atol=1e-12)
        value.backward()
        # hand: g from the naive autograd loss with the ratio *before* this iteration
        xr = logits.clone().requires_grad_(True)
        _autograd_efl(xr, labels, ratio).backward()
        t = _onehot(labels)
        pos = pos + (xr.grad.abs() * t).sum(0)
        neg = neg + (xr.grad.abs() * (1 - t)).sum(0)
        ratio = (pos / (neg + 1e-10)).clamp(0, 1)
        torch.testing.assert_close(loss.pos_grad, pos)
        torch.testing.assert_close(loss.neg_grad, neg)
    assert not torch.allclose(ratio, torch.ones(C, dtype=torch.float64))
    # a forward alone (no backward) changes nothing; so does no_grad
    before = loss.state_dict()
    loss(torch.randn(5, C, dtype=torch.float64, requires_grad=True), torch.tensor([0, 1, C, C, 2]))
    with torch.no_grad():
        loss(torch.randn(5, C, dtype=torch.float64), torch.tensor([0, 1, C, C, 2]))
    for k, v in loss.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_state_dict_round_trip() -> None:
    logits, labels, _ = _inputs(dtype=torch.float32)
    loss = EqualizedFocalLoss(C)
    x = logits.clone().requires_grad_(True)
    loss(x, labels).backward()
    assert set(loss.state_dict()) == {"pos_grad", "neg_grad", "pos_neg_ratio"}
    assert loss.pos_grad.dtype == torch.float32
    buf = io.BytesIO()
    torch.save(loss.state_dict(), buf)
    buf.seek(0)
    other = EqualizedFocalLoss(C)
    other.load_state_dict(torch.load(buf, weights_only=True))
    for name in ("pos_grad", "neg_grad", "pos_neg_ratio"):
        torch.testing.assert_close(getattr(other, name), getattr(loss, name))
    torch.testing.assert_close(other(logits, labels), loss(logits, labels))


def test_half_logits_accumulate_in_float32() -> None:
    logits, labels, _ = _inputs(dtype=torch.float32)
    ref = EqualizedFocalLoss(C)
    x = logits.clone().requires_grad_(True)
    ref(x, labels).backward()
    loss = EqualizedFocalLoss(C)
    xh = logits.to(torch.bfloat16).requires_grad_(True)
    out = loss(xh, labels)
    assert out.dtype == torch.float32
    out.backward()
    assert xh.grad.dtype == torch.bfloat16 and loss.pos_grad.dtype == torch.float32
    torch.testing.assert_close(loss.pos_neg_ratio, ref.pos_neg_ratio, rtol=0.05, atol=1e-3)


def test_state_stays_float32_under_half() -> None:
    loss = EqualizedFocalLoss(C)
    model = torch.nn.Sequential(torch.nn.Linear(4, C), loss).half()
    assert model[0].weight.dtype == torch.float16
    assert {b.dtype for b in loss.buffers()} == {torch.float32}
    assert EqualizedFocalLoss(C).double().pos_grad.dtype == torch.float64


def test_nonfinite_upstream_gradient_leaves_state_unchanged() -> None:
    logits, labels, _ = _inputs(dtype=torch.float32)
    loss = EqualizedFocalLoss(C)
    _set_state(loss, *STATE)
    x = logits.clone().requires_grad_(True)
    (loss(x, labels) * float("inf")).backward()
    torch.testing.assert_close(loss.pos_grad, torch.tensor(STATE[0]))
    torch.testing.assert_close(loss.neg_grad, torch.tensor(STATE[1]))


def test_grad_scaler_scale_is_divided_out() -> None:
    """Under GradScaler the backward sees S x the true gradient; with ``grad_scale = S`` (what the
    trainer sets through set_grad_scale) the state is what an unscaled run accumulates, for scales
    that change between iterations."""
    ref, scaled = EqualizedFocalLoss(C).double(), EqualizedFocalLoss(C).double()
    model = torch.nn.ModuleDict({"head": torch.nn.ModuleDict({"cls_loss": scaled})})
    gen = torch.Generator().manual_seed(3)
    for s in (65536.0, 1.0, 2.0**20):
        logits = torch.randn(30, C, generator=gen, dtype=torch.float64) * 2
        labels = torch.randint(0, C + 1, (30,), generator=gen)
        ref(logits.clone().requires_grad_(True), labels).backward()
        assert set_grad_scale(model, s) == 1 and scaled.grad_scale == s
        x = logits.clone().requires_grad_(True)
        (scaled(x, labels) * s).backward()
        for name in ("pos_grad", "neg_grad", "pos_neg_ratio"):
            torch.testing.assert_close(getattr(scaled, name), getattr(ref, name), rtol=1e-12, atol=1e-15)
    assert not torch.allclose(ref.pos_neg_ratio, torch.ones(C, dtype=torch.float64))


def test_frozen_state() -> None:
    logits, labels, _ = _inputs(dtype=torch.float32)
    loss = EqualizedFocalLoss(C)
    loss.update_state = False
    loss(logits.clone().requires_grad_(True), labels).backward()
    assert torch.all(loss.pos_grad == 0) and torch.all(loss.pos_neg_ratio == 1)


# ----------------------------------------------------------------------------------------------
# outside detection


def test_multilabel_use() -> None:
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(16, C, generator=gen, dtype=torch.float64)
    targets = (torch.rand(16, C, generator=gen) > 0.6).double()
    targets[0] = 1.0  # a row with every class positive
    loss = EqualizedFocalLoss(C).double()
    _set_state(loss, *STATE)
    gamma, weight = loss.focusing_factors()
    x = logits.clone().requires_grad_(True)
    value = loss.forward_multilabel(x, targets)
    n = targets.sum()
    ref = equalized_focal_loss_terms(logits, targets, gamma, weight).sum() / n
    torch.testing.assert_close(value, ref)
    value.backward()
    g = equalized_focal_loss_grad(logits, targets, gamma, weight) / n
    torch.testing.assert_close(x.grad, g)
    torch.testing.assert_close(loss.pos_grad, torch.tensor(STATE[0], dtype=torch.float64) + (g.abs() * targets).sum(0))
    # one-hot targets give the same as the label form
    labels = torch.tensor([0, 3, C, 1])
    onehot = torch.zeros(4, C + 1, dtype=torch.float64)
    onehot[torch.arange(4), labels] = 1
    frozen = EqualizedFocalLoss(C).double()
    torch.testing.assert_close(frozen.forward_multilabel(logits[:4], onehot[:, :C]), frozen(logits[:4], labels))
    # EQFL with a quality matrix
    eq = EqualizedQualityFocalLoss(C).double()
    qm = torch.rand(16, C, generator=gen, dtype=torch.float64)
    ref = equalized_quality_focal_loss_terms(logits, targets * qm, *eq.focusing_factors()).sum() / n
    torch.testing.assert_close(eq.forward_multilabel(logits, targets, quality=qm), ref)
    with pytest.raises(ValueError, match="0 or 1"):
        loss.forward_multilabel(logits, targets * 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_focal_baseline_computes_half_logits_in_float32(dtype) -> None:
    """As EFL / QFL: half-precision logits (AMP) are computed in float32 (value and gradient)."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(200, C, generator=g) - 6.0).to(dtype)  # easy negatives near the prior
    labels = torch.randint(-1, C + 1, (200,), generator=g)
    loss = SigmoidFocalLoss(C)
    xh = logits.clone().requires_grad_(True)
    out = loss(xh, labels)
    out.backward()
    x32 = logits.float().requires_grad_(True)
    ref = loss(x32, labels)
    ref.backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(xh.grad, x32.grad.to(dtype), rtol=0, atol=0)


def test_input_errors() -> None:
    loss = EqualizedFocalLoss(C)
    with pytest.raises(ValueError, match="shape"):
        loss(torch.zeros(3, C + 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be in"):
        loss(torch.zeros(3, C), torch.tensor([0, C + 1, 0]))
    for other in (SigmoidFocalLoss(C), QualityFocalLoss(C), EqualizedQualityFocalLoss(C)):
        with pytest.raises(ValueError, match=rf"{type(other).__name__}: labels must be in -1..{C} .*got values in -2..1"):
            other(torch.zeros(3, C), torch.tensor([0, -2, 1]), quality=torch.ones(3))
    with pytest.raises(ValueError, match="gamma_b"):
        EqualizedFocalLoss(C, gamma_b=0.0)
    with pytest.raises(ValueError, match="quality"):
        QualityFocalLoss(C)(torch.zeros(3, C), torch.zeros(3, dtype=torch.long))
