"""Keeping the host out of the GPU's way: deferred input checks and sync-free code paths.

On CUDA every value the host reads from a device tensor (``.item()``, ``bool(t)``, ``.tolist()``,
``nonzero``, boolean-mask indexing, ``bincount``, ``unique``) waits for the GPU to finish all the
work queued before it: the CPU stops queueing kernels and the GPU then idles while the host catches
up. A training step already has one such read (the trainer's non-finite-loss check, as detectron2
has); the losses must add none. Three tools:

* :func:`deferred_checks` -- a context in which a loss's input checks (label range, finite logits,
  consistent ``gt_index``) are *queued* as 0-d boolean device tensors (:func:`expect`) instead of
  being read at once. :meth:`PendingChecks.verify` reads all of them, with the trainer's own
  finiteness flags, in one host read, and raises the first failing check's ``ValueError`` (the same
  message as without deferral). Outside the context (the default, e.g. a loss called by hand) every
  check is read at once, as before.
* :func:`avoid_host_sync` -- whether a tensor's code path must not read device values: True on any
  device but the CPU, where the faster variants that compact rows with ``nonzero`` are kept. Tests
  force the sync-free variants on the CPU with :func:`sync_free_paths` and check them equal.
* :class:`HostSyncDetector` -- a dispatch mode that records every aten operator that reads device
  values on the host (on CUDA: a synchronisation), so a test on the CPU can prove a code path free
  of them. On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` checks the real thing
  (``tests/test_cuda_sync.py``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["avoid_host_sync", "sync_free_paths", "deferred_checks", "checks_deferred", "expect", "PendingChecks",
           "HostSyncDetector"]

_LOCAL = threading.local()


def _stack() -> list[PendingChecks]:
    stack = getattr(_LOCAL, "checks", None)
    if stack is None:
        stack = _LOCAL.checks = []
    return stack


_FORCE_SYNC_FREE = {"cpu": False}


def avoid_host_sync(t: Tensor) -> bool:
    """Whether code running on ``t``'s device must not read device values on the host (True on
    every device but the CPU, and on the CPU inside :func:`sync_free_paths`)."""
    return t.device.type != "cpu" or _FORCE_SYNC_FREE["cpu"]


@contextlib.contextmanager
def sync_free_paths(enabled: bool = True) -> Iterator[None]:
    """``with sync_free_paths(): ...`` -- take the GPU's sync-free code paths on the CPU too (tests
    check them equal to the CPU paths and free of host reads)."""
    before = _FORCE_SYNC_FREE["cpu"]
    _FORCE_SYNC_FREE["cpu"] = bool(enabled)
    try:
        yield
    finally:
        _FORCE_SYNC_FREE["cpu"] = before


class PendingChecks:
    """Checks queued by :func:`expect` inside :func:`deferred_checks`: ``(ok, diagnose)`` pairs,
    ``ok`` a 0-d boolean tensor, ``diagnose()`` the function that raises the clear error (it may
    read device values: it runs only when something is wrong)."""

    def __init__(self) -> None:
        self.items: list[tuple[Tensor, Callable[[], None]]] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, ok: Tensor, diagnose: Callable[[], None]) -> None:
        self.items.append((ok.reshape(()), diagnose))

    def verify(self, finite: Sequence[Tensor] = ()) -> bool:
        """Read every queued check and ``isfinite`` of every tensor in ``finite`` in one host read.

        Raises the first failing check's error (its ``diagnose``); returns whether every tensor in
        ``finite`` is finite. The queue is empty afterwards."""
        items, self.items = self.items, []
        flags = [ok.to(torch.bool) for ok, _ in items] + [torch.isfinite(t.detach()).all() for t in finite]
        if not flags:
            return True
        devices = {f.device for f in flags}
        if len(devices) > 1:
            flags = [f.cpu() for f in flags]
        values = torch.stack(flags).tolist()
        for (ok, diagnose), value in zip(items, values):
            if not value:
                diagnose()
        return all(values[len(items):])


@contextlib.contextmanager
def deferred_checks() -> Iterator[PendingChecks]:
    """Queue the losses' input checks instead of reading them at once (module docstring); the
    caller reads them with :meth:`PendingChecks.verify`, and whatever is still queued when the
    block ends normally is verified then (no check is ever dropped)."""
    pending = PendingChecks()
    stack = _stack()
    stack.append(pending)
    ok = False
    try:
        yield pending
        ok = True
    finally:
        stack.pop()
        if ok and len(pending):
            pending.verify()


def checks_deferred() -> bool:
    """Whether :func:`expect` queues (inside :func:`deferred_checks`) rather than reads at once."""
    return bool(_stack())


def expect(ok: Tensor, diagnose: Callable[[], None]) -> None:
    """A check: ``ok`` (a 0-d boolean tensor) must be true, else ``diagnose()`` raises the error.
    Inside :func:`deferred_checks` the check is queued (no host read); outside it is read now."""
    stack = _stack()
    if stack:
        stack[-1].add(ok, diagnose)
    elif not bool(ok):
        diagnose()


# --------------------------------------------------------------------------------------------
# detection of host reads (tests)

_READS = {"_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
          "bincount", "masked_select", "masked_scatter"}
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_to_copy_noop",
              "set_", "resize_", "_local_scalar_dense"}
_MAYBE_READS = {"index", "index_put", "index_put_", "_index_put_impl_"}


class HostSyncDetector(TorchDispatchMode):
    """Records every aten operator that reads device values on the host (``calls``, a list of
    names): scalar reads (``.item()``, ``bool``, ``.tolist()``), ``nonzero``, ``unique``,
    ``bincount``, ``masked_select``, boolean-mask indexing, ``repeat_interleave`` without an output
    size. On CUDA each of them is a synchronisation; on the CPU they are cheap but detected all the
    same, so a CPU test proves a code path free of them. Backward passes run in the same thread
    on the CPU, so they are covered too."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        #: for each call, the innermost Python frame outside torch (``file:line``): where to look
        self.sites: list[str] = []
        #: aten operators run that are neither views nor bare allocations: about the kernels a GPU
        #: would launch (a device-independent count of launch overhead)
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_KERNEL:
            self.kernels += 1
        if name in _READS:
            self._record(name)
        elif name in _MAYBE_READS and _has_bool_index(args):
            self._record(f"{name} (boolean mask)")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) == 1:
            self._record(name)
        return func(*args, **kwargs)

    def _record(self, name: str) -> None:
        self.calls.append(name)
        site = "?"
        for frame in reversed(traceback.extract_stack()[:-2]):
            if f"{os.sep}torch{os.sep}" not in frame.filename:
                site = f"{frame.filename}:{frame.lineno}"
                break
        self.sites.append(site)


def _has_bool_index(args: tuple) -> bool:
    if len(args) < 2:
        return False
    indices = args[1]
    if isinstance(indices, Tensor):
        indices = [indices]
    return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()))
