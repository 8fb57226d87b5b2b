"""Issue 18 on a GPU: no host synchronisation inside a loss on CUDA.

Every long-tail loss (and the baselines it is compared with) runs a training iteration -- its
state update, forward and backward, with the fast path on and off, in float32 and under AMP --
inside ``deferred_checks()`` with ``torch.cuda.set_sync_debug_mode("error")``: any
synchronisation raises. The checks queued by the losses are then read with one ``verify()``
(the trainer's host read). Skipped without a CUDA device (CI has none); ``benchmarks/gpu_suite.sh``
runs it. ``tests/test_losses_sync_free.py`` and ``tests/test_losses_sync_free_one_stage.py`` check
the same code paths on the CPU with ``HostSyncDetector``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from taildet.losses import build_loss
from taildet.ops import fast_path
from taildet.utils.host_sync import deferred_checks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

C = 1203
N_ROI = 1024
N_ANCHOR = 20_000


def _freq():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(C, generator=g).pow(6).clamp(min=1e-4, max=0.5)
    counts = (f * 1e5).round().clamp(min=1.0)
    return {"image_frequency": f.tolist(), "instance_counts": counts.tolist()}


TWO_STAGE = {
    "softmax_ce": (), "balanced_softmax": ("instance_counts",), "balanced_sigmoid": ("image_frequency",),
    "equilibrium": (), "eql": ("image_frequency",), "eqlv2": (), "seesaw": (), "federated": ("image_frequency",),
}
ONE_STAGE = ("sigmoid_focal", "equalized_focal", "quality_focal", "equalized_quality_focal")


@contextlib.contextmanager
def _no_sync():
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _two_stage_batch(k, device):
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(N_ROI, k, device=device, generator=g)
    labels = torch.randint(0, C + 1, (N_ROI,), device=device, generator=g)
    labels[: 3 * N_ROI // 4] = C  # 25 % foreground, as the RoI sampler
    gt_index = torch.where(labels < C, torch.arange(N_ROI, device=device) // 4, torch.full_like(labels, -1))
    labels = torch.where(labels < C, labels[torch.arange(N_ROI, device=device) // 4 * 4].clamp(max=C - 1), labels)
    labels = torch.where(gt_index >= 0, labels, torch.full_like(labels, C))
    return logits, labels, gt_index


def _iteration(loss, logits, labels, gt_index, amp):
    z = logits.clone().requires_grad_(True)
    with torch.autocast("cuda", enabled=amp):
        loss.update(z.detach(), labels, gt_index)
        value = loss(z.half() if amp else z, labels)
    value.backward()
    return value


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "plain"])
@pytest.mark.parametrize("name", sorted(TWO_STAGE))
def test_two_stage_loss_does_not_synchronise(name, fast, amp):
    stats = _freq()
    loss = build_loss(name, C, **{k: stats[k] for k in TWO_STAGE[name]}).cuda().train()
    logits, labels, gt_index = _two_stage_batch(loss.num_outputs(), "cuda")
    with fast_path(fast, "cuda"):
        with deferred_checks():
            _iteration(loss, logits, labels, gt_index, amp)  # warm-up (lazy initialisation)
        with deferred_checks() as pending:
            with _no_sync():
                value = _iteration(loss, logits, labels, gt_index, amp)
            assert pending.verify(finite=[value])


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
@pytest.mark.parametrize("name", ONE_STAGE)
def test_one_stage_loss_does_not_synchronise(name, amp):
    loss = build_loss(name, C).cuda().train()
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(N_ANCHOR, C, device="cuda", generator=g) - 4.0
    labels = torch.full((N_ANCHOR,), C, device="cuda")
    labels[:200] = torch.randint(0, C, (200,), device="cuda", generator=g)
    labels[200:400] = -1  # ignored anchors
    quality = torch.rand(N_ANCHOR, device="cuda", generator=g)

    def iteration():
        z = logits.clone().requires_grad_(True)
        with torch.autocast("cuda", enabled=amp):
            value = loss(z.half() if amp else z, labels, quality=quality)
        loss.before_backward(1.0)
        value.backward()
        return value

    with deferred_checks():
        iteration()
    with deferred_checks() as pending:
        with _no_sync():
            value = iteration()
        assert pending.verify(finite=[value])


def test_bad_labels_on_cuda_raise_the_loss_error_at_verify():
    """Under deferral a bad label neither synchronises nor trips a device-side assert: the loss
    computes on clamped labels and the queued check raises its clear error at verify()."""
    loss = build_loss("equilibrium", C).cuda().train()
    logits, labels, gt_index = _two_stage_batch(C + 1, "cuda")
    labels[0] = C + 5
    with pytest.raises(ValueError, match=r"EquilibriumLoss: labels must be in 0\.\.1203"):
        with deferred_checks() as pending:
            with _no_sync():
                loss(logits, labels)
            pending.verify()
    torch.cuda.synchronize()  # the CUDA context is still healthy
