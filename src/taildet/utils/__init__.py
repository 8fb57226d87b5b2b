"""Helpers below every other layer of taildet (no taildet imports besides :mod:`taildet.errors`).

* :mod:`~taildet.utils.comm` -- the ``torch.distributed`` helpers (rank, world size, reductions,
  gathers, broadcasts), no-ops in one process; used by data, losses, sampling and the engine.
"""
