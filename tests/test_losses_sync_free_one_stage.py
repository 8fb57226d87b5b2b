"""The one-stage losses (sigmoid focal, QFL, EFL, EQFL) read no device value on the host where
:func:`taildet.utils.host_sync.avoid_host_sync` holds (issue 18: on CUDA each read is a
synchronisation): forward, backward and EFL / EQFL's state update, checked on the CPU with
:func:`~taildet.utils.host_sync.sync_free_paths` and :class:`~taildet.utils.host_sync.HostSyncDetector`.
The fixed-shape path (every row kept, ignored anchors with zero weight) gives the same values,
gradients and state as the CPU's compacted path, with the fast path (taildet.ops.efl_kernel) on
and off; bad labels are queued by :func:`~taildet.utils.host_sync.deferred_checks` (no crash,
the same error at ``verify``) and raise at once without it."""

from __future__ import annotations

import copy

import pytest
import torch

from taildet.losses import build_loss
from taildet.ops import fast_path
from taildet.utils.host_sync import HostSyncDetector, deferred_checks, sync_free_paths

C = 5
NAMES = ("sigmoid_focal", "quality_focal", "equalized_focal", "equalized_quality_focal")
CLASS_NAMES = {"sigmoid_focal": "SigmoidFocalLoss", "quality_focal": "QualityFocalLoss",
               "equalized_focal": "EqualizedFocalLoss", "equalized_quality_focal": "EqualizedQualityFocalLoss"}
STATE = ([0.5, 0.0, 3.0, 0.1, 2.0], [1.0, 4.0, 1.0, 10.0, 8.0])  # ratios 0.5, 0, 1, 0.01, 0.25
NORMALIZERS = {"default": None, "float": 7.0, "tensor": torch.tensor(3.0, dtype=torch.float64)}


def _loss(name: str, dtype=torch.float64):
    loss = build_loss(name, C).to(dtype)
    if hasattr(loss, "pos_neg_ratio"):  # EFL / EQFL: classes with different focusing factors
        loss.pos_grad.copy_(torch.tensor(STATE[0]))
        loss.neg_grad.copy_(torch.tensor(STATE[1]))
        loss.pos_neg_ratio.copy_((loss.pos_grad / (loss.neg_grad + 1e-10)).clamp(0, 1))
    return loss


def _batch(n: int = 60, seed: int = 0, dtype=torch.float64):
    """Logits ``[n, C]``, labels with positives of every class, negatives and ignored anchors,
    quality ``[n]`` (NaN on the non-positive anchors: neither path may use it)."""
    g = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(n, C, generator=g)).to(dtype)
    labels = torch.randint(-1, C + 1, (n,), generator=g)
    labels[: C + 2] = torch.tensor(list(range(C)) + [C, -1])
    quality = torch.rand(n, generator=g).to(dtype)
    quality[(labels < 0) | (labels == C)] = float("nan")
    return logits, labels, quality


def _state(loss) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in loss.state_dict().items()}


def _step(loss, logits, labels, quality, normalizer, iterations: int = 2):
    """``iterations`` forward + backward passes (a factor 2.5 downstream of the loss): the values,
    the gradients and the state after each."""
    out = []
    for it in range(iterations):
        x = (logits + it).clone().requires_grad_(True)
        value = loss(x, labels, normalizer, quality=quality)
        (2.5 * value).backward()
        out.append((value.detach(), x.grad, _state(loss)))
    return out


def _assert_equal(got, ref, msg: str, rtol=1e-10, atol=1e-12) -> None:
    for it, ((v, g, s), (v_ref, g_ref, s_ref)) in enumerate(zip(got, ref)):
        where = f"{msg}, iteration {it}"
        assert torch.isfinite(v) and torch.isfinite(g).all(), where
        torch.testing.assert_close(v, v_ref, rtol=rtol, atol=atol, msg=where)
        torch.testing.assert_close(g, g_ref, rtol=rtol, atol=atol, msg=where)
        assert s.keys() == s_ref.keys()
        for key in s:  # EFL / EQFL: pos_grad, neg_grad, pos_neg_ratio after the backward
            torch.testing.assert_close(s[key], s_ref[key], rtol=rtol, atol=atol, msg=f"{where}: {key}")


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("norm", sorted(NORMALIZERS))
@pytest.mark.parametrize("name", NAMES)
def test_sync_free_path_reads_nothing_and_equals_the_cpu_path(name, norm, fast):
    base = _loss(name)
    logits, labels, quality = _batch()
    normalizer = NORMALIZERS[norm]
    with fast_path(fast):
        ref = _step(copy.deepcopy(base), logits, labels, quality, normalizer)
        loss = copy.deepcopy(base)
        with sync_free_paths(), deferred_checks() as pending, HostSyncDetector() as det:
            got = _step(loss, logits, labels, quality, normalizer)
        assert det.calls == [], f"{name}: host reads {det.calls}"
        assert pending.verify() is True  # (nothing queued is left: deferred_checks verified it)
    _assert_equal(got, ref, f"{name} / {norm} / {'fast' if fast else 'plain'}")
    # the ignored anchors get no gradient in either path
    ignored = labels < 0
    assert torch.count_nonzero(got[0][1][ignored]) == 0
    if hasattr(base, "pos_grad"):
        assert not torch.equal(got[-1][2]["pos_grad"], base.pos_grad)  # the state did change


def test_the_detector_sees_the_cpu_path():
    """The detector is not vacuous: the compacted CPU path reads the masks on the host."""
    logits, labels, quality = _batch()
    for name in NAMES:
        with deferred_checks(), HostSyncDetector() as det:
            _step(_loss(name), logits, labels, quality, None, iterations=1)
        assert det.calls, name


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("name", NAMES)
def test_sync_free_without_grad_and_in_float32(name, fast):
    logits, labels, quality = _batch(seed=3, dtype=torch.float32)
    with fast_path(fast):
        with torch.no_grad():
            ref = _loss(name, torch.float32)(logits, labels, 4.0, quality=quality)
            with sync_free_paths(), deferred_checks(), HostSyncDetector() as det:
                got = _loss(name, torch.float32)(logits, labels, 4.0, quality=quality)
        assert det.calls == []
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        ref = _step(_loss(name, torch.float32), logits, labels, quality, None)
        with sync_free_paths(), deferred_checks(), HostSyncDetector() as det:
            got = _step(_loss(name, torch.float32), logits, labels, quality, None)
        assert det.calls == []
    _assert_equal(got, ref, name, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["equalized_focal", "equalized_quality_focal"])
def test_sync_free_state_under_a_grad_scale_and_with_no_positive(name):
    """GradScaler's scale divides the accumulated gradients in both paths; a batch of negatives
    and ignored anchors only adds to neg_grad, and the ignored anchors add nothing."""
    logits, _, quality = _batch(seed=5)
    labels = torch.tensor([C, -1] * 30)
    base = _loss(name)
    base.before_backward(1024.0)
    ref = _step(copy.deepcopy(base), logits, labels, quality, None)
    with sync_free_paths(), deferred_checks(), HostSyncDetector() as det:
        got = _step(copy.deepcopy(base), logits, labels, quality, None)
    assert det.calls == []
    _assert_equal(got, ref, name)
    torch.testing.assert_close(got[0][2]["pos_grad"], base.pos_grad)  # no positive entry
    # neg_grad grew by |g| of the negative anchors only (g of the loss itself: 2.5 x / 1024)
    negatives = labels == C
    grown = got[0][2]["neg_grad"] - base.neg_grad
    torch.testing.assert_close(grown, got[0][1][negatives].abs().sum(0) / 1024.0)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("name", ["equalized_focal", "equalized_quality_focal"])
def test_sync_free_multilabel(name, fast):
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(16, C, generator=g, dtype=torch.float64) * 2
    targets = (torch.rand(16, C, generator=g) > 0.6).double()
    targets[0], targets[1] = 1.0, 0.0
    quality = torch.rand(16, C, generator=g, dtype=torch.float64)
    quality[targets == 0] = float("nan")  # unused off the positive entries
    base = _loss(name)
    out = []
    for sync_free in (False, True):
        loss = copy.deepcopy(base)
        x = logits.clone().requires_grad_(True)
        with fast_path(fast), sync_free_paths(sync_free), deferred_checks(), HostSyncDetector() as det:
            value = loss.forward_multilabel(x, targets, quality=quality)
            value.backward()
        assert bool(det.calls) is not sync_free, det.calls  # nonzero on the CPU path only
        out.append([(value.detach(), x.grad, _state(loss))])
    _assert_equal(out[1], out[0], name)
    with sync_free_paths(), deferred_checks() as pending, HostSyncDetector() as det:
        _loss(name).forward_multilabel(logits.clone().requires_grad_(True), targets * 0.5).backward()
        assert det.calls == []
        with pytest.raises(ValueError, match=r"forward_multilabel: targets must be 0 or 1"):
            pending.verify()


@pytest.mark.parametrize("bad", [7, -2])
@pytest.mark.parametrize("name", NAMES)
def test_bad_labels_are_queued_under_deferred_checks(name, bad):
    logits, labels, quality = _batch()
    labels[10] = bad
    loss = _loss(name)
    x = logits.clone().requires_grad_(True)
    with sync_free_paths(), deferred_checks() as pending, HostSyncDetector() as det:
        value = loss(x, labels, quality=quality)
        value.backward()  # no kernel indexed out of bounds: the labels were clamped
        assert det.calls == []
        assert len(pending) == 1
        lo, hi = min(bad, -1), max(bad, C)
        with pytest.raises(ValueError, match=rf"{CLASS_NAMES[name]}: labels must be in -1\.\.{C} "
                                             rf"\(-1 ignored, {C} negative\), got values in {lo}\.\.{hi}"):
            pending.verify()


@pytest.mark.parametrize("sync_free", [False, True], ids=["cpu_path", "sync_free_path"])
@pytest.mark.parametrize("bad", [7, -2])
@pytest.mark.parametrize("name", NAMES)
def test_bad_labels_raise_at_once_without_deferral(name, bad, sync_free):
    logits, labels, quality = _batch()
    labels[10] = bad
    lo, hi = min(bad, -1), max(bad, C)
    with sync_free_paths(sync_free):
        with pytest.raises(ValueError, match=rf"{CLASS_NAMES[name]}: labels must be in -1\.\.{C} .*"
                                             rf"got values in {lo}\.\.{hi}"):
            _loss(name)(logits, labels, quality=quality)


@pytest.mark.parametrize("name", NAMES)
def test_sync_free_edge_batches(name):
    """No anchor, every anchor ignored, only positives: equal to the CPU path, no host read."""
    z, _, q = _batch(n=12, seed=9)
    q = q.nan_to_num(0.5)
    cases = {"no_anchors": (z[:0], torch.zeros(0, dtype=torch.long), q[:0]),
             "all_ignored": (z, torch.full((12,), -1), q),
             "only_positives": (z, torch.arange(12) % C, q)}
    for case, (logits, labels, quality) in cases.items():
        ref = _step(_loss(name), logits, labels, quality, None, iterations=1)
        with sync_free_paths(), deferred_checks(), HostSyncDetector() as det:
            got = _step(_loss(name), logits, labels, quality, None, iterations=1)
        assert det.calls == [], f"{name} / {case}: {det.calls}"
        _assert_equal(got, ref, f"{name} / {case}")
