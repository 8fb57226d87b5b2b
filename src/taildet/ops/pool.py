"""A keyed pool of work buffers for the CPU fast paths (:mod:`taildet.ops.rowwise`).

On CPU a fresh multi-megabyte temporary costs page faults every time (above glibc's ``mmap``
threshold), which is what made the row-blocked losses slow; so their block-sized work buffers
persist between loss evaluations, one pool per thread. A buffer is found by its key
``(name, dtype, device)`` -- ``name`` says what the buffer holds (``"shifted"``, ``"softplus"``,
...), no hand-numbered slots -- and grows to the largest shape asked for under that key (a smaller
request is a contiguous view of its first elements). Elsewhere (GPU: the caching allocator
already reuses memory) a pool lives for one evaluation.

A buffer is valid until the next request with the same key in the same thread; kernels use them
inside one block only. Buffers above ``2 * max_block_bytes`` are not kept.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

import torch
from torch import Tensor

__all__ = ["Scratch", "pool_key", "DEFAULT_BLOCK_BYTES"]

#: Target size of one block of rows on CPU (bytes): well under glibc's dynamic ``mmap`` threshold
#: (32 MB), so block temporaries are reused from the heap.
DEFAULT_BLOCK_BYTES = 8 << 20

_THREAD = threading.local()


def pool_key(name: Hashable, dtype: torch.dtype, device: torch.device) -> tuple:
    """The key of a buffer in the pool: what it holds, its dtype and its device."""
    return (name, dtype, torch.device(device))


class Scratch:
    """Work buffers keyed by ``(name, dtype, device)``; persistent per thread on CPU.

    Args:
        max_block_bytes: buffers larger than twice this are handed out but not kept
            (:data:`DEFAULT_BLOCK_BYTES`; the row-blocked losses pass their current block size).
    """

    def __init__(self, max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        self._local: dict[tuple, Tensor] = {}
        self.max_block_bytes = int(max_block_bytes)

    @staticmethod
    def thread_pool() -> dict[tuple, Tensor]:
        """This thread's persistent CPU buffers (created on first use)."""
        store = getattr(_THREAD, "bufs", None)
        if store is None:
            store = _THREAD.bufs = {}
        return store

    def __call__(self, like: Tensor, slot: Hashable = "work") -> Tensor:
        """An uninitialised buffer shaped and typed like ``like``, named ``slot``."""
        return self.empty(like.shape, like.dtype, like.device, slot)

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str,
              slot: Hashable = "work") -> Tensor:
        """An uninitialised contiguous buffer of ``shape`` / ``dtype`` on ``device``; ``slot`` names
        it (buffers of different names are independent)."""
        device = torch.device(device)
        store = self.thread_pool() if device.type == "cpu" else self._local
        key = pool_key(slot, dtype, device)
        numel = 1
        for d in shape:
            numel *= int(d)
        buf = store.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            if device.type != "cpu" or numel * buf.element_size() <= 2 * self.max_block_bytes:
                store[key] = buf
        return buf[:numel].view(tuple(shape))

