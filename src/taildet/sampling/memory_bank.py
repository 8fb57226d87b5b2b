"""MFS class memory (LOCE, methods.md section 2): a per-class ring buffer of RoI features.

Per class ``M = 80`` entries (the RoI feature as the box head receives it, ``[ch, 7, 7]`` after
RoIAlign; the label; the regression target ``[4]``). At most ``M`` writes per class per call (the
last ``M`` of the class in input order -- exactly what writing them all through the ring would
leave; :meth:`ClassMemory.plan` does the host bookkeeping, :meth:`ClassMemory.write` the copy).
Stored in fp16 by default (fp32/bf16 option), on the host or the training device, never
synchronised between processes and never checkpointed. Size: ``C * M * (ch * 49 * itemsize + 24)``
bytes; LVIS v1 (1,203 classes, 256 x 7 x 7 features, M = 80) is about **2.4 GB in fp16** (4.8 GB
in fp32, the reference's host memory). Use a smaller ``capacity`` when that does not fit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["ClassMemory", "human_bytes"]

log = logging.getLogger("taildet.sampling")

_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class ClassMemory:
    """Per-class ring buffers of ``capacity`` entries (feature, label, regression target).

    Tensors (public, read-only for callers): ``features [C, M, *feature_shape]`` (``dtype``),
    ``labels [C, M]`` int64 (the class, ``-1`` for a slot never written), ``targets [C, M, 4]``
    float32, on ``device``; ``ptr [C]`` (next slot to write) and ``count [C]`` (filled slots,
    ``<= M``) int64 on the host. Slots ``0 .. count_c - 1`` are valid; once a class has
    wrapped, every slot is, and ``ptr`` points at its oldest entry.

    Not an ``nn.Module``: the memory never appears in a ``state_dict`` or checkpoint.
    """

    def __init__(
        self,
        num_classes: int,
        capacity: int = 80,
        feature_shape: Sequence[int] = (256, 7, 7),
        dtype: torch.dtype | str = torch.float16,
        device: torch.device | str = "cpu",
        *,
        log_size: bool = True,
    ):
        if int(num_classes) < 1:
            raise ValueError(f"ClassMemory: num_classes must be >= 1, got {num_classes!r}")
        if int(capacity) < 1:
            raise ValueError(f"ClassMemory: capacity must be >= 1, got {capacity!r}")
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"ClassMemory: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        self.num_classes = int(num_classes)
        self.capacity = int(capacity)
        self.feature_shape = tuple(int(s) for s in feature_shape)
        self.dtype = dtype
        self.device = torch.device(device)
        C, M = self.num_classes, self.capacity
        # torch.empty: pages are touched only when written (slots beyond count are never read)
        self.features = torch.empty((C, M, *self.feature_shape), dtype=dtype, device=self.device)
        self.labels = torch.full((C, M), -1, dtype=torch.int64, device=self.device)
        self.targets = torch.zeros((C, M, 4), dtype=torch.float32, device=self.device)
        self.ptr = torch.zeros(C, dtype=torch.int64)
        self.count = torch.zeros(C, dtype=torch.int64)
        if log_size:
            log.info("MFS memory: %d classes x %d entries x feature %s in %s on %s = %s (%d bytes per entry)",
                     C, M, self.feature_shape, str(dtype).replace("torch.", ""), self.device,
                     human_bytes(self.nbytes), self.entry_nbytes)

    @staticmethod
    def estimate_nbytes(num_classes: int, capacity: int, feature_shape: Sequence[int],
                        dtype: torch.dtype = torch.float16) -> int:
        """Bytes a memory of this size holds (features + labels + targets), without allocating it."""
        elems = int(np.prod(feature_shape))
        per_entry = elems * torch.empty((), dtype=dtype).element_size() + 8 + 16
        return int(num_classes) * int(capacity) * per_entry

    @property
    def entry_nbytes(self) -> int:
        """Bytes per class entry: feature + label (int64) + target (4 x float32)."""
        return int(np.prod(self.feature_shape)) * self.features.element_size() + 8 + 16

    @property
    def nbytes(self) -> int:
        """Bytes of the memory's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.features, self.labels, self.targets,
                                                          self.ptr, self.count))

    def __len__(self) -> int:
        return int(self.count.sum())

    def clear(self) -> None:
        """Forget every entry (the tensors stay allocated)."""
        self.ptr.zero_()
        self.count.zero_()
        self.labels.fill_(-1)

    @torch.no_grad()
    def enqueue(self, features: Tensor, labels: Tensor, targets: Tensor, valid: Tensor | None = None) -> int:
        """Write entries ``features [N, *feature_shape]``, ``labels [N]`` (``0..C-1``),
        ``targets [N, 4]``; returns the number written. ``valid`` (bool ``[N]``, optional) drops
        entries where it is False.

        Per class at most ``capacity`` writes: when a class has more than ``M`` new entries, only
        its last ``M`` (in input order) are written -- the state that writing all of them through
        the ring buffer would leave, without the wasted copies.
        """
        n = labels.shape[0] if labels.dim() == 1 else -1
        if n < 0 or features.shape != (n, *self.feature_shape) or targets.shape != (n, 4):
            raise ValueError(
                f"ClassMemory.enqueue: expected features [N, {', '.join(map(str, self.feature_shape))}], "
                f"labels [N] and targets [N, 4], got {tuple(features.shape)}, {tuple(labels.shape)}, "
                f"{tuple(targets.shape)}")
        if n == 0:
            return 0
        plan = self.plan(labels, valid)
        if plan is None:
            return 0
        return self.write(plan, features, targets)

    def plan(self, labels: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
        """Host-side bookkeeping of :meth:`enqueue` (one device -> host transfer of the labels):
        ``(rows, dest, classes)`` -- input rows to write (sorted), their flat slots ``c * M + s``
        and classes -- with ``ptr`` / ``count`` already advanced; None when nothing is written.
        Lets a caller launch the feature computation after the only synchronisation."""
        n = labels.shape[0]
        C, M = self.num_classes, self.capacity
        if valid is not None:  # one device -> host transfer for labels and mask
            both = torch.stack([labels.detach().to(torch.int64), valid.detach().to(torch.int64)]).cpu()
            keep_idx = torch.nonzero(both[1] > 0).flatten()
            lab = both[0, keep_idx]
            n = lab.numel()
            if n == 0:
                return None
        else:
            keep_idx = None
            lab = labels.detach().to("cpu", torch.int64)
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or hi >= C:
            raise ValueError(f"ClassMemory.enqueue: labels must be in 0..{C - 1}, got values in [{lo}, {hi}]")
        order = torch.argsort(lab, stable=True)
        sl = lab[order]
        per_class = torch.bincount(sl, minlength=C)
        starts = torch.cumsum(per_class, 0) - per_class
        rank = torch.arange(n) - starts[sl]                # rank of each entry within its class
        written = per_class.clamp(max=M)
        skip = (per_class - written)[sl]                    # entries of the class not written
        keep = rank >= skip
        src = order[keep] if keep_idx is None else keep_idx[order[keep]]
        cls = sl[keep]
        slot = (self.ptr[cls] + rank[keep] - skip[keep]) % M
        # flat destination row per written entry, in input order (no gather when all are written)
        src, perm = torch.sort(src)
        self.ptr = (self.ptr + written) % M
        self.count = (self.count + written).clamp(max=M)
        return src, (cls * M + slot)[perm], cls[perm]

    @torch.no_grad()
    def write(self, plan: tuple[Tensor, Tensor, Tensor], features: Tensor, targets: Tensor) -> int:
        """Copy the rows of a :meth:`plan` into their slots; returns the number written."""
        src, dest, cls = plan
        C, M = self.num_classes, self.capacity
        feats, regs = features.detach(), targets.detach()
        if src.numel() != feats.shape[0]:
            src_f = src.to(feats.device)
            feats, regs = feats[src_f], regs[src_f]
        dev = self.device
        dest_d = dest.to(dev, non_blocking=True)
        self.features.view(C * M, -1).index_copy_(
            0, dest_d, feats.reshape(feats.shape[0], -1).to(device=dev, dtype=self.dtype))
        self.targets.view(C * M, 4).index_copy_(0, dest_d, regs.to(device=dev, dtype=torch.float32))
        self.labels.view(C * M).index_copy_(0, dest_d, cls.to(dev, non_blocking=True))
        return int(src.numel())

    def gather(self, classes: Tensor, slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(features, labels, targets)`` of the entries ``(classes[i], slots[i])`` (on ``device``)."""
        c = classes.to(self.device, torch.int64)
        s = slots.to(self.device, torch.int64)
        return self.features[c, s], self.labels[c, s], self.targets[c, s]

    def entries(self, cls: int) -> tuple[Tensor, Tensor, Tensor]:
        """The valid entries of class ``cls``, oldest first: ``(features, labels, targets)``."""
        n, M = int(self.count[cls]), self.capacity
        start = int(self.ptr[cls]) if n == M else 0
        slots = (torch.arange(n) + start) % M
        return self.gather(torch.full((n,), int(cls), dtype=torch.int64), slots)


def human_bytes(n: int) -> str:
    """``n`` bytes as a short human-readable string (GB / MB / kB / B)."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"
