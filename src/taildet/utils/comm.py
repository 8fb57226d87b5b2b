"""``torch.distributed`` helpers, correct as no-ops in one process (no process group).

Every layer of taildet that talks to other processes imports them from here: the losses (DDP
reductions of their state), the samplers, MFS's pre-fill, the engine. Setting up the process
group from torchrun's environment is :func:`taildet.engine.distributed.init_distributed`.

Every process must call a collective at the same point of the same iteration. With the ``nccl``
backend tensors travel through the current CUDA device, with ``gloo`` through the host; results
come back on the input's device (and dtype).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from taildet.errors import TaildetError

__all__ = [
    "is_distributed",
    "get_rank",
    "get_local_rank",
    "get_world_size",
    "world_size",
    "is_main_process",
    "barrier",
    "init_process_group",
    "comm_device",
    "all_reduce_mean",
    "all_reduce_sum_",
    "all_reduce_mean_",
    "all_true",
    "all_gather_cat",
    "all_gather_object",
    "broadcast_object",
    "main_process_check",
    "reduce_loss_dict",
    "unwrap_model",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and its default process group initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


#: The losses' name for :func:`get_world_size`.
world_size = get_world_size


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", get_rank() if is_distributed() else 0))


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_process_group(backend: str, rank: int, world_size: int) -> None:
    """Initialise the default process group (``env://``: ``MASTER_ADDR`` / ``MASTER_PORT`` from
    the environment). :func:`taildet.engine.distributed.init_distributed` calls it with
    torchrun's ``RANK`` / ``WORLD_SIZE``."""
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)


def comm_device() -> torch.device:
    """The device collectives go through: the current CUDA device under ``nccl``, else the host."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """Mean over processes of a tensor (returns a new tensor) or a number (returns a float)."""
    if not is_distributed():
        return value.clone() if isinstance(value, torch.Tensor) else float(value)
    if isinstance(value, torch.Tensor):
        t = value.detach().clone().to(comm_device())
        dist.all_reduce(t)
        return (t / get_world_size()).to(value.device)
    t = torch.tensor(float(value), dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return float(t.item()) / get_world_size()


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all processes, in place; returns it. No-op in one process."""
    if not is_distributed() or get_world_size() == 1:
        return tensor
    dev = comm_device()
    if tensor.device == dev and tensor.is_contiguous():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    buf = tensor.detach().to(dev).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    with torch.no_grad():
        tensor.copy_(buf)
    return tensor


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over all processes, in place (the sum divided by the world size);
    returns it. No-op in one process."""
    if not is_distributed() or get_world_size() == 1:
        return tensor
    all_reduce_sum_(tensor)
    with torch.no_grad():
        tensor /= get_world_size()
    return tensor


def all_true(flag: bool) -> bool:
    """True when ``flag`` is true on every process (a MIN reduction: the same answer everywhere);
    ``flag`` itself in one process."""
    if not is_distributed() or get_world_size() == 1:
        return bool(flag)
    t = torch.tensor(1.0 if flag else 0.0, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` ([n_r, ...], ``n_r`` may differ per process) over processes, rank order.

    The trailing dimensions and the dtype must agree on every process. Returns ``tensor`` itself in
    one process.
    """
    if not is_distributed() or get_world_size() == 1:
        return tensor
    ws = get_world_size()
    dev = comm_device()
    local = tensor.detach().to(dev).contiguous()
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    top = max(counts)
    if top == 0:
        return tensor[:0]
    if local.shape[0] < top:
        pad = local.new_zeros((top - local.shape[0],) + tuple(local.shape[1:]))
        local = torch.cat([local, pad])
    parts = [torch.empty_like(local) for _ in range(ws)]
    dist.all_gather(parts, local)
    out = torch.cat([p[:c] for p, c in zip(parts, counts)])
    return out.to(tensor.device)


def all_gather_object(obj: Any) -> list[Any]:
    """A list with every process's ``obj`` (rank order); ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_process_check(check: Any, *args: Any, **kwargs: Any) -> None:
    """Run ``check(*args, **kwargs)`` on rank 0 only (it touches the filesystem or is costly) and
    raise its :class:`~taildet.errors.TaildetError` on every rank, so that no process goes on to
    wait in a collective for one that has stopped."""
    error = None
    if is_main_process():
        try:
            check(*args, **kwargs)
        except TaildetError as e:
            error = e
    error = broadcast_object(error)
    if error is not None:
        raise error


def reduce_loss_dict(loss_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss terms averaged over processes, as floats (for logging)."""
    names = sorted(loss_dict)
    if not names:
        return {}
    values = torch.stack([loss_dict[k].detach().float().reshape(()) for k in names])
    if is_distributed():
        values = values.to(comm_device())
        dist.all_reduce(values)
        values = values / get_world_size()
    return {k: float(v) for k, v in zip(names, values.cpu().tolist())}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel wrappers."""
    while hasattr(model, "module") and isinstance(
        model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model
