"""Issue 18: the two-stage long-tail losses and the mean-score update do no host read on GPU.

On the CPU the GPU's code paths are forced with ``sync_free_paths()``; ``HostSyncDetector`` records
every aten operator that would read device values on the host (on CUDA: a synchronisation). Each
loss, with its fast path on and off, runs forward + backward (+ its state update) inside
``deferred_checks()`` with no such read, and gives the same value, gradient and state as the CPU
path. Bad labels under deferral give no crash in the loss and the same clear error at
``verify()``. ``tests/test_cuda_sync.py`` checks the real thing on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from taildet.losses import build_loss
from taildet.losses.federated import federated_class_mask, federated_classes
from taildet.losses.mean_score import MeanScoreTracker
from taildet.ops import fast_path
from taildet.utils.host_sync import HostSyncDetector, PendingChecks, deferred_checks, expect, sync_free_paths

pytestmark = pytest.mark.usefixtures("one_thread")

C = 7
N = 40
COUNTS = [500.0, 90.0, 40.0, 12.0, 5.0, 2.0, 1.0]
FREQ = [0.4, 0.2, 0.05, 0.009, 0.3, 0.001, 0.0005]

LOSSES = {
    "softmax_ce": {},
    "balanced_softmax": {"instance_counts": COUNTS},
    "balanced_sigmoid": {"image_frequency": FREQ},
    "equilibrium": {},
    "eql": {"image_frequency": FREQ, "lambda_": 0.01},
    "eqlv2": {},
    "seesaw": {},
    "federated": {"image_frequency": FREQ, "num_fed_classes": 3},
}


def _batch(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(N, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, C + 1, (N,), generator=g)
    y[:10] = C
    y[10:17] = torch.arange(C)
    # RoIs 2k and 2k+1 belong to one GT when both are foreground (the pair takes the first's label)
    first = torch.arange(N) - torch.arange(N) % 2
    y = torch.where((y < C) & (y[first] < C), y[first], y)
    gt = torch.where(y < C, first, -1)
    w = torch.rand(N, generator=g, dtype=torch.float64) + 0.2
    w[12] = 0.0
    return z, y, gt, w


def _build(name):
    loss = build_loss(name, C, **LOSSES[name])
    loss.train()
    if name == "eqlv2":
        loss.pos_neg.copy_(torch.tensor([0.05, 0.9, 1.4, 0.3, 0.0, 2.0, 0.7, 100.0]))
    if name == "seesaw":
        loss.cum_samples.copy_(torch.tensor([300, 5, 80, 1, 40, 2, 900, 5000]))
    return loss


def _step(loss, z, y, gt, w):
    """One training step of the loss: update (EBL), forward, backward; (value, grad, state)."""
    z = z.clone().requires_grad_(True)
    loss.update(z.detach(), y, gt)
    value = loss(z, y, w)
    value.backward()
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    return value.detach(), z.grad, state


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "plain"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_sync_free_path_has_no_host_read_and_equals_cpu_path(name, fast):
    z, y, gt, w = _batch(_build(name).num_outputs())
    with fast_path(fast):
        torch.manual_seed(0)
        ref = _step(_build(name), z, y, gt, w)
        loss = _build(name)
        with sync_free_paths(), deferred_checks() as pending, HostSyncDetector() as det:
            torch.manual_seed(0)
            got = _step(loss, z, y, gt, w)
        assert det.calls == [], f"{name}: host reads {det.calls}"
        assert len(pending) == 0  # verified when the block ended, and nothing failed
    if name == "federated":  # another draw of the class set: compare on the set it drew
        mask = loss.last_classes
        assert mask.dtype == torch.bool and mask.shape == (C,)
        ref_z = z.clone().requires_grad_(True)
        want = torch.nn.functional.binary_cross_entropy_with_logits(
            ref_z, torch.nn.functional.one_hot(y, C + 1)[:, :C].double(), reduction="none")
        want = ((want * mask.double()).sum(1) * w).sum() / N
        want.backward()
        torch.testing.assert_close(got[0], want.detach())
        torch.testing.assert_close(got[1], ref_z.grad)
        return
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)
    assert got[2].keys() == ref[2].keys()
    for key in ref[2]:
        torch.testing.assert_close(got[2][key], ref[2][key], rtol=1e-10, atol=1e-12, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", sorted(n for n in LOSSES if n != "softmax_ce"))
@pytest.mark.parametrize("bad", [C + 3, -2])
def test_bad_labels_under_deferral_raise_at_verify(name, bad):
    loss = _build(name)
    z, y, gt, w = _batch(loss.num_outputs())
    y = y.clone()
    y[3] = bad
    with sync_free_paths():
        with pytest.raises(ValueError, match=f"{type(loss).__name__}: labels must be in 0..") as err:
            with deferred_checks() as pending:
                value = loss(z.clone().requires_grad_(True), y, w)  # no crash: labels clamped
                value.backward()
                assert len(pending) >= 1
                pending.verify()
        assert f"[{min(bad, 0)}, {max(bad, C)}]" in str(err.value)
    # without deferral: at once, as before
    with pytest.raises(ValueError, match=f"{type(loss).__name__}: labels must be in 0.."):
        _build(name)(z, y, w)


def test_non_finite_logits_under_deferral_raise_at_verify():
    loss = _build("equilibrium")
    z, y, gt, w = _batch(C + 1)
    z[5, 2] = float("nan")
    with sync_free_paths(), deferred_checks() as pending:
        value = loss(z, y, w)
        assert not torch.isfinite(value)
        with pytest.raises(ValueError, match="EquilibriumLoss: logits contain NaN or infinite values .1 of 40 rows"):
            pending.verify()


def test_mean_score_update_sync_free_equals_cpu_path_and_checks():
    z, y, gt, _ = _batch(C + 1, seed=3)
    gt = torch.where(y < C, gt * 7 + 100, gt)  # sparse, large GT ids
    mem_z, mem_y = torch.randn(5, C + 1, dtype=torch.float64), torch.tensor([1, 1, 4, 6, 0])
    a, b = MeanScoreTracker(C), MeanScoreTracker(C)
    a.update(z, y, gt, extra_logits=mem_z, extra_labels=mem_y)
    with sync_free_paths(), deferred_checks(), HostSyncDetector() as det:
        b.update(z, y, gt, extra_logits=mem_z, extra_labels=mem_y)
    assert det.calls == []
    torch.testing.assert_close(a.mean_score, b.mean_score, rtol=1e-12, atol=1e-15)
    assert not torch.equal(a.mean_score, MeanScoreTracker(C).mean_score)

    mixed = gt.clone()
    fg = torch.nonzero(y < C).flatten()
    mixed[fg[0]] = mixed[fg[2]]  # two RoIs of different classes on one GT (labels differ)
    assert y[fg[0]] != y[fg[2]]
    missing = gt.clone()
    missing[fg[1]] = -1
    for bad_gt, message in ((mixed, "different labels to the same GT"), (missing, "need gt_index >= 0")):
        for forced in (False, True):
            with sync_free_paths(forced), pytest.raises(ValueError, match=message):
                with deferred_checks():
                    MeanScoreTracker(C).update(z, y, bad_gt)


def test_federated_device_draw_is_the_same_distribution():
    """The Gumbel-top-k draw includes every GT class, has the CPU draw's set size, never draws a
    class of weight 0, and includes each class as often as torch.multinomial's draw (10,000 draws)."""
    weight = torch.tensor([4.0, 1.0, 0.0, 2.0, 0.5, 8.0, 1.0], dtype=torch.float64)
    labels = torch.tensor([1, C, 1, C])
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    hits_a, hits_b = torch.zeros(C), torch.zeros(C)
    for _ in range(10_000):
        mask = federated_class_mask(labels, C, weight, 3, gen_a)
        ids = federated_classes(labels, C, weight, 3, gen_b)
        assert bool(mask[1]) and not bool(mask[2]) and int(mask.sum()) == len(ids) == 3
        hits_a += mask.float()
        hits_b[ids] += 1
    torch.testing.assert_close(hits_a / 1e4, hits_b / 1e4, atol=0.025, rtol=0)
    many = torch.tensor([0, 3, 4, 5, 6, C])  # more GT classes than num_fed_classes: all of them
    assert federated_class_mask(many, C, weight, 3).nonzero().flatten().tolist() == [0, 3, 4, 5, 6]


def test_expect_reads_at_once_outside_deferral_and_queues_inside():
    calls = []

    def diagnose():
        calls.append(1)
        raise ValueError("bad thing")

    expect(torch.tensor(True), diagnose)
    with pytest.raises(ValueError, match="bad thing"):
        expect(torch.tensor(False), diagnose)
    with deferred_checks() as pending:
        expect(torch.tensor(False), diagnose)
        assert len(pending) == 1 and len(calls) == 1
        with pytest.raises(ValueError, match="bad thing"):
            pending.verify()
        assert len(pending) == 0
    # a failing check left queued raises when the block ends; finiteness is reported, not raised
    with pytest.raises(ValueError, match="bad thing"):
        with deferred_checks():
            expect(torch.tensor(False), diagnose)
    assert PendingChecks().verify(finite=[torch.tensor([1.0, float("inf")])]) is False
    assert PendingChecks().verify(finite=[torch.tensor(2.0)]) is True
