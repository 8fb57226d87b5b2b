"""The engine's DDP set-up for torchrun launches (also correct, as no-ops, in one process).

Launch: ``torchrun --nproc_per_node=N -m taildet train cfg.yaml``. torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed`
reads them and initialises the default process group (``nccl`` on CUDA, ``gloo`` on CPU).
``data.batch_size`` is per process, so the global batch is ``batch_size * WORLD_SIZE``.

The rank / world-size / collective helpers every layer uses are in :mod:`taildet.utils.comm`;
this module holds the engine's parts: the process-group set-up and the per-step sync of the
losses' state.
"""

from __future__ import annotations

import os

import torch

from taildet.losses.base import sync_states
from taildet.models.heads import ClassificationHead
from taildet.utils.comm import init_process_group, is_distributed, unwrap_model

__all__ = ["init_distributed", "sync_loss_state"]


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
    init_process_group(backend, rank, world)
    return True


def sync_loss_state(model: torch.nn.Module) -> int:
    """Call ``sync_state()`` on every submodule that defines it (every classification loss, the
    LogN online statistics, MFS's mean-score observer, ...); returns how many were synced.

    Each stateful module decides how its buffers are reduced (mean of EMAs, sum of accumulators).
    Called by the trainer after every optimizer step under DDP (and safe in one process: the
    losses' ``sync_state`` is a no-op without a process group). A ``ClassificationHead`` is not
    called itself (its ``sync_state`` walks its loss, which this walk reaches anyway).
    """
    return sync_states(unwrap_model(model), skip=(ClassificationHead,))
