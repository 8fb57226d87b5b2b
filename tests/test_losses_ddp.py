"""Two-process (gloo) DDP: the stateful losses hold the same state as one process seeing both batches.

EBL ``mean_score`` (observations gathered across ranks), EQLv2 ``pos_grad`` / ``neg_grad`` /
``pos_neg`` (batch increments summed) and Seesaw ``cum_samples`` (batch counts summed), over two
iterations, so the second iteration also checks that it used the synchronised state.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from taildet.losses import EQLv2Loss, EquilibriumLoss, SeesawLoss
from taildet.losses.state import all_gather_cat, all_reduce_sum_, is_distributed

C = 6
ITERS = 2


def _batch(rank: int, it: int):
    """Rank ``rank``'s batch of iteration ``it``: logits, labels, per-rank GT ids, memory samples."""
    g = torch.Generator().manual_seed(100 * it + rank)
    n = 12 + 5 * rank  # different sizes per rank (variable-length gather)
    num_gt = 3 + rank
    gt_cls = torch.randint(0, C, (num_gt,), generator=g)
    gt = torch.randint(-1, num_gt, (n,), generator=g)
    gt[:num_gt] = torch.arange(num_gt)  # every GT has a positive RoI
    labels = torch.where(gt >= 0, gt_cls[gt.clamp(min=0)], torch.full_like(gt, C))
    z_ebl = torch.randn(n, C + 1, generator=g)
    z_eql = 2 * torch.randn(n, C + 1, generator=g)
    z_ss = torch.randn(n, C + 2, generator=g)
    m = 3 if rank == 0 else 0  # memory samples on rank 0 only (rank 1 observes none)
    mem_z = torch.randn(m, C + 1, generator=g)
    mem_y = torch.randint(0, C, (m,), generator=g)
    return z_ebl, z_eql, z_ss, labels, gt, mem_z, mem_y


def _losses():
    return EquilibriumLoss(C), EQLv2Loss(C), SeesawLoss(C)


def _state(losses) -> dict[str, torch.Tensor]:
    out = {}
    for loss in losses:
        for k, v in loss.state_dict().items():
            out[f"{type(loss).__name__}.{k}"] = v.clone()
    return out


def _worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        assert is_distributed()
        # the helpers themselves
        x = torch.full((2,), float(rank + 1))
        all_reduce_sum_(x)
        assert x.tolist() == [3.0, 3.0]
        cat = all_gather_cat(torch.arange(rank + 1, dtype=torch.float64)[:, None].expand(rank + 1, 2))
        assert cat[:, 0].tolist() == [0.0, 0.0, 1.0]
        empty = all_gather_cat(torch.zeros(0, 3))
        assert empty.shape == (0, 3)

        ebl, eqlv2, seesaw = _losses()
        for it in range(ITERS):
            z_ebl, z_eql, z_ss, labels, gt, mem_z, mem_y = _batch(rank, it)
            ebl.update(z_ebl, labels, gt, extra_logits=mem_z, extra_labels=mem_y)
            eqlv2(z_eql, labels)
            seesaw(z_ss, labels)
        # a last iteration in which rank 1 has no RoIs at all: it still takes part in every collective
        z_ebl, z_eql, z_ss, labels, gt, _, _ = _batch(0, ITERS)
        keep = slice(None) if rank == 0 else slice(0, 0)
        ebl.update(z_ebl[keep], labels[keep], gt[keep])
        eqlv2(z_eql[keep], labels[keep])
        seesaw(z_ss[keep], labels[keep])
        torch.save(_state((ebl, eqlv2, seesaw)), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done: the results are on disk
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without gloo's C++ teardown: its destructors can abort a process at exit ("terminate
    # called without an active exception", SIGABRT) after every result has been written.
    os._exit(0)


def _single_process_state() -> dict[str, torch.Tensor]:
    ebl, eqlv2, seesaw = _losses()
    for it in range(ITERS):
        parts = [_batch(r, it) for r in range(2)]
        offset = int(parts[0][4].max()) + 1  # make rank 1's GT ids unique in the joint batch
        z_ebl = torch.cat([p[0] for p in parts])
        z_eql = torch.cat([p[1] for p in parts])
        z_ss = torch.cat([p[2] for p in parts])
        labels = torch.cat([p[3] for p in parts])
        gt1 = parts[1][4]
        gt = torch.cat([parts[0][4], torch.where(gt1 >= 0, gt1 + offset, gt1)])
        mem_z = torch.cat([p[5] for p in parts])
        mem_y = torch.cat([p[6] for p in parts])
        ebl.update(z_ebl, labels, gt, extra_logits=mem_z, extra_labels=mem_y)
        eqlv2(z_eql, labels)
        seesaw(z_ss, labels)
    z_ebl, z_eql, z_ss, labels, gt, _, _ = _batch(0, ITERS)  # rank 0's last batch (rank 1: empty)
    ebl.update(z_ebl, labels, gt)
    eqlv2(z_eql, labels)
    seesaw(z_ss, labels)
    return _state((ebl, eqlv2, seesaw))


def test_two_process_state_equals_one_process(tmp_path):
    # spawn re-imports this module in the children by its module name: make both names importable
    here = Path(__file__).resolve().parent
    added = [p for p in (str(here), str(here.parent)) if p not in sys.path]
    sys.path[:0] = added
    try:
        mp.spawn(_worker, args=(2, (tmp_path / "rendezvous").as_uri(), str(tmp_path)), nprocs=2, join=True)
    finally:
        for p in added:
            sys.path.remove(p)
    expected = _single_process_state()
    assert expected["EquilibriumLoss.mean_score"][:C].ne(0.01).any()  # something happened
    assert int(expected["SeesawLoss.cum_samples"].sum()) == sum(
        _batch(r, it)[3].numel() for r in range(2) for it in range(ITERS)
    ) + _batch(0, ITERS)[3].numel()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(expected)
        for key, v in expected.items():
            torch.testing.assert_close(got[key], v, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {key}")
