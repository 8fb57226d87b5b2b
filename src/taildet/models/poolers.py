"""Multi-scale RoIAlign that uses every CPU core.

torchvision's CPU ``roi_align`` kernel runs on one thread whatever ``torch.get_num_threads()``
says, and in a two-stage detector on CPU it is a large share of a step (a quarter of a ResNet-50
FPN fine-tune step at 320 px with 512 RoIs per image; more with LOCE's memory-augmented feature
sampling, which pools 16 jittered boxes per GT every iteration). :class:`ParallelMultiScaleRoIAlign`
is torchvision's :class:`~torchvision.ops.MultiScaleRoIAlign` that, on CPU with more than one torch
thread, splits the batch's images into contiguous groups (balanced by box count) and pools the
groups in parallel threads (the kernel releases the GIL). Each RoI only reads its own image's
feature maps, so the output -- and the gradient w.r.t. the features -- is bit-identical to the
serial module's (tested). The level assignment and scales are torchvision's own; the scales are
inferred serially on the first call, as torchvision caches them. Elsewhere (GPU, one thread, few
boxes, TorchScript/FX tracing) it is the plain module.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign

__all__ = ["ParallelMultiScaleRoIAlign"]

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != workers:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="taildet-roialign")
            _POOL_SIZE = workers
        return _POOL


def _forget_pool_after_fork() -> None:
    # a forked child has none of the parent's threads: start a fresh pool there if it ever pools
    global _POOL, _POOL_SIZE, _POOL_LOCK
    _POOL, _POOL_SIZE, _POOL_LOCK = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def image_groups(counts: list[int], parts: int) -> list[slice]:
    """Split images ``0..len(counts)-1`` into at most ``parts`` contiguous, non-empty groups with
    about equal numbers of boxes (``counts[i]`` boxes in image ``i``)."""
    n = len(counts)
    parts = max(1, min(parts, n))
    total = sum(counts)
    groups, start, acc = [], 0, 0
    for i, c in enumerate(counts):
        acc += c
        remaining_groups = parts - len(groups) - 1
        if remaining_groups > 0 and acc >= total * (len(groups) + 1) / parts and n - (i + 1) >= remaining_groups:
            groups.append(slice(start, i + 1))
            start = i + 1
    groups.append(slice(start, n))
    return [g for g in groups if g.stop > g.start]


class ParallelMultiScaleRoIAlign(MultiScaleRoIAlign):
    """:class:`torchvision.ops.MultiScaleRoIAlign`, pooling image groups in parallel on CPU.

    Same constructor and call as torchvision's. ``min_boxes``: below this many boxes in a call the
    serial path runs (thread hand-off would cost more than it saves).
    """

    min_boxes: int = 64

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        threads = torch.get_num_threads()
        first = next(iter(x.values()))
        counts = [int(b.shape[0]) for b in boxes]
        if (threads < 2 or first.device.type != "cpu" or len(boxes) < 2 or sum(counts) < self.min_boxes
                or self.scales is None or torch.jit.is_scripting() or torch.jit.is_tracing()
                or torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.compiler.is_compiling()):
            return super().forward(x, boxes, image_shapes)
        groups = image_groups(counts, threads)
        if len(groups) < 2:
            return super().forward(x, boxes, image_shapes)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        autocast = torch.is_autocast_enabled("cpu")
        autocast_dtype = torch.get_autocast_dtype("cpu")
        serial_forward = super().forward

        def pool(sl: slice) -> Tensor:
            # thread-local modes of the caller; full image_shapes: the scales are the batch's
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                    torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast):
                return serial_forward({k: v[sl] for k, v in x.items()}, boxes[sl], image_shapes)

        futures = [_executor(threads - 1).submit(pool, sl) for sl in groups[1:]]
        parts = [pool(groups[0])] + [f.result() for f in futures]
        return torch.cat(parts)
