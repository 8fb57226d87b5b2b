"""taildet.ops: the row-blocked fast paths equal the plainly written losses (values, gradients,
state updates) over several shapes, block sizes and thread counts; the keyed work-buffer pool;
the per-device selection."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from taildet.losses import BalancedSigmoidLoss, BalancedSoftmaxLoss, EQLLoss, EQLv2Loss, EquilibriumLoss, SeesawLoss
from taildet.ops import fast_path, set_fast_path, use_fast_path
from taildet.ops import pool as pool_mod
from taildet.ops import rowwise

C = 6


def _losses() -> dict[str, torch.nn.Module]:
    ebl = EquilibriumLoss(C)
    ebl.mean_score.copy_(torch.tensor([0.6, 0.3, 0.05, 1e-4, 0.9, 0.02, 0.01]))
    seesaw = SeesawLoss(C)
    seesaw.cum_samples.copy_(torch.tensor([300, 5, 80, 1, 900, 2, 5000]))
    eqlv2 = EQLv2Loss(C)
    eqlv2.pos_neg.copy_(torch.tensor([0.05, 0.9, 1.4, 0.0, 2.0, 0.7, 100.0]))
    freq = [0.4, 0.2, 0.009, 0.3, 0.001, 0.0005]
    return {
        "equilibrium": ebl,
        "balanced_softmax": BalancedSoftmaxLoss(C, [500.0, 90.0, 40.0, 12.0, 2.0, 1.0]),
        "balanced_sigmoid": BalancedSigmoidLoss(C, freq),
        "eql": EQLLoss(C, freq, lambda_=0.01),
        "eqlv2": eqlv2,
        "seesaw": seesaw,
    }


def _inputs(n: int, k: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = (3.0 * torch.randn(n, k, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, C + 1, (n,), generator=g)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    if n > 2:
        w[1] = 0.0
    return z, y, w


def _value_and_grad(loss, z, y, w):
    t = z.detach().clone().requires_grad_(True)
    out = loss(t, y, w)
    (g,) = torch.autograd.grad(2.5 * out, t)
    return out.detach(), g


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(_losses()))
@pytest.mark.parametrize("num_threads", [1, 2])
def test_fast_path_equals_plain_values_and_gradients(name, num_threads, threads, monkeypatch):
    threads(num_threads)
    loss = _losses()[name].eval()  # no state change between evaluations
    k = loss.num_outputs()
    for seed, n in enumerate((1, 5, 37, 300)):
        z, y, w = _inputs(n, k, seed)
        for weight in (None, w):
            for rows_per_block in (None, 1, 4):
                with monkeypatch.context() as m:
                    if rows_per_block is not None:
                        m.setattr(rowwise, "BLOCK_BYTES", 4 * k * rows_per_block)
                    with fast_path(True):
                        v_fast, g_fast = _value_and_grad(loss, z, y, weight)
                with fast_path(False):
                    v_plain, g_plain = _value_and_grad(loss, z, y, weight)
                msg = f"{name} n={n} weighted={weight is not None} rows_per_block={rows_per_block}"
                torch.testing.assert_close(v_fast, v_plain, rtol=1e-12, atol=1e-12, msg=msg)
                torch.testing.assert_close(g_fast, g_plain, rtol=1e-10, atol=1e-12, msg=msg)


@pytest.mark.parametrize("name", sorted(_losses()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fast_path_equals_plain_in_lower_precision(name, dtype):
    loss = _losses()[name].eval()
    z, y, w = _inputs(29, loss.num_outputs(), 7, dtype)
    w = w.float()
    with fast_path(True):
        v_fast, g_fast = _value_and_grad(loss, z, y, w)
    with fast_path(False):
        v_plain, g_plain = _value_and_grad(loss, z, y, w)
    assert v_fast.dtype == v_plain.dtype == torch.float32 and g_fast.dtype == g_plain.dtype == dtype
    torch.testing.assert_close(v_fast, v_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fast.float(), g_plain.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["eqlv2", "seesaw"])
def test_fast_path_equals_plain_state_updates(name):
    """In training mode EQLv2's gradient statistics and Seesaw's counts update the same way."""
    base = _losses()[name].train()
    fast, plain = copy.deepcopy(base), copy.deepcopy(base)
    for seed in range(3):
        z, y, w = _inputs(40, base.num_outputs(), 10 + seed)
        with fast_path(True):
            v_fast, g_fast = _value_and_grad(fast, z, y, w)
        with fast_path(False):
            v_plain, g_plain = _value_and_grad(plain, z, y, w)
        torch.testing.assert_close(v_fast, v_plain, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_fast, g_plain, rtol=1e-10, atol=1e-12)
    for (key, a), (_, b) in zip(fast.state_dict().items(), plain.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=key)


def test_fast_path_selection_per_device():
    assert use_fast_path("cpu") and use_fast_path(torch.device("cuda", 0))
    assert not use_fast_path("meta")  # any other device type: the plain form
    with fast_path(False):
        assert not use_fast_path("cpu") and use_fast_path("cuda")
    assert use_fast_path("cpu")
    before = set_fast_path("cuda", False)
    try:
        assert before is True and not use_fast_path("cuda:1")
    finally:
        set_fast_path("cuda", before)


def test_keyed_pool_reuses_by_name_dtype_and_device():
    s = pool_mod.Scratch()
    cpu = torch.device("cpu")
    a = s.empty((4, 6), torch.float32, cpu, "pool_test_x")
    b = s.empty((2, 6), torch.float32, cpu, "pool_test_x")          # smaller: a view of the same buffer
    c = s.empty((4, 6), torch.float32, cpu, "pool_test_y")         # another name: another buffer
    d = s.empty((4, 6), torch.float64, cpu, "pool_test_x")          # another dtype: another buffer
    assert a.data_ptr() == b.data_ptr() and len({a.data_ptr(), c.data_ptr(), d.data_ptr()}) == 3
    assert b.shape == (2, 6) and b.is_contiguous() and d.dtype == torch.float64
    # the pool persists across Scratch objects of one thread (CPU), and grows when asked for more
    again = pool_mod.Scratch().empty((3, 6), torch.float32, cpu, "pool_test_x")
    assert again.data_ptr() == a.data_ptr()
    big = pool_mod.Scratch().empty((10, 6), torch.float32, cpu, "pool_test_x")
    assert big.shape == (10, 6) and pool_mod.Scratch().empty((1,), torch.float32, cpu, "pool_test_x").data_ptr() \
        == big.data_ptr()
    key = pool_mod.pool_key("pool_test_x", torch.float32, cpu)
    assert pool_mod.Scratch.thread_pool()[key].numel() == 60


def test_keyed_pool_is_per_thread_and_keeps_only_block_sized_buffers():
    cpu = torch.device("cpu")
    here = pool_mod.Scratch().empty((8,), torch.float32, cpu, "per_thread").data_ptr()
    seen = []

    def other():
        t = pool_mod.Scratch().empty((8,), torch.float32, cpu, "per_thread")
        seen.append((t.data_ptr(), pool_mod.Scratch().empty((8,), torch.float32, cpu, "per_thread").data_ptr()))

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert seen[0][0] == seen[0][1] != here
    small = pool_mod.Scratch(max_block_bytes=16)
    x = small.empty((100,), torch.float32, cpu, "too_big")      # 400 bytes > 2 * 16: not kept
    assert x.shape == (100,) and pool_mod.pool_key("too_big", torch.float32, cpu) not in pool_mod.Scratch.thread_pool()


def test_two_threads_evaluating_losses_concurrently_match_one_thread():
    losses = _losses()
    for loss in losses.values():
        loss.eval()
    jobs = [(name, _inputs(300, loss.num_outputs(), 20 + i)) for i, (name, loss) in enumerate(sorted(losses.items()))]
    alone = {name: _value_and_grad(losses[name], z, y, w) for name, (z, y, w) in jobs}
    got: dict[str, tuple] = {}

    def run(part):
        for name, (z, y, w) in part:
            for _ in range(3):
                got[name] = _value_and_grad(losses[name], z, y, w)

    ts = [threading.Thread(target=run, args=(jobs[i::2],)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for name in alone:
        torch.testing.assert_close(got[name][0], alone[name][0], rtol=0, atol=0)
        torch.testing.assert_close(got[name][1], alone[name][1], rtol=0, atol=0)
