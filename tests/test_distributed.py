"""DDP helpers in one process, and a real 2-process gloo run compared with 1 process.

The 2-process run uses subprocesses launched like torchrun does (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) running a small worker script. Its model is deterministic (GroupNorm,
per-image mean losses), so 2 processes x batch 2 must match 1 process x batch 4.
"""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from taildet.calibration.logit_norm import LogitNormalizer
from taildet.engine.distributed import init_distributed, sync_loss_state
from taildet.losses.base import mean_over_ranks
from taildet.losses.online_logn import OnlineLogitNormalization
from taildet.utils import comm as D

WORKER = textwrap.dedent('''
    import os, sys
    import torch
    from torch import nn
    import torch.distributed as dist
    from taildet.config import config_from_dict
    from taildet.engine import train, load_checkpoint

    class Set(torch.utils.data.Dataset):
        def __init__(self, n=16, c=3):
            g = torch.Generator().manual_seed(0)
            self.num_classes, self.cat_ids = c, [1, 2, 3]
            self.x = torch.rand(n, 3, 16, 16, generator=g)
            self.y = torch.randint(0, c, (n,), generator=g)
            self.labels_per_image = [[int(v)] for v in self.y]
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            return self.x[i], {"labels": self.y[i:i + 1], "boxes": torch.tensor([[1.0, 2.0, 9.0, 12.0]]),
                               "image_id": i}

    class Ema(nn.Module):
        """Loss state whose DDP reduction is a mean, synced by the engine after each step."""
        def __init__(self, c):
            super().__init__()
            self.register_buffer("ema", torch.zeros(c))
        def update(self, labels):
            f = torch.bincount(labels, minlength=self.ema.numel()).float() / labels.numel()
            self.ema.mul_(0.5).add_(0.5 * f)
        def sync_state(self):
            if dist.is_initialized():
                dist.all_reduce(self.ema)
                self.ema /= dist.get_world_size()

    class Net(nn.Module):
        def __init__(self, c=3):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.cls = nn.Linear(8, c)
            self.box = nn.Linear(8, 4)
            self.loss_state = Ema(c)
        def forward(self, images, targets=None):
            f = self.backbone(torch.stack(images))
            labels = torch.cat([t["labels"] for t in targets])
            self.loss_state.update(labels)
            boxes = torch.cat([t["boxes"] for t in targets]) / 16
            return {"loss_cls": nn.functional.cross_entropy(self.cls(f), labels),
                    "loss_box": nn.functional.smooth_l1_loss(self.box(f), boxes)}

    out_dir, batch = sys.argv[1], int(sys.argv[2])
    cfg = config_from_dict({"data": {"synthetic": {}, "batch_size": batch, "num_workers": 0},
                            "train": {"iterations": 3, "lr": 0.1, "warmup_iters": 1, "device": "cpu",
                                      "log_period": 1, "seed": 0},
                            "eval": {"enabled": False}, "output_dir": out_dir})
    torch.manual_seed(0)
    res = train(cfg, progress=False, model=Net(), train_dataset=Set())
    if dist.is_initialized():
        assert dist.get_world_size() == 2
        dist.destroy_process_group()
    print("done", res["checkpoint"])
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script, out_dir, batch, world, attempts=2):
    """Run the worker on ``world`` processes; retried once (another job on this shared machine may
    grab the rendezvous port between _free_port() and the bind)."""
    for attempt in range(attempts):
        try:
            return _launch_once(script, out_dir, batch, world)
        except AssertionError:
            if attempt == attempts - 1:
                raise


def _launch_once(script, out_dir, batch, world):
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, str(script), str(out_dir), str(batch)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            outs.append(out)
            assert p.returncode == 0, out
    finally:
        for q in procs:
            if q.poll() is None:
                q.kill()
                q.wait()
    return outs


def test_two_process_gloo_matches_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _launch(script, tmp_path / "ddp", batch=2, world=2)
    _launch(script, tmp_path / "single", batch=4, world=1)
    from taildet.engine import load_checkpoint

    a = load_checkpoint(tmp_path / "ddp" / "model_final.pth")
    b = load_checkpoint(tmp_path / "single" / "model_final.pth")
    assert a["world_size"] == 2 and b["world_size"] == 1 and a["iteration"] == b["iteration"] == 3
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    assert float(a["model"]["loss_state.ema"].sum()) > 0
    assert len(a["rng_per_rank"]) == 2
    lines = open(tmp_path / "ddp" / "metrics.jsonl").read().splitlines()
    assert len(lines) == 3  # rank 0 writes alone


# ----------------------------------------------------------------------------- one process


class _Synced(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def sync_state(self):
        self.calls += 1


def test_single_process_helpers():
    assert not D.is_distributed() and D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    assert init_distributed("cpu") is False
    D.barrier()
    t = torch.tensor([1.0, 3.0])
    assert torch.equal(D.all_reduce_mean(t), t) and D.all_reduce_mean(2) == 2.0
    assert D.all_gather_object({"a": 1}) == [{"a": 1}] and D.broadcast_object(5) == 5
    assert D.reduce_loss_dict({"a": torch.tensor(1.5), "b": torch.tensor(2.0)}) == {"a": 1.5, "b": 2.0}
    m = nn.Sequential(nn.Linear(2, 2), _Synced(), nn.Sequential(_Synced()))
    assert sync_loss_state(m) == 2 and m[1].calls == 1
    assert D.unwrap_model(m) is m


def test_single_process_reductions_are_no_ops():
    t = torch.tensor([1.0, 3.0])
    assert D.all_reduce_mean_(t) is t and t.tolist() == [1.0, 3.0]
    assert D.all_true(True) is True and D.all_true(False) is False
    assert mean_over_ranks(t) is t


# ----------------------------------------------------------------------------- helpers, 2 processes


def _helpers_worker(rank: int, world: int, init_method: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        t = torch.tensor([float(rank), 10.0 * rank + 1.0], dtype=torch.float64)
        got = {"mean_": D.all_reduce_mean_(t).clone(), "same_tensor": D.all_reduce_mean_(t) is t,
               "all_true": D.all_true(True), "not_all_true": D.all_true(rank == 0),
               "mean_over_ranks": mean_over_ranks(torch.tensor(float(rank + 1)))}
        online = OnlineLogitNormalization(C_ONLINE, momentum=0.5)
        online.running_mean.fill_(float(rank))
        online.running_var.fill_(1.0 + 2.0 * rank)
        online.sync_state()
        got["online_mean"], got["online_var"] = online.running_mean.clone(), online.running_var.clone()
        ema = LogitNormalizer(C_ONLINE, momentum=0.5)
        ema.update(torch.full((4, C_ONLINE + 1), float(rank)))
        ema.sync()
        got["ema_count"], got["ema_mean"] = ema.count.clone(), ema.mean.clone()
        torch.save(got, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


C_ONLINE = 3


def test_comm_helpers_and_their_users_over_two_gloo_processes(tmp_path):
    out = str(tmp_path / "rank")
    mp.start_processes(_helpers_worker, args=(2, (tmp_path / "rendezvous").as_uri(), out), nprocs=2,
                       start_method="spawn")
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        # the second all_reduce_mean_ of an averaged tensor changes nothing
        assert got["mean_"].tolist() == [0.5, 6.0] and got["same_tensor"]
        assert got["all_true"] is True and got["not_all_true"] is False
        assert float(got["mean_over_ranks"]) == 1.5
        assert torch.equal(got["online_mean"], torch.full((C_ONLINE + 1,), 0.5))
        assert torch.equal(got["online_var"], torch.full((C_ONLINE + 1,), 2.0))
        assert float(got["ema_count"]) == 8.0
    assert torch.equal(torch.load(f"{out}.0")["ema_mean"], torch.load(f"{out}.1")["ema_mean"])


def test_no_torch_distributed_outside_utils_comm():
    """Every collective goes through taildet.utils.comm (issue 14): no other module of the
    package imports torch.distributed."""
    root = Path(__file__).resolve().parents[1] / "src" / "taildet"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "utils" / "comm.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []
