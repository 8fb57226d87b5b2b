"""EFL / EQFL state under DDP: two gloo processes (torch.multiprocessing.spawn), each training a
DDP-wrapped linear classifier on its half of every batch, end with the same gradient statistics
(and parameters) as one process that sees both halves."""

from __future__ import annotations

import sys
import textwrap

import torch
import torch.multiprocessing as mp
from torch import nn

from taildet.losses.equalized_focal import EqualizedFocalLoss, EqualizedQualityFocalLoss

C, D, B, ITERS, WORLD = 4, 6, 10, 3, 2

# The worker lives in a module written to tmp_path: spawned children import it by name, which a
# pytest test module (imported in importlib mode) cannot guarantee.
WORKER = textwrap.dedent(
    """
    import os

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from taildet.losses.equalized_focal import EqualizedFocalLoss, EqualizedQualityFocalLoss


    def worker(rank, world, init_method, data_path, out_path):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
        try:
            data = torch.load(data_path, weights_only=True)
            torch.manual_seed(0)
            model = DistributedDataParallel(nn.Linear(data["x"].shape[-1], data["c"]).double())
            losses = [EqualizedFocalLoss(data["c"]).double(), EqualizedQualityFocalLoss(data["c"]).double()]
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            for it in range(data["x"].shape[0]):
                x, y, q = data["x"][it, rank], data["y"][it, rank], data["q"][it, rank]
                logits = model(x)
                total = losses[0](logits, y) + losses[1](logits, y, quality=q)
                opt.zero_grad()
                total.backward()
                opt.step()
            if rank == 0:
                torch.save({"efl": losses[0].state_dict(), "eqfl": losses[1].state_dict(),
                            "model": model.module.state_dict()}, out_path)
            dist.barrier()  # both ranks done: the results are on disk
        except BaseException:
            dist.destroy_process_group()
            raise
        # Leave without gloo's C++ teardown: its destructors can abort a process at exit ("terminate
        # called without an active exception", SIGABRT) after every result has been written, which
        # spawn reports as a failure that has nothing to do with what is tested.
        os._exit(0)
    """
)


def _data() -> dict:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(-1, C + 1, (ITERS, WORLD, B), generator=g)
    y[:, 1, :3] = torch.tensor([0, 1, 2])  # ranks with different numbers of positives
    return {
        "x": torch.randn(ITERS, WORLD, B, D, generator=g, dtype=torch.float64),
        "y": y,
        "q": torch.rand(ITERS, WORLD, B, generator=g, dtype=torch.float64),
        "c": C,
    }


def _one_process(data: dict) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(D, C).double()
    losses = [EqualizedFocalLoss(C).double(), EqualizedQualityFocalLoss(C).double()]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for it in range(ITERS):
        x, y, q = data["x"][it].reshape(-1, D), data["y"][it].reshape(-1), data["q"][it].reshape(-1)
        logits = model(x)
        total = losses[0](logits, y) + losses[1](logits, y, quality=q)
        opt.zero_grad()
        total.backward()
        opt.step()
    return {"efl": losses[0].state_dict(), "eqfl": losses[1].state_dict(), "model": model.state_dict()}


def test_two_process_ddp_state_equals_one_process(tmp_path, monkeypatch) -> None:
    (tmp_path / "efl_ddp_worker.py").write_text(WORKER)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("efl_ddp_worker", None)
    import efl_ddp_worker

    data = _data()
    data_path, out_path = tmp_path / "data.pt", tmp_path / "out.pt"
    torch.save(data, data_path)
    mp.spawn(efl_ddp_worker.worker, args=(WORLD, (tmp_path / "rendezvous").as_uri(), str(data_path), str(out_path)), nprocs=WORLD, join=True)
    got = torch.load(out_path, weights_only=True)
    ref = _one_process(data)
    for part in ("efl", "eqfl", "model"):
        for key, value in ref[part].items():
            torch.testing.assert_close(got[part][key], value, msg=f"{part}.{key}")
    # the state really moved away from its initial values
    assert not torch.allclose(ref["efl"]["pos_neg_ratio"], torch.ones(C, dtype=torch.float64))
