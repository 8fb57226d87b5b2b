"""Numeric tests of the long-tail two-stage losses (Balanced Softmax/Sigmoid, EBL, EQL, EQLv2, Seesaw).

Each loss is compared with a direct transcription of its equation (methods.md sections 2, 3 and
5) written here with explicit loops in numpy, on random float64 inputs; the reductions to the
plain losses, gradients (torch.autograd.gradcheck), state updates over several iterations,
checkpoint round trips, input errors and a one-step train + eval of a tiny Faster R-CNN.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taildet.losses import (
    LOSSES,
    BalancedSigmoidLoss,
    BalancedSoftmaxLoss,
    EQLLoss,
    EQLv2Loss,
    EquilibriumLoss,
    SeesawLoss,
    build_loss,
)
from helpers import two_image_batch

C = 4
N = 9


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(k: int, n: int = N, seed: int = 0, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, k, generator=g, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, C + 1, (n,), generator=g)
    labels[:2] = C  # some background
    labels[2] = 0  # some foreground
    return logits, labels


def _np(t):
    return t.detach().cpu().numpy().astype(np.float64)


def _log_softmax_row(z):
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def _bce(z, t):
    # -t log sigmoid(z) - (1 - t) log(1 - sigmoid(z)), written out
    return max(z, 0.0) - z * t + math.log1p(math.exp(-abs(z)))


def _softmax(z):
    return [math.exp(v) for v in _log_softmax_row(z)]


COUNTS = [40.0, 10.0, 3.0, 1.0]
FREQ = [0.6, 0.2, 0.05, 0.001]


# ------------------------------------------------------------------------------------------------
# Balanced Softmax


def _balanced_softmax_by_hand(z, y, counts, background=True):
    z, y = _np(z), y.tolist()
    m = max(counts)
    total = 0.0
    for i in range(len(y)):
        row = list(z[i])
        for j in range(len(counts)):
            row[j] += math.log(counts[j] / m) if background else math.log(counts[j])
        total += -_log_softmax_row(row)[y[i]]
    return total / len(y)


def test_balanced_softmax_detection_form_equals_transcription():
    loss = BalancedSoftmaxLoss(C, instance_counts=np.array(COUNTS))
    assert loss.num_outputs() == C + 1 and loss.has_background
    z, y = _batch(C + 1)
    out = loss(z, y)
    assert out.dtype == torch.float64
    assert math.isclose(out.item(), _balanced_softmax_by_hand(z, y, COUNTS), rel_tol=1e-6)
    # background logit untouched, foreground shifted by log(n / max n) <= 0
    adj = loss.log_adjustment(torch.float64)
    assert adj[C] == 0 and (adj[:C] <= 0).all()
    # test time: raw softmax
    torch.testing.assert_close(loss.scores(z), torch.softmax(z, -1)[:, :C])


def test_balanced_softmax_classification_form_and_weight():
    loss = BalancedSoftmaxLoss(C, instance_counts=torch.tensor(COUNTS), background=False)
    assert loss.num_outputs() == C and not loss.has_background
    z, y = _batch(C)
    y = y.clamp(max=C - 1)
    assert math.isclose(loss(z, y).item(), _balanced_softmax_by_hand(z, y, COUNTS, False), rel_tol=1e-6)
    torch.testing.assert_close(loss(z, y), F.cross_entropy(z + torch.tensor(COUNTS, dtype=torch.float64).log(), y))
    w = torch.rand(N, dtype=torch.float64)
    expected = (F.cross_entropy(z + torch.tensor(COUNTS, dtype=torch.float64).log(), y, reduction="none") * w).sum() / N
    torch.testing.assert_close(loss(z, y, w), expected)
    with pytest.raises(ValueError, match="labels must be in 0..3"):
        loss(z, torch.full((N,), C))  # no background in the classification form


def test_balanced_softmax_equal_counts_is_ce_and_zero_counts():
    z, y = _batch(C + 1)
    torch.testing.assert_close(BalancedSoftmaxLoss(C, [7, 7, 7, 7])(z, y), F.cross_entropy(z, y))
    with pytest.raises(ValueError, match=r"instance_counts is 0 for classes \[1, 3\]"):
        BalancedSoftmaxLoss(C, [5, 0, 2, 0])
    smooth = BalancedSoftmaxLoss(C, [5, 0, 2, 0], smoothing=1.0)
    torch.testing.assert_close(smooth.instance_counts, torch.tensor([6.0, 1.0, 3.0, 1.0]))
    assert torch.isfinite(smooth(z, y))
    with pytest.raises(ValueError, match="4 entries"):
        BalancedSoftmaxLoss(C, [1, 2, 3])
    with pytest.raises(ValueError, match="instance_counts is required"):
        BalancedSoftmaxLoss(C)


# ------------------------------------------------------------------------------------------------
# Balanced Sigmoid


def _balanced_sigmoid_by_hand(z, y, f, exact=False):
    z, y = _np(z), y.tolist()
    n, k = z.shape
    total = 0.0
    for i in range(n):
        for j in range(k):
            zij = z[i, j]
            if y[i] < k:  # foreground RoI: all its logits shifted
                zij -= math.log((1 - f[j]) / f[j])
                if exact:
                    zij += math.log(k - 1)  # eq. 48: log((1-f)/f) - log(C-1) subtracted
            total += _bce(zij, 1.0 if y[i] == j else 0.0)
    return total / n


@pytest.mark.parametrize("exact", [False, True])
def test_balanced_sigmoid_equals_transcription(exact):
    loss = BalancedSigmoidLoss(C, image_frequency=FREQ, exact=exact)
    assert loss.num_outputs() == C and not loss.has_background
    z, y = _batch(C)
    f32 = [float(np.float32(v)) for v in FREQ]  # the buffer is float32
    assert math.isclose(loss(z, y).item(), _balanced_sigmoid_by_hand(z, y, f32, exact), rel_tol=1e-9)
    torch.testing.assert_close(loss.scores(z), torch.sigmoid(z))
    bias = torch.empty(C)
    loss.init_bias(bias)
    torch.testing.assert_close(torch.sigmoid(bias), torch.full((C,), 0.001))


def test_balanced_sigmoid_half_frequency_is_bce_and_bad_frequency():
    z, y = _batch(C)
    t = torch.zeros(N, C, dtype=torch.float64)
    fg = y < C
    t[fg, y[fg]] = 1
    plain = F.binary_cross_entropy_with_logits(z, t, reduction="sum") / N
    torch.testing.assert_close(BalancedSigmoidLoss(C, [0.5] * C)(z, y), plain)
    for bad in ([0.5, 0.0, 0.2, 0.1], [0.5, 1.0, 0.2, 0.1]):
        with pytest.raises(ValueError, match=r"strictly between 0 and 1.*classes \[1\]"):
            BalancedSigmoidLoss(C, bad)
    with pytest.raises(ValueError, match="at least 2 classes"):
        BalancedSigmoidLoss(1, [0.3], exact=True)


# ------------------------------------------------------------------------------------------------
# Equilibrium Loss


def _ebl_by_hand(z, y, s, w=None):
    z, y = _np(z), y.tolist()
    losses, ws = [], []
    for i in range(len(y)):
        row = [z[i, j] + math.log(s[j]) for j in range(len(s))]
        losses.append(-_log_softmax_row(row)[y[i]])
        ws.append(1.0 if w is None else float(w[i]))
    return sum(a * b for a, b in zip(losses, ws)) / max(sum(1 for b in ws if b > 0), 1)


def _ebl_update_by_hand(s, z, y, gt, mem=(), alpha=0.9, bg=0.01):
    s = list(s)
    z, y, gt = _np(z), y.tolist(), gt.tolist()
    obs = defaultdict(list)
    for g in sorted(set(gt[i] for i in range(len(y)) if y[i] < C)):
        rois = [i for i in range(len(y)) if y[i] < C and gt[i] == g]
        c = y[rois[0]]
        obs[c].append(sum(_softmax(list(z[i]))[c] for i in rois) / len(rois))
    for mz, my in mem:
        mz, my = _np(mz), my.tolist()
        for c in sorted(set(my)):
            idx = [i for i in range(len(my)) if my[i] == c]
            obs[c].append(sum(_softmax(list(mz[i]))[c] for i in idx) / len(idx))
    for c, v in obs.items():
        a = alpha ** len(v)
        s[c] = a * s[c] + (1 - a) * sum(v) / len(v)
    s[C] = bg
    return s


def test_ebl_equals_transcription_and_equal_scores_is_ce():
    loss = EquilibriumLoss(C)
    assert loss.num_outputs() == C + 1
    torch.testing.assert_close(loss.mean_score, torch.full((C + 1,), 0.01))
    z, y = _batch(C + 1)
    torch.testing.assert_close(loss(z, y), F.cross_entropy(z, y))  # equal s => CE
    s = [0.3, 0.02, 0.5, 1e-4, 0.01]
    loss.mean_score.copy_(torch.tensor(s))
    s32 = [float(np.float32(v)) for v in s]
    assert math.isclose(loss(z, y).item(), _ebl_by_hand(z, y, s32), rel_tol=1e-9)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 0.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    assert math.isclose(loss(z, y, w).item(), _ebl_by_hand(z, y, s32, w), rel_tol=1e-9)
    torch.testing.assert_close(loss.scores(z), torch.softmax(z, -1)[:, :C])  # test time: raw


def test_ebl_stable_for_tiny_scores():
    loss = EquilibriumLoss(C)
    loss.mean_score.copy_(torch.tensor([1e-30, 1e-20, 0.5, 0.0, 0.01]))
    z = torch.tensor([[80.0, -80.0, 0.0, 3.0, 1.0]], requires_grad=True)
    out = loss(z, torch.tensor([1]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()


def test_ebl_update_sequence_matches_hand_ema():
    loss = EquilibriumLoss(C)
    s = [0.01] * (C + 1)
    g = torch.Generator().manual_seed(3)
    for it in range(3):
        n = 10
        z = torch.randn(n, C + 1, generator=g, dtype=torch.float64)
        # GT ids 0..3 with classes 2, 0, 2, 3 (two GTs of class 2: two observations); bg = -1
        gt_cls = torch.tensor([2, 0, 2, 3])
        gt = torch.tensor([0, 0, 1, 2, 2, 2, 3, -1, -1, -1]) if it != 1 else torch.tensor([1] * 4 + [-1] * 6)
        y = torch.where(gt >= 0, gt_cls[gt.clamp(min=0)], torch.full_like(gt, C))
        mem = []
        if it == 2:  # memory samples of classes 1 and 3 (MFS), one via observe_memory, one via extra_*
            mz1, my1 = torch.randn(3, C + 1, generator=g, dtype=torch.float64), torch.tensor([1, 1, 3])
            mz2, my2 = torch.randn(2, C + 1, generator=g, dtype=torch.float64), torch.tensor([3, 0])
            mem = [(mz1, my1), (mz2, my2)]
            loss.observe_memory(mz1, my1)
            loss.update(z, y, gt, extra_logits=mz2, extra_labels=my2)
        else:
            loss.update(z.float(), y, gt)
        s = _ebl_update_by_hand(s, z, y, gt, mem)
        np.testing.assert_allclose(_np(loss.mean_score), s, rtol=1e-6)
    assert loss.mean_score[C] == pytest.approx(0.01) and loss._pending == []
    # a class with no observation keeps its value
    before = loss.mean_score.clone()
    loss.update(torch.zeros(2, C + 1), torch.tensor([C, C]), torch.tensor([-1, -1]))
    torch.testing.assert_close(loss.mean_score, before)


def test_ebl_update_errors():
    loss = EquilibriumLoss(C)
    z = torch.zeros(3, C + 1)
    with pytest.raises(ValueError, match="gt_index is required"):
        loss.update(z, torch.tensor([0, 1, C]))
    with pytest.raises(ValueError, match="gt_index >= 0"):
        loss.update(z, torch.tensor([0, 1, C]), torch.tensor([0, -1, -1]))
    with pytest.raises(ValueError, match="different labels to the same GT"):
        loss.update(z, torch.tensor([0, 1, C]), torch.tensor([0, 0, -1]))
    with pytest.raises(ValueError, match="observe_memory: labels must be in 0..3"):
        loss.observe_memory(torch.zeros(1, C + 1), torch.tensor([C]))


# ------------------------------------------------------------------------------------------------
# EQL


def test_eql_equals_transcription():
    lam = 0.06
    loss = EQLLoss(C, image_frequency=FREQ, lambda_=lam)
    assert loss.num_outputs() == C
    z, y = _batch(C)
    zz, yy = _np(z), y.tolist()
    total = 0.0
    for i in range(N):
        e = 1.0 if yy[i] < C else 0.0
        for j in range(C):
            t = 1.0 if yy[i] == j else 0.0
            w = 1.0 - e * (1.0 if FREQ[j] < lam else 0.0) * (1.0 - t)
            total += w * _bce(zz[i, j], t)
    assert math.isclose(loss(z, y).item(), total / N, rel_tol=1e-9)
    torch.testing.assert_close(loss.scores(z), torch.sigmoid(z))
    # lambda = 0: no class is rare => plain BCE
    t = torch.zeros(N, C, dtype=torch.float64)
    fg = y < C
    t[fg, y[fg]] = 1
    torch.testing.assert_close(EQLLoss(C, FREQ, lambda_=0.0)(z, y), F.binary_cross_entropy_with_logits(z, t, reduction="sum") / N)


# ------------------------------------------------------------------------------------------------
# EQLv2


def _eqlv2_by_hand(z, y, r, gamma=12.0, mu=0.8, alpha=4.0):
    """Loss and the (G+, G-) increments, written out."""
    z, y = _np(z), y.tolist()
    n, k = z.shape
    total = 0.0
    gp, gn = [0.0] * k, [0.0] * k
    for j in range(k):
        if j < k - 1:
            neg_w = 1.0 / (1.0 + math.exp(-gamma * (r[j] - mu)))
            pos_w = 1.0 + alpha * (1.0 - neg_w)
        else:
            neg_w = pos_w = 1.0  # objectness column
        for i in range(n):
            t = 1.0 if y[i] == j else 0.0  # background label C = objectness column target 1
            w = pos_w * t + neg_w * (1 - t)
            total += w * _bce(z[i, j], t)
            g = abs(1.0 / (1.0 + math.exp(-z[i, j])) - t)
            gp[j] += g * t * w
            gn[j] += g * (1 - t) * w
    return total / n, gp, gn


def test_eqlv2_sequence_equals_transcription_and_accumulators():
    loss = EQLv2Loss(C)
    assert loss.num_outputs() == C + 1
    r = [100.0] * (C + 1)
    gp_tot, gn_tot = [0.0] * (C + 1), [0.0] * (C + 1)
    for it in range(3):
        z, y = _batch(C + 1, seed=10 + it)
        expected, gp, gn = _eqlv2_by_hand(z, y, r)
        assert math.isclose(loss(z, y).item(), expected, rel_tol=1e-6)  # uses the ratio up to it-1
        gp_tot = [a + b for a, b in zip(gp_tot, gp)]
        gn_tot = [a + b for a, b in zip(gn_tot, gn)]
        r = [a / (b + 1e-10) for a, b in zip(gp_tot, gn_tot)]
        np.testing.assert_allclose(_np(loss.pos_grad), gp_tot, rtol=1e-5)
        np.testing.assert_allclose(_np(loss.neg_grad), gn_tot, rtol=1e-5)
        np.testing.assert_allclose(_np(loss.pos_neg), r, rtol=1e-5)
    # eval mode: no update
    loss.eval()
    before = loss.state_dict()
    loss(*_batch(C + 1, seed=99))
    for key, v in loss.state_dict().items():
        torch.testing.assert_close(v, before[key])


def test_eqlv2_ratio_one_weights_and_scores():
    loss = EQLv2Loss(C)
    loss.pos_neg.fill_(1.0)
    pos_w, neg_w = loss.class_weights(torch.float64)
    nw = 1.0 / (1.0 + math.exp(-12.0 * 0.2))
    assert neg_w[:C].tolist() == pytest.approx([nw] * C)
    assert pos_w[:C].tolist() == pytest.approx([1 + 4 * (1 - nw)] * C)
    assert pos_w[C].item() == 1.0 and neg_w[C].item() == 1.0
    z, y = _batch(C + 1)
    expected, _, _ = _eqlv2_by_hand(z, y, [1.0] * (C + 1))
    loss.eval()
    assert math.isclose(loss(z, y).item(), expected, rel_tol=1e-9)
    # initial ratio 100 => neg_w ~ 1, pos_w ~ 1: plain BCE over C+1 columns
    fresh = EQLv2Loss(C).eval()
    t = F.one_hot(y, C + 1).double()
    torch.testing.assert_close(fresh(z, y), F.binary_cross_entropy_with_logits(z, t, reduction="sum") / N)
    p = torch.sigmoid(z)
    torch.testing.assert_close(loss.scores(z), p[:, :C] * (1 - p[:, C:]))


# ------------------------------------------------------------------------------------------------
# Seesaw


def _seesaw_by_hand(z, y, counts, p=0.8, q=2.0, eps=1e-2):
    z, y = _np(z), y.tolist()
    n = len(y)
    total = 0.0
    for i in range(n):
        obj = [z[i, C], z[i, C + 1]]
        total += -_log_softmax_row(obj)[0 if y[i] < C else 1]
        if y[i] == C:
            continue
        yi = y[i]
        sig = _softmax(list(z[i, :C]))
        row = list(z[i, :C])
        for j in range(C):
            if j == yi:
                continue
            nj, ni = max(counts[j], 1), max(counts[yi], 1)
            m = (nj / ni) ** p if nj < ni else 1.0
            ratio = sig[j] / max(sig[yi], eps)
            c = ratio**q if ratio > 1 else 1.0
            row[j] += math.log(m * c)
        total += -_log_softmax_row(row)[yi]
    return total / n


def test_seesaw_equals_transcription_counts_before_loss():
    loss = SeesawLoss(C)
    assert loss.num_outputs() == C + 2
    prior = torch.tensor([50, 3, 20, 0, 100])
    loss.cum_samples.copy_(prior)
    z, y = _batch(C + 2, scale=3.0)
    counts = (prior + torch.bincount(y, minlength=C + 1)).tolist()  # updated before the loss
    out = loss(z, y)
    assert loss.cum_samples.tolist() == counts
    assert math.isclose(out.item(), _seesaw_by_hand(z, y, counts), rel_tol=1e-9)
    # with a per-RoI weight, both terms are weighted, still / N
    loss.eval()
    w = torch.rand(N, dtype=torch.float64)
    ones = loss(z, y, torch.ones(N, dtype=torch.float64))
    assert math.isclose(ones.item(), out.item(), rel_tol=1e-12)
    zero_bg = w.clone()
    assert torch.isfinite(loss(z, y, zero_bg))
    # scores
    torch.testing.assert_close(loss.scores(z), torch.softmax(z[:, :C], -1) * torch.softmax(z[:, C:], -1)[:, :1])


def test_seesaw_equal_counts_equal_probs_is_ce_plus_objectness():
    loss = SeesawLoss(C).eval()
    loss.cum_samples.fill_(7)
    g = torch.Generator().manual_seed(1)
    z = torch.cat([torch.randn(N, 1, dtype=torch.float64, generator=g).expand(N, C),
                   torch.randn(N, 2, dtype=torch.float64, generator=g)], 1)
    _, y = _batch(C + 2)
    pos = y < C
    expected = (F.cross_entropy(z[pos, :C], y[pos], reduction="sum")
                + F.cross_entropy(z[:, C:], (y == C).long(), reduction="sum")) / N
    torch.testing.assert_close(loss(z, y), expected)
    # no positives: objectness only, still connected to the logits
    zb = z.clone().requires_grad_(True)
    out = loss(zb, torch.full((N,), C))
    out.backward()
    torch.testing.assert_close(out, F.cross_entropy(z[:, C:], torch.ones(N, dtype=torch.long)))


def test_seesaw_gradient_treats_compensation_as_constant():
    loss = SeesawLoss(C).eval()
    loss.cum_samples.copy_(torch.tensor([50, 3, 20, 1, 100]))
    z, y = _batch(C + 2, scale=3.0)
    loss(z, y).backward()
    pos = torch.nonzero(y < C).flatten()
    z2 = z.detach().clone().requires_grad_(True)
    adj = loss.log_factors(z.detach()[pos, :C], y[pos])  # constant
    ref = (F.cross_entropy(z2[pos, :C] + adj, y[pos], reduction="sum")
           + F.cross_entropy(z2[:, C:], (y == C).long(), reduction="sum")) / N
    ref.backward()
    torch.testing.assert_close(z.grad, z2.grad)


# ------------------------------------------------------------------------------------------------
# Shared: gradients, checkpoints, input errors, registry


def _all_losses():
    return {
        "balanced_softmax": BalancedSoftmaxLoss(C, COUNTS),
        "balanced_sigmoid": BalancedSigmoidLoss(C, FREQ),
        "balanced_sigmoid_exact": BalancedSigmoidLoss(C, FREQ, exact=True),
        "equilibrium": EquilibriumLoss(C),
        "eql": EQLLoss(C, FREQ, lambda_=0.06),
        "eqlv2": EQLv2Loss(C),
        "seesaw_q0": SeesawLoss(C, q=0.0),
    }


@pytest.mark.parametrize("name", sorted(_all_losses()))
def test_gradcheck(name):
    loss = _all_losses()[name].eval()  # eval: state frozen while gradcheck re-evaluates
    if name == "equilibrium":
        loss.mean_score.copy_(torch.tensor([0.3, 0.02, 0.5, 1e-3, 0.01]))
    if name == "eqlv2":
        loss.pos_neg.copy_(torch.tensor([0.5, 0.9, 1.2, 0.1, 3.0]))
    if name.startswith("seesaw"):
        loss.cum_samples.copy_(torch.tensor([50, 3, 20, 1, 100]))
    z, y = _batch(loss.num_outputs(), n=5, seed=4, scale=1.0)
    w = torch.rand(5, dtype=torch.float64) + 0.1
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (z,))
    assert torch.autograd.gradcheck(lambda t: loss(t, y, w), (z,))


def _step_state(loss, seed=0):
    z, y = _batch(loss.num_outputs(), seed=seed)
    if isinstance(loss, EquilibriumLoss):
        gt = torch.where(y < C, torch.arange(N), torch.full_like(y, -1))
        loss.update(z.detach(), y, gt)
    loss(z, y)


@pytest.mark.parametrize("name", ["equilibrium", "eqlv2", "seesaw", "balanced_softmax", "balanced_sigmoid", "eql"])
def test_state_survives_state_dict_round_trip(name):
    kwargs = {"balanced_softmax": {"instance_counts": COUNTS}, "balanced_sigmoid": {"image_frequency": FREQ},
              "eql": {"image_frequency": FREQ}}.get(name, {})
    a = build_loss(name, C, **kwargs)
    for s in range(3):
        _step_state(a, seed=s)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    if name == "balanced_softmax":
        kwargs = {"instance_counts": [1, 1, 1, 1]}
    elif kwargs:
        kwargs = {"image_frequency": [0.5] * C}
    b = build_loss(name, C, **kwargs)
    b.eval()(*_batch(b.num_outputs(), seed=5))  # fills any cached derived vector before the load
    b.train()
    b.load_state_dict(torch.load(buf))
    assert set(a.state_dict()) == set(b.state_dict()) and len(a.state_dict()) >= 1
    for key, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[key]), key
    # the restored loss computes the same loss and the same next update
    for m in (a, b):
        _step_state(m, seed=7)
    z, y = _batch(a.num_outputs(), seed=8)
    torch.testing.assert_close(a(z, y), b(z, y))


@pytest.mark.parametrize("name", sorted(_all_losses()))
def test_bad_inputs_raise_clear_errors(name):
    loss = _all_losses()[name]
    cls = type(loss).__name__
    k = loss.num_outputs()
    z, y = _batch(k)
    with pytest.raises(ValueError, match=rf"{cls}: expected logits of shape \[N, {k}\]"):
        loss(torch.zeros(N, k + 1), y)
    with pytest.raises(ValueError, match=rf"{cls}: labels must be in 0..{C}"):
        loss(z, torch.full((N,), C + 1))
    with pytest.raises(ValueError, match=rf"{cls}: labels must be in"):
        loss(z, torch.full((N,), -1))
    with pytest.raises(ValueError, match=rf"{cls}: expected int64 labels"):
        loss(z, y.int())
    bad = z.detach().clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"{cls}: logits contain NaN"):
        loss(bad, y)
    # empty batch: zero loss, connected
    e = torch.zeros(0, k, requires_grad=True)
    out = loss(e, torch.zeros(0, dtype=torch.long))
    out.backward()
    assert out.item() == 0.0


def test_registry_names():
    for name in ("balanced_softmax", "balanced_sigmoid", "equilibrium", "ebl", "eql", "eqlv2", "seesaw"):
        assert name in LOSSES
    assert LOSSES["ebl"] is LOSSES["equilibrium"]


# ------------------------------------------------------------------------------------------------
# Plugged into a tiny Faster R-CNN: one train step + one eval


SMALL = dict(
    backbone="tiny",
    min_size=96,
    max_size=96,
    representation_size=64,
    box_batch_size_per_image=64,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=100,
)
MC = 5
MODEL_KWARGS = {
    "balanced_softmax": {"instance_counts": [30, 10, 5, 2, 1]},
    "balanced_sigmoid": {"image_frequency": [0.5, 0.3, 0.1, 0.05, 0.01]},
    "equilibrium": {},
    "eql": {"image_frequency": [0.5, 0.3, 0.1, 0.05, 0.01], "lambda_": 0.06},
    "eqlv2": {},
    "seesaw": {},
}


@pytest.mark.parametrize(
    "name,classifier",
    [(n, "linear") for n in MODEL_KWARGS] + [(n, "cosine") for n in ("eql", "eqlv2", "seesaw")],
)
def test_in_faster_rcnn_train_step_and_eval(name, classifier):
    from taildet.models import build_faster_rcnn

    torch.manual_seed(0)
    model = build_faster_rcnn(MC, loss=name, loss_kwargs=MODEL_KWARGS[name], classifier=classifier, **SMALL)
    loss = model.cls_head.loss
    assert model.roi_heads.box_predictor.cls_score.weight.shape[0] == loss.num_outputs()
    images, targets = two_image_batch()
    state_before = {k: v.clone() for k, v in loss.state_dict().items()}
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_classifier"])
    sum(losses.values()).backward()
    opt.step()
    if name == "equilibrium":  # observed classes 0, 1, 3, 4 moved; class 2 and background did not
        s = loss.mean_score
        assert (s[[0, 1, 3, 4]] != state_before["mean_score"][[0, 1, 3, 4]]).all()
        assert s[2] == pytest.approx(0.01) and s[MC] == pytest.approx(0.01)
    if name == "seesaw":
        assert int(loss.cum_samples.sum()) == model.roi_heads.last_sampled["labels"].numel()
    if name == "eqlv2":
        assert (loss.pos_grad[[0, 1, 3, 4]] > 0).all() and (loss.neg_grad > 0).all()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for r in out:
        assert r["boxes"].shape[1] == 4 and r["scores"].shape == r["labels"].shape
        if r["scores"].numel():
            assert 0 <= float(r["scores"].min()) and float(r["scores"].max()) <= 1
            assert 0 <= int(r["labels"].min()) and int(r["labels"].max()) < MC
