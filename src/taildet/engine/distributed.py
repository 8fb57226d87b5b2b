"""torch.distributed helpers for torchrun launches (also correct, as no-ops, in one process).

Launch: ``torchrun --nproc_per_node=N -m taildet train cfg.yaml``. torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed`
reads them and initialises the default process group (``nccl`` on CUDA, ``gloo`` on CPU).
``data.batch_size`` is per process, so the global batch is ``batch_size * WORLD_SIZE``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from taildet.losses.base import sync_states
from taildet.models.heads import ClassificationHead

__all__ = [
    "init_distributed",
    "is_distributed",
    "get_rank",
    "get_local_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "all_reduce_mean",
    "all_gather_object",
    "broadcast_object",
    "main_process_check",
    "reduce_loss_dict",
    "sync_loss_state",
    "unwrap_model",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", get_rank() if is_distributed() else 0))


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device: str = "auto") -> bool:
    """Initialise the default process group from torchrun's environment when ``WORLD_SIZE > 1``.

    Returns True when running distributed. Idempotent. On CUDA each process uses GPU
    ``LOCAL_RANK``. ``device`` is ``auto`` / ``cpu`` / ``cuda`` (picks the backend).
    """
    if is_distributed():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """Mean over processes of a tensor (returns a new tensor) or a number (returns a float)."""
    if not is_distributed():
        return value.clone() if isinstance(value, torch.Tensor) else float(value)
    if isinstance(value, torch.Tensor):
        t = value.detach().clone().to(_comm_device())
        dist.all_reduce(t)
        return (t / get_world_size()).to(value.device)
    t = torch.tensor(float(value), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item()) / get_world_size()


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
    from taildet.errors import TaildetError

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
        values = values.to(_comm_device())
        dist.all_reduce(values)
        values = values / get_world_size()
    return {k: float(v) for k, v in zip(names, values.cpu().tolist())}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel wrappers."""
    while hasattr(model, "module") and isinstance(
        model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def sync_loss_state(model: torch.nn.Module) -> int:
    """Call ``sync_state()`` on every submodule that defines it (every classification loss, the
    LogN online statistics, MFS's mean-score observer, ...); returns how many were synced.

    Each stateful module decides how its buffers are reduced (mean of EMAs, sum of accumulators).
    Called by the trainer after every optimizer step under DDP (and safe in one process: the
    losses' ``sync_state`` is a no-op without a process group). A ``ClassificationHead`` is not
    called itself (its ``sync_state`` walks its loss, which this walk reaches anyway).
    """
    return sync_states(unwrap_model(model), skip=(ClassificationHead,))
