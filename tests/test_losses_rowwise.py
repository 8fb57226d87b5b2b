"""The row-blocked evaluation behind Balanced Softmax / Sigmoid, EBL, Seesaw, EQL and EQLv2 (taildet.ops.rowwise).

Each loss's value and gradient equal plain-autograd formulas written with torch's own ops, with one
block and with many blocks (the CPU path for large batches); half-precision logits; work buffers
reused across interleaved losses; the in-place softmax helpers; non-finite logits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from taildet.losses import BalancedSigmoidLoss, BalancedSoftmaxLoss, EQLLoss, EQLv2Loss, EquilibriumLoss, SeesawLoss
from taildet.ops import rowwise

C = 7
N = 23
COUNTS = [500.0, 90.0, 40.0, 12.0, 5.0, 2.0, 1.0]
FREQ = [0.4, 0.2, 0.05, 0.009, 0.3, 0.001, 0.0005]  # EQL with lambda 0.01: classes 3, 5, 6 rare


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(k, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = (3.0 * torch.randn(N, k, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, C + 1, (N,), generator=g)
    y[:4] = C
    y[4:8] = torch.arange(4)
    w = torch.rand(N, generator=g, dtype=torch.float64) + 0.2
    w[5] = 0.0
    return z, y, w


def _ref_balanced_softmax(loss, z, y, w):
    adj = loss.log_adjustment(z.dtype)
    ce = F.cross_entropy(z + adj, y, reduction="none")
    return ce.mean() if w is None else (ce * w).sum() / z.shape[0]


def _ref_ebl(loss, z, y, w):
    log_s = torch.log(loss.mean_score.to(z.dtype).clamp(min=1e-12))
    ce = F.cross_entropy(z + log_s, y, reduction="none")
    return ce.mean() if w is None else (ce * w).sum() / (w > 0).sum()


def _ref_seesaw(loss, z, y, w):
    Cn = loss.num_classes
    obj = F.cross_entropy(z[:, Cn:], (y == Cn).long(), reduction="none")
    pos = y < Cn
    zc = z[pos, :Cn]
    cls = F.cross_entropy(zc + loss.log_factors(zc.detach(), y[pos]), y[pos], reduction="none")
    if w is None:
        return (obj.sum() + cls.sum()) / z.shape[0]
    return ((obj * w).sum() + (cls * w[pos]).sum()) / z.shape[0]


def _ref_eqlv2(loss, z, y, w):
    t = torch.zeros_like(z).scatter_(1, y[:, None], 1.0)
    pos_w, neg_w = loss.class_weights(z.dtype)
    wm = pos_w * t + neg_w * (1 - t)
    if w is not None:
        wm = wm * w[:, None]
    return F.binary_cross_entropy_with_logits(z, t, weight=wm, reduction="sum") / z.shape[0]


def _ref_balanced_sigmoid(loss, z, y, w):
    fg = (y < loss.num_classes).to(z.dtype)[:, None]
    x = z + fg * loss.shift(z.dtype)
    t = F.one_hot(y, loss.num_classes + 1)[:, : loss.num_classes].to(z.dtype)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").sum(1)
    return (bce if w is None else bce * w).sum() / z.shape[0]


def _ref_eql(loss, z, y, w):
    t = F.one_hot(y, loss.num_classes + 1)[:, : loss.num_classes].to(z.dtype)
    fg = (y < loss.num_classes).to(z.dtype)[:, None]
    rare = (loss.image_frequency < loss.lambda_).to(z.dtype)
    wm = 1.0 - fg * rare * (1.0 - t)
    bce = (F.binary_cross_entropy_with_logits(z, t, reduction="none") * wm).sum(1)
    return (bce if w is None else bce * w).sum() / z.shape[0]


def _losses():
    ebl = EquilibriumLoss(C)
    ebl.mean_score.copy_(torch.tensor([0.6, 0.3, 0.05, 0.2, 1e-4, 0.9, 0.02, 0.01]))
    seesaw = SeesawLoss(C)
    seesaw.cum_samples.copy_(torch.tensor([300, 5, 80, 1, 40, 2, 900, 5000]))
    eqlv2 = EQLv2Loss(C)
    eqlv2.pos_neg.copy_(torch.tensor([0.05, 0.9, 1.4, 0.3, 0.0, 2.0, 0.7, 100.0]))
    return {
        "balanced_softmax": (BalancedSoftmaxLoss(C, COUNTS), _ref_balanced_softmax),
        "equilibrium": (ebl, _ref_ebl),
        "seesaw": (seesaw, _ref_seesaw),
        "eqlv2": (eqlv2, _ref_eqlv2),
        "balanced_sigmoid": (BalancedSigmoidLoss(C, FREQ), _ref_balanced_sigmoid),
        "eql": (EQLLoss(C, FREQ, lambda_=0.01), _ref_eql),
    }


def _value_and_grad(fn, z, *args):
    z = z.detach().clone().requires_grad_(True)
    out = fn(z, *args)
    (g,) = torch.autograd.grad(3.0 * out, z)  # a grad_output other than 1
    return out.detach(), g


@pytest.mark.parametrize("name", sorted(_losses()))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("rows_per_block", [None, 1, 5])
def test_equals_autograd_formula_any_blocking(name, weighted, rows_per_block, monkeypatch):
    loss, ref = _losses()[name]
    loss.eval()  # no state change between the two evaluations
    if rows_per_block is not None:
        monkeypatch.setattr(rowwise, "BLOCK_BYTES", 4 * loss.num_outputs() * rows_per_block)
        assert rowwise.block_rows(torch.zeros(N, loss.num_outputs())) == rows_per_block
    z, y, w = _inputs(loss.num_outputs())
    w = w if weighted else None
    v, g = _value_and_grad(lambda t: loss(t, y, w), z)
    v_ref, g_ref = _value_and_grad(lambda t: ref(loss, t, y, w), z)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(_losses()))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(name, dtype):
    loss, ref = _losses()[name]
    loss.eval()
    z, y, w = _inputs(loss.num_outputs(), dtype=dtype)
    v, g = _value_and_grad(lambda t: loss(t, y, w.float()), z)
    assert v.dtype == torch.float32 and g.dtype == dtype
    v_ref, g_ref = _value_and_grad(lambda t: ref(loss, t, y, w.float()), z.float())
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.float(), g_ref, rtol=0, atol=2e-3)


def test_interleaved_losses_share_work_buffers_safely(monkeypatch):
    monkeypatch.setattr(rowwise, "BLOCK_BYTES", 4 * (C + 2) * 4)
    losses = _losses()
    a, _ = losses["balanced_softmax"]
    b, _ = losses["seesaw"]
    b.eval()  # counts fixed: the same loss in every evaluation
    za, y, w = _inputs(a.num_outputs(), seed=1, dtype=torch.float32)
    zb, _, _ = _inputs(b.num_outputs(), seed=2, dtype=torch.float32)
    alone_a = _value_and_grad(lambda t: a(t, y, w.float()), za)
    alone_b = _value_and_grad(lambda t: b(t, y), zb)
    ta, tb = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    la, lb = a(ta, y, w.float()), b(tb, y)  # both forwards, then both backwards
    (3.0 * lb).backward()
    (3.0 * la).backward()
    torch.testing.assert_close(ta.grad, alone_a[1], rtol=0, atol=0)
    torch.testing.assert_close(tb.grad, alone_b[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_softmax_helpers(dtype):
    z = 5.0 * torch.randn(37, 1204, dtype=dtype)
    for fn, ref in ((rowwise.softmax_, torch.softmax), (rowwise.log_softmax_, torch.log_softmax)):
        t = z.clone()
        out = fn(t)
        assert out.data_ptr() == t.data_ptr()
        torch.testing.assert_close(t, ref(z, dim=1), rtol=0, atol=0)
        nc = z.clone().t().contiguous().t()  # non-contiguous: the copying fallback
        fn(nc)
        torch.testing.assert_close(nc, ref(z, dim=1))


def test_scratch_reuses_buffers_per_slot():
    s = rowwise.Scratch()
    a = s.empty((4, 6), torch.float32, torch.device("cpu"), slot=3)
    b = s.empty((2, 6), torch.float32, torch.device("cpu"), slot=3)
    c = s.empty((4, 6), torch.float32, torch.device("cpu"), slot=4)
    assert a.data_ptr() == b.data_ptr() != c.data_ptr()
    assert b.shape == (2, 6) and b.is_contiguous()


def test_non_finite_logits():
    loss = BalancedSoftmaxLoss(C, COUNTS)
    z, y, _ = _inputs(C + 1, dtype=torch.float32)
    for bad in (float("nan"), float("inf")):
        zb = z.clone()
        zb[6, 2] = bad
        with pytest.raises(ValueError, match=r"BalancedSoftmaxLoss: logits contain NaN or infinite values \(1 of"):
            loss(zb, y)
    # -inf on a non-target column is probability 0: a finite loss, no gradient there
    zb = z.clone().requires_grad_(True)
    col = (int(y[6]) + 1) % (C + 1)
    with torch.no_grad():
        zb[6, col] = -math.inf
    out = loss(zb, y)
    out.backward()
    assert math.isfinite(out.item()) and zb.grad[6, col] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["balanced_softmax", "equilibrium", "seesaw"])
def test_target_probability_below_normal_range(name, dtype):
    """Rows whose target probability underflows (softmax ~ 0) still get the exact loss: on CPU the
    loss is -log of the gathered softmax, and those rows are recomputed with log_softmax."""
    loss, ref = _losses()[name]
    loss.eval()
    z, y, w = _inputs(loss.num_outputs(), dtype=dtype)
    w = w.to(dtype)
    gap = 120.0 if dtype == torch.float32 else 800.0  # exp(-gap) is 0 or subnormal
    for i in (6, 7):  # foreground rows (labels 2, 3)
        z[i, :] = 0.0
        z[i, (int(y[i]) + 1) % C] = gap if i == 6 else 0.0
        z[i, int(y[i])] = 0.0 if i == 6 else -gap
    v, g = _value_and_grad(lambda t: loss(t, y, w), z)
    v_ref, g_ref = _value_and_grad(lambda t: ref(loss, t, y, w), z)
    assert math.isfinite(v.item()) and v.item() > gap / z.shape[0] * 0.5
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(v, v_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(_losses()))
def test_second_backward_with_retained_graph_recomputes_same_gradient(name):
    """The first backward turns the forward's buffer into the gradient; a second one (retain_graph)
    recomputes it from the logits: the same bits."""
    loss, _ = _losses()[name]
    loss.eval()
    z, y, w = _inputs(loss.num_outputs(), dtype=torch.float32)
    z.requires_grad_(True)
    out = loss(z, y, w.float())
    (g1,) = torch.autograd.grad(out, z, retain_graph=True)
    (g2,) = torch.autograd.grad(out, z)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(_losses()))
@pytest.mark.parametrize("which", ["background", "foreground"])
def test_batches_of_one_kind_of_roi(name, which):
    loss, ref = _losses()[name]
    loss.eval()
    z, y, w = _inputs(loss.num_outputs())
    y = torch.full_like(y, C) if which == "background" else y % C
    v, g = _value_and_grad(lambda t: loss(t, y, w), z)
    v_ref, g_ref = _value_and_grad(lambda t: ref(loss, t, y, w), z)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["balanced_softmax", "equilibrium", "seesaw"])
def test_device_path_without_host_checks(name, monkeypatch):
    """The path taken on GPU (log_softmax, then exp into the kept buffer; no underflow check) gives
    the same loss and gradient, underflowing rows included."""
    loss, ref = _losses()[name]
    loss.eval()
    z, y, w = _inputs(loss.num_outputs())
    z[7, int(y[7])] = -800.0
    monkeypatch.setattr(rowwise, "_host_checks_free", lambda t: False)
    v, g = _value_and_grad(lambda t: loss(t, y, w), z)
    v_ref, g_ref = _value_and_grad(lambda t: ref(loss, t, y, w), z)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_eqlv2_negative_gradient_sum_without_cancellation():
    """G- is summed over the non-target entries only: confident positives (sigmoid ~ 1 on the
    target) must not cancel a small negative sum in float32."""
    loss = EQLv2Loss(C).train()
    n = 4096
    y = torch.arange(n) % 2  # classes 0 and 1 only
    z = torch.full((n, C + 1), -14.0)  # negatives: sigmoid ~ 8e-7
    z[torch.arange(n), y] = 6.0  # confident positives: sigmoid ~ 0.9975
    loss(z.clone().requires_grad_(True), y)
    z64 = z.double()
    t = F.one_hot(y, C + 1).double()
    neg_w = EQLv2Loss(C).class_weights(torch.float64)[1]  # the weights of this loss: ratio 100
    expected = (torch.sigmoid(z64) * (1 - t)).sum(0) * neg_w
    torch.testing.assert_close(loss.neg_grad.double(), expected, rtol=1e-4, atol=0)


def test_cached_vectors_follow_hyper_parameter_changes():
    z, y, _ = _inputs(C, dtype=torch.float64)
    bs = BalancedSigmoidLoss(C, FREQ)
    before = bs(z, y)
    bs.exact = True
    torch.testing.assert_close(bs(z, y), BalancedSigmoidLoss(C, FREQ, exact=True)(z, y))
    assert not torch.allclose(before, bs(z, y))
    eql = EQLLoss(C, FREQ, lambda_=0.01)
    eql(z, y)
    eql.lambda_ = 0.1
    torch.testing.assert_close(eql(z, y), EQLLoss(C, FREQ, lambda_=0.1)(z, y))
