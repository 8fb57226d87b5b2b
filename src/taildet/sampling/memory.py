"""Memory-augmented Feature Sampling (MFS) of LOCE, methods.md section 2.

Three parts, as in the paper, plus the object that runs them inside the RoI head:

* **box generator** -- :func:`jitter_boxes` / :func:`make_memory_entries`: for every GT box
  ``(w, h)`` 16 jittered boxes, one per sign pattern of the four coordinates,
  ``x1 +- u1 w/6, y1 +- u2 h/6, x2 +- u3 w/6, y2 +- u4 h/6`` with ``u ~ U(0, 1)`` drawn once per
  image (``16 x 4`` values), clipped to the image; every box carries the GT label (no IoU
  filter); its regression target is the detector's own ``BoxCoder`` encoding of the GT with
  respect to the jittered box. :func:`make_batch_entries` does a whole batch in one pass (the RoI
  head's path; same draws as per-image calls in image order).
* **class memory** -- :class:`ClassMemory`: per class a ring buffer of ``M = 80`` entries (the
  RoI feature as the box head receives it, ``[ch, 7, 7]`` after RoIAlign; the label; the
  regression target ``[4]``). At most ``M`` writes per class per call (the last ``M`` of the
  class in input order -- exactly what writing them all through the ring would leave;
  :meth:`ClassMemory.plan` does the host bookkeeping, :meth:`ClassMemory.write` the copy). Stored in
  fp16 by default (fp32/bf16 option), on the host or the training device, never synchronised
  between processes and never checkpointed. Size: ``C * M * (ch * 49 * itemsize + 24)`` bytes;
  LVIS v1 (1,203 classes, 256 x 7 x 7 features, M = 80) is about **2.4 GB in fp16** (4.8 GB in
  fp32, the reference's host memory). Use a smaller ``capacity`` when that does not fit.
* **probabilistic sampler** -- :class:`ProbabilisticSampler`: draws ``k = 8`` classes with
  replacement, ``P(c) ~ 1 / (s_c + 1e-7)`` over the foreground entries of the mean classification
  score ``s`` (EquilibriumLoss ``mean_score[:C]``), or ``P(c) ~ 1 / n_c`` from training instance
  counts (the "dataset prior" variant; classes without instances get 0); then ``m = 4`` entries
  with replacement per drawn class; drawn classes whose queue is empty are skipped. Seeded
  ``torch.Generator``.

:class:`MemoryAugmentedSampling` holds the three with the hyper-parameters (alpha 0.9, s_hat 0.01,
M 80, k 8, m 4, 16 boxes per GT, jitter 1/6). Attach it as ``model.roi_heads.mfs``; the RoI head
then calls, in training only and in this order:

1. :meth:`MemoryAugmentedSampling.enqueue_targets` -- RoIAlign of the current GTs' jittered boxes on
   the (frozen) feature maps (``forward_box_features``, no grad), written to the memory;
2. :meth:`MemoryAugmentedSampling.sample` -- ``k x m`` memory entries (features moved to the model's
   device);
3. the box head runs on the sampled RoIs and the memory samples together, then
   :meth:`MemoryAugmentedSampling.update_mean_score` -- ``loss.update(..., extra_logits=memory
   logits, extra_labels=memory labels)`` (a loss without a mean score, e.g. plain CE, is updated as
   usual and an EBL *observer* owned by this object tracks the mean score for the sampler);
4. the classification loss and the box-regression loss see the sampled RoIs followed by the memory
   samples (weight 1 each). The mask head never sees memory samples; nothing happens at test time.

MFS stores features once and reuses them for many iterations, so it assumes the parts that make
them -- backbone, FPN and the shared box FCs (``roi_heads.box_head``) -- are frozen:
:func:`check_frozen_features` raises :class:`ConfigError` otherwise (unless stale features are
explicitly allowed).

Before fine-tuning (and after a resume, since the memory is not checkpointed), :func:`prefill_memory`
runs a class-balanced pass (``M / 16 = 5`` images per class, per process; a class with fewer
images repeats them) through the training forward without gradients: it fills the memory and
updates the mean score.

Analysis (the paper's Fig. 4): :func:`observe_mean_score` runs the EBL update rule as a pure observer
over the training set for any softmax two-stage model (e.g. the CE stage 1), and
:func:`plot_mean_score_vs_instances` plots per-class mean scores of one or several runs against
training instance counts.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from taildet.errors import ConfigError

__all__ = [
    "SIGN_PATTERNS",
    "jitter_boxes",
    "make_memory_entries",
    "make_batch_entries",
    "ClassMemory",
    "ProbabilisticSampler",
    "MemoryBatch",
    "MemoryAugmentedSampling",
    "check_frozen_features",
    "attach_mfs",
    "prefill_image_indices",
    "prefill_memory",
    "observe_mean_score",
    "plot_mean_score_vs_instances",
]

log = logging.getLogger("taildet.sampling")

#: ``[16, 4]`` signs (+1 / -1) of the four coordinate offsets; row ``k`` has ``+1`` in column
#: ``j`` when bit ``j`` of ``k`` is set. Every sign pattern appears exactly once.
SIGN_PATTERNS = torch.tensor([[1.0 if (k >> j) & 1 else -1.0 for j in range(4)] for k in range(16)])

_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Box generator


def jitter_boxes(
    gt_boxes: Tensor,
    image_size: tuple[int, int],
    generator: torch.Generator | None = None,
    num_boxes: int = 16,
    jitter: float = 1.0 / 6.0,
) -> Tensor:
    """Jittered copies of ``gt_boxes`` ``[G, 4]`` (xyxy) -> ``[G * num_boxes, 4]``, GT-major.

    Box ``k`` of every GT moves each coordinate by ``sign[k, j] * u[k, j] * jitter * size_j``
    (``size = (w, h, w, h)`` of that GT; ``sign = SIGN_PATTERNS[k % 16]``), with ``u ~ U(0, 1)``
    of shape ``[num_boxes, 4]`` drawn once per call (= once per image) from ``generator`` on the
    host. With ``num_boxes = 16`` every sign pattern is used once. The boxes are clipped to
    ``image_size = (height, width)``.
    """
    if gt_boxes.dim() != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"jitter_boxes: expected gt_boxes of shape [G, 4], got {tuple(gt_boxes.shape)}")
    if int(num_boxes) < 1:
        raise ValueError(f"jitter_boxes: num_boxes must be >= 1, got {num_boxes!r}")
    if not 0.0 <= float(jitter) < 0.5:
        raise ValueError(f"jitter_boxes: jitter must be in [0, 0.5), got {jitter!r}")
    n = int(num_boxes)
    boxes = gt_boxes.detach()
    if not boxes.is_floating_point():
        boxes = boxes.float()
    offsets = _draw_offsets(1, n, jitter, generator).to(device=boxes.device, dtype=boxes.dtype)
    height, width = float(image_size[0]), float(image_size[1])
    limits = boxes.new_tensor([width, height, width, height]).expand(boxes.shape[0], 4)
    return _apply_offsets(boxes, offsets.expand(boxes.shape[0], n, 4), limits)


def _draw_offsets(num_images: int, num_boxes: int, jitter: float, generator: torch.Generator | None) -> Tensor:
    """``[num_images, num_boxes, 4]`` = ``sign * u * jitter`` with ``u ~ U(0, 1)`` (host)."""
    u = torch.rand(num_images, num_boxes, 4, generator=generator)
    return SIGN_PATTERNS[torch.arange(num_boxes) % 16] * u * float(jitter)


def _apply_offsets(boxes: Tensor, offsets: Tensor, limits: Tensor) -> Tensor:
    """``boxes [G, 4]`` moved by ``offsets [G, n, 4]`` (fractions of (w, h, w, h)), clipped to
    ``[0, limits]`` (``limits [G, 4]`` = (W, H, W, H) of each box's image) -> ``[G * n, 4]``."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    size = torch.stack([w, h, w, h], dim=1)
    out = boxes[:, None, :] + offsets * size[:, None, :]
    out = torch.minimum(out.clamp(min=0.0), limits[:, None, :])
    return out.reshape(-1, 4)


def make_memory_entries(
    box_coder: Any,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    image_size: tuple[int, int],
    generator: torch.Generator | None = None,
    num_boxes: int = 16,
    jitter: float = 1.0 / 6.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(boxes [B, 4], labels [B], regression_targets [B, 4])`` of one image's memory entries.

    ``boxes`` = :func:`jitter_boxes`; every box carries its GT's label; the targets are
    ``box_coder.encode_single(gt, box)`` -- the deltas that move the jittered box onto its GT, in
    the detector's own encoding (``roi_heads.box_coder``). Boxes that clipping leaves with no
    area (a GT outside the image) are dropped.
    """
    boxes = jitter_boxes(gt_boxes, image_size, generator, num_boxes, jitter)
    gt = gt_boxes.detach().to(boxes.dtype).repeat_interleave(int(num_boxes), dim=0)
    labels = gt_labels.detach().repeat_interleave(int(num_boxes), dim=0)
    ok = ((boxes[:, 2] - boxes[:, 0]) > 1e-3) & ((boxes[:, 3] - boxes[:, 1]) > 1e-3)
    ok &= ((gt[:, 2] - gt[:, 0]) > 1e-3) & ((gt[:, 3] - gt[:, 1]) > 1e-3)
    if not bool(ok.all()):
        boxes, gt, labels = boxes[ok], gt[ok], labels[ok]
    targets = box_coder.encode_single(gt, boxes)
    return boxes, labels, targets


def make_batch_entries(
    box_coder: Any,
    targets: Sequence[Mapping[str, Tensor]],
    image_sizes: Sequence[tuple[int, int]],
    generator: torch.Generator | None = None,
    num_boxes: int = 16,
    jitter: float = 1.0 / 6.0,
) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """:func:`make_memory_entries` for a batch in one pass (the RoI head's path).

    ``u`` is drawn once per image, as ``[B, num_boxes, 4]`` in one call. Returns
    ``(boxes per image, labels [N], regression_targets [N], valid [N])``; ``valid`` is False for
    boxes that clipping left without area (kept in place so nothing waits for the device here).
    """
    n = int(num_boxes)
    counts = [int(t["boxes"].shape[0]) for t in targets]
    if sum(counts) == 0:
        dev = targets[0]["boxes"].device if targets else torch.device("cpu")
        empty = torch.zeros(0, 4, device=dev)
        return [empty] * len(targets), torch.zeros(0, dtype=torch.int64, device=dev), empty, \
            torch.zeros(0, dtype=torch.bool, device=dev)
    gt = torch.cat([t["boxes"].detach() for t in targets])
    if not gt.is_floating_point():
        gt = gt.float()
    dev = gt.device
    img = torch.repeat_interleave(torch.arange(len(targets)), torch.tensor(counts))
    offsets = _draw_offsets(len(targets), n, jitter, generator)[img]
    limits = torch.tensor([[float(w), float(h), float(w), float(h)] for h, w in image_sizes])[img]
    offsets, limits = (offsets.to(dev, gt.dtype, non_blocking=True), limits.to(dev, gt.dtype, non_blocking=True))
    boxes = _apply_offsets(gt, offsets, limits)
    gt_rep = gt.repeat_interleave(n, dim=0)
    labels = torch.cat([t["labels"].detach() for t in targets]).repeat_interleave(n, dim=0)
    valid = ((boxes[:, 2] - boxes[:, 0]) > 1e-3) & ((boxes[:, 3] - boxes[:, 1]) > 1e-3)
    valid &= ((gt_rep[:, 2] - gt_rep[:, 0]) > 1e-3) & ((gt_rep[:, 3] - gt_rep[:, 1]) > 1e-3)
    reg = box_coder.encode_single(gt_rep, boxes)
    return list(boxes.split([c * n for c in counts])), labels, reg, valid


# --------------------------------------------------------------------------------------------
# Class memory


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
                     _human_bytes(self.nbytes), self.entry_nbytes)

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


def _human_bytes(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------------------------
# Sampler


class ProbabilisticSampler:
    """Which memory entries join an iteration: ``k`` classes, then ``m`` entries per class.

    Args:
        num_classes: ``C``.
        classes_per_iter: ``k`` classes drawn with replacement per iteration (8).
        samples_per_class: ``m`` entries drawn with replacement per drawn class (4).
        prior: ``"mean_score"`` -- ``P(c) ~ 1 / (s_c + eps)`` from the foreground mean
            classification score; ``"instance_counts"`` -- ``P(c) ~ 1 / n_c`` from training
            instance counts (given here; classes with ``n_c = 0`` get probability 0).
        instance_counts: ``[C]`` for ``prior="instance_counts"``.
        eps: 1e-7. seed: of the sampler's own ``torch.Generator`` (host).
    """

    def __init__(self, num_classes: int, classes_per_iter: int = 8, samples_per_class: int = 4, *,
                 prior: str = "mean_score", instance_counts: Sequence[int] | np.ndarray | Tensor | None = None,
                 eps: float = 1e-7, seed: int = 0):
        if prior not in ("mean_score", "instance_counts"):
            raise ValueError(f"ProbabilisticSampler: prior must be 'mean_score' or 'instance_counts', got {prior!r}")
        if int(classes_per_iter) < 1 or int(samples_per_class) < 1:
            raise ValueError("ProbabilisticSampler: classes_per_iter and samples_per_class must be >= 1")
        self.num_classes = int(num_classes)
        self.k = int(classes_per_iter)
        self.m = int(samples_per_class)
        self.prior = prior
        self.eps = float(eps)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._count_probs: Tensor | None = None
        if prior == "instance_counts":
            if instance_counts is None:
                raise ValueError("ProbabilisticSampler: prior='instance_counts' needs instance_counts")
            n = torch.as_tensor(np.asarray(instance_counts), dtype=torch.float64).flatten()
            if n.numel() != self.num_classes or bool((n < 0).any()):
                raise ValueError(f"ProbabilisticSampler: instance_counts must be {self.num_classes} "
                                 f"non-negative counts, got {n.numel()} values")
            w = torch.where(n > 0, 1.0 / n.clamp(min=1.0), torch.zeros_like(n))
            if float(w.sum()) <= 0:
                raise ValueError("ProbabilisticSampler: every instance count is 0")
            self._count_probs = w / w.sum()

    def class_probabilities(self, mean_score: Tensor | None = None) -> Tensor:
        """``[C]`` float64 probabilities (host). ``mean_score``: the foreground scores ``[C]``
        (needed for ``prior="mean_score"``; ``[C + 1]`` with background last is sliced)."""
        if self._count_probs is not None:
            return self._count_probs
        if mean_score is None:
            raise ValueError("ProbabilisticSampler: prior='mean_score' needs the mean score")
        s = mean_score.detach().to("cpu", torch.float64).flatten()
        if s.numel() == self.num_classes + 1:
            s = s[: self.num_classes]
        if s.numel() != self.num_classes:
            raise ValueError(f"ProbabilisticSampler: expected {self.num_classes} mean scores, got {s.numel()}")
        w = 1.0 / (s.clamp(min=0.0) + self.eps)
        return w / w.sum()

    def draw_classes(self, probs: Tensor) -> Tensor:
        """``k`` classes drawn with replacement from ``probs`` (int64, host)."""
        return torch.multinomial(probs, self.k, replacement=True, generator=self.generator)

    def draw(self, memory: ClassMemory, mean_score: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(classes, slots)`` (host int64, ``m`` per drawn class with a non-empty queue)."""
        classes = self.draw_classes(self.class_probabilities(mean_score))
        u = torch.rand(classes.numel(), self.m, generator=self.generator)
        cnt = memory.count[classes]
        keep = cnt > 0
        classes, cnt, u = classes[keep], cnt[keep], u[keep]
        slots = torch.minimum((u * cnt[:, None]).long(), (cnt - 1)[:, None])
        return classes.repeat_interleave(self.m), slots.flatten()


# --------------------------------------------------------------------------------------------
# The method


class MemoryBatch(NamedTuple):
    """Memory samples of one iteration, on the model's device."""

    features: Tensor            # [S, ch, 7, 7] (memory dtype)
    labels: Tensor              # [S] int64, 0..C-1
    regression_targets: Tensor  # [S, 4] float32


def _has_mean_score(loss: Any) -> bool:
    from taildet.losses.equilibrium import EquilibriumLoss

    return isinstance(loss, EquilibriumLoss)


class MemoryAugmentedSampling:
    """MFS state and hyper-parameters; one method per iteration step (see the module docstring).

    Build it with :meth:`from_model` and attach it as ``model.roi_heads.mfs`` (or with
    :func:`attach_mfs`, which also checks that the feature extractor is frozen).

    Args:
        num_classes, feature_shape: ``C`` and the pooled RoI feature shape ``(ch, 7, 7)``.
        capacity (M 80), classes_per_iter (k 8), samples_per_class (m 4), boxes_per_gt (16),
        jitter (1/6): see the parts above.
        alpha (0.9), bg_score (s_hat 0.01): of the mean-score observer used when the loss has no
            mean score of its own (plain CE); with EBL the loss's ``mean_score`` is used.
        dtype, device: memory storage.
        prior: ``"mean_score"`` or ``"instance_counts"`` (then ``instance_counts`` ``[C]``).
        seed: seeds the box-jitter and sampler generators.
    """

    def __init__(self, num_classes: int, feature_shape: Sequence[int], *, capacity: int = 80,
                 classes_per_iter: int = 8, samples_per_class: int = 4, boxes_per_gt: int = 16,
                 jitter: float = 1.0 / 6.0, alpha: float = 0.9, bg_score: float = 0.01,
                 dtype: torch.dtype | str = torch.float16, device: torch.device | str = "cpu",
                 prior: str = "mean_score", instance_counts: Sequence[int] | np.ndarray | None = None,
                 seed: int = 0):
        if int(boxes_per_gt) < 1:
            raise ValueError(f"MemoryAugmentedSampling: boxes_per_gt must be >= 1, got {boxes_per_gt!r}")
        if not 0.0 <= float(jitter) < 0.5:
            raise ValueError(f"MemoryAugmentedSampling: jitter must be in [0, 0.5), got {jitter!r}")
        self.num_classes = int(num_classes)
        self.boxes_per_gt = int(boxes_per_gt)
        self.jitter = float(jitter)
        self.alpha = float(alpha)
        self.bg_score = float(bg_score)
        self.memory = ClassMemory(num_classes, capacity, feature_shape, dtype, device)
        self.sampler = ProbabilisticSampler(num_classes, classes_per_iter, samples_per_class, prior=prior,
                                            instance_counts=instance_counts, seed=int(seed) * 2 + 1)
        self.generator = torch.Generator().manual_seed(int(seed) * 2)
        self.observer = None  # EquilibriumLoss tracking the mean score when the loss has none
        self._score_host: Tensor | None = None
        self._score_event: Any = None
        self._score_version: tuple[int, int] | None = None
        self.last_batch: MemoryBatch | None = None
        #: CPU: start each iteration's enqueue in a background thread as soon as the RPN starts (it
        #: needs only the backbone features and the targets), so its RoIAlign overlaps the RPN.
        self.overlap = True
        self._pending: tuple[Any, Future] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pending"] = None
        return state

    @classmethod
    def from_model(cls, model: torch.nn.Module, **kwargs: Any) -> "MemoryAugmentedSampling":
        """For a taildet Faster/Mask R-CNN: ``C`` from the RoI heads, ``(ch, h, w)`` from the
        backbone's ``out_channels`` and the box RoIAlign's output size."""
        if model.cls_head.stage != "roi_heads":  # the memory holds RoI features
            raise ConfigError("finetune.mfs.enabled: MFS needs a taildet two-stage detector "
                              "(model.arch faster_rcnn or mask_rcnn)")
        size = model.roi_heads.box_roi_pool.output_size
        size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(size) == 1:
            size = (size[0], size[0])
        shape = (int(model.backbone.out_channels), *size)
        return cls(model.cls_head.num_classes, shape, **kwargs)

    @property
    def capacity(self) -> int:
        return self.memory.capacity

    def extra_repr(self) -> str:
        s = self.sampler
        return (f"C={self.num_classes}, M={self.capacity}, k={s.k}, m={s.m}, boxes_per_gt={self.boxes_per_gt}, "
                f"jitter={self.jitter:.4g}, prior={s.prior}, memory={_human_bytes(self.memory.nbytes)} "
                f"{str(self.memory.dtype).replace('torch.', '')} on {self.memory.device}")

    def __repr__(self) -> str:
        return f"MemoryAugmentedSampling({self.extra_repr()})"

    # -- step 1 ---------------------------------------------------------------------------------

    @torch.no_grad()
    def enqueue_targets(self, roi_heads: Any, features: dict[str, Tensor], targets: list[dict[str, Tensor]],
                        image_shapes: list[tuple[int, int]]) -> int:
        """Jittered boxes of every GT (labels ``0..C-1``, boxes in the transformed image), their
        RoIAlign features (``roi_heads.forward_box_features``, detached) and regression targets
        (``roi_heads.box_coder``) -> memory. Returns the number of entries written."""
        boxes_list, labels, regs, valid = make_batch_entries(roi_heads.box_coder, targets, image_shapes,
                                                             self.generator, self.boxes_per_gt, self.jitter)
        if labels.numel() == 0:
            return 0
        plan = self.memory.plan(labels, valid)  # the one host sync, before RoIAlign is queued
        if plan is None:
            return 0
        src = plan[0]
        if src.numel() < labels.shape[0]:
            # pool only the entries that will be written (boxes without area, and a class's entries
            # beyond its M writes of this iteration, are skipped): RoIAlign is MFS's main cost
            counts = torch.tensor([b.shape[0] for b in boxes_list])
            per_image = torch.bincount(torch.repeat_interleave(torch.arange(len(boxes_list)), counts)[src],
                                       minlength=len(boxes_list)).tolist()
            src_d = src.to(regs.device)
            boxes_list = list(torch.cat(boxes_list)[src_d].split(per_image))
            regs = regs[src_d]
        pooled = roi_heads.forward_box_features(features, boxes_list, image_shapes).detach()
        return self.memory.write(plan, pooled, regs)

    def start_enqueue(self, roi_heads: Any, features: dict[str, Tensor], targets: list[dict[str, Tensor]],
                      image_shapes: list[tuple[int, int]]) -> None:
        """Run :meth:`enqueue_targets` in the background (see ``overlap``); the RoI head collects it
        with :meth:`enqueue_for_step` before it samples the memory."""
        self._wait_pending()
        self._pending = (features, _background().submit(self.enqueue_targets, roi_heads, features, targets,
                                                        image_shapes))

    def _wait_pending(self) -> tuple[Any, int] | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return pending[0], pending[1].result()

    def enqueue_for_step(self, roi_heads: Any, features: dict[str, Tensor], targets: list[dict[str, Tensor]],
                         image_shapes: list[tuple[int, int]]) -> int:
        """Step 1 of an iteration: the enqueue started for these ``features`` (waited for), or run
        now. Returns the number of entries written."""
        done = self._wait_pending()
        if done is not None and done[0] is features:
            return done[1]
        return self.enqueue_targets(roi_heads, features, targets, image_shapes)

    # -- step 2 ---------------------------------------------------------------------------------

    def mean_score(self, loss: Any) -> Tensor | None:
        """``[C + 1]`` mean score the sampler reads: the loss's (EBL) or the observer's."""
        if _has_mean_score(loss):
            return loss.mean_score
        return None if self.observer is None else self.observer.mean_score

    @torch.no_grad()
    def sample(self, loss: Any, device: torch.device | str | None = None) -> MemoryBatch | None:
        """Draw this iteration's memory samples (None when every drawn queue is empty)."""
        s = None
        if self.sampler.prior == "mean_score":
            s = self.mean_score(loss)
            if s is None:
                s = torch.full((self.num_classes + 1,), self.bg_score, dtype=torch.float64)
            elif s.is_cuda and self._score_host is not None and self._score_version == (id(s), s._version):
                self._score_event.synchronize()   # copied after the last update: no stream sync
                s = self._score_host
        classes, slots = self.sampler.draw(self.memory, s)
        if classes.numel() == 0:
            self.last_batch = None
            return None
        feats, labels, targets = self.memory.gather(classes, slots)
        if device is not None:
            dev = torch.device(device)
            nb = dev.type == "cuda"
            feats, labels, targets = (feats.to(dev, non_blocking=nb), labels.to(dev, non_blocking=nb),
                                      targets.to(dev, non_blocking=nb))
        self.last_batch = MemoryBatch(feats, labels, targets)
        return self.last_batch

    # -- step 3 ---------------------------------------------------------------------------------

    @torch.no_grad()
    def update_mean_score(self, loss: Any, logits: Tensor, labels: Tensor, gt_index: Tensor,
                          memory_logits: Tensor | None, memory_labels: Tensor | None) -> None:
        """The mean-score update of this iteration, memory samples included (methods.md):
        ``loss.update(..., extra_logits=memory_logits, extra_labels=memory_labels)`` for EBL; for
        any other loss ``loss.update(logits, labels, gt_index)`` as without MFS, and the same
        observations go to this object's EBL observer (created on first use) when the sampler
        reads mean scores."""
        if _has_mean_score(loss):
            loss.update(logits, labels, gt_index, extra_logits=memory_logits, extra_labels=memory_labels)
            self._copy_score_to_host(loss.mean_score)
            return
        loss.update(logits, labels, gt_index)
        if self.sampler.prior != "mean_score":
            return
        if self.observer is None:
            from taildet.losses.equilibrium import EquilibriumLoss

            if logits.shape[1] != self.num_classes + 1:
                raise ConfigError(
                    f"finetune.mfs.prior: 'mean_score' needs a softmax head with a background column "
                    f"({self.num_classes + 1} outputs), got {logits.shape[1]}; use prior: instance_counts")
            self.observer = EquilibriumLoss(self.num_classes, alpha=self.alpha, bg_score=self.bg_score)
        self.observer.to(logits.device)
        self.observer.update(logits, labels, gt_index, extra_logits=memory_logits, extra_labels=memory_labels)
        self._copy_score_to_host(self.observer.mean_score)

    def _copy_score_to_host(self, s: Tensor) -> None:
        """CUDA: start an asynchronous copy of the updated mean score to pinned host memory, so the
        next :meth:`sample` reads it without a stream synchronisation. The tensor's identity and
        version are recorded: any later in-place change (a checkpoint load) makes :meth:`sample`
        read the tensor itself instead."""
        if not s.is_cuda:
            return
        if self._score_host is None or self._score_host.shape != s.shape or self._score_host.dtype != s.dtype:
            self._score_host = torch.empty(s.shape, dtype=s.dtype, pin_memory=True)
            self._score_event = torch.cuda.Event()
        self._score_host.copy_(s.detach(), non_blocking=True)
        self._score_event.record()
        self._score_version = (id(s), s._version)


# --------------------------------------------------------------------------------------------
# Attaching, freezing check, pre-fill


#: Parameter-name prefixes whose weights make the stored features: backbone (incl. FPN) and the
#: shared box FCs.
FEATURE_PREFIXES = ("backbone.", "roi_heads.box_head.")


def check_frozen_features(model: torch.nn.Module, allow_stale_features: bool = False) -> list[str]:
    """Names of trainable parameters of the backbone, FPN and shared box FCs; raises
    :class:`ConfigError` when there are any and ``allow_stale_features`` is False."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith(FEATURE_PREFIXES)]
    if trainable and not allow_stale_features:
        shown = ", ".join(trainable[:5]) + (f", ... ({len(trainable)} in all)" if len(trainable) > 5 else "")
        raise ConfigError(
            "finetune.mfs: memory-augmented feature sampling stores RoI features and reuses them for many "
            "iterations, so the backbone, FPN and shared box FCs (roi_heads.box_head) must be frozen; "
            f"trainable: {shown}. Freeze them with finetune.freeze (e.g. ['^backbone\\\\.', "
            "'^roi_heads\\\\.box_head\\\\.']) or set finetune.mfs.allow_stale_features: true")
    if trainable:
        log.warning("finetune.mfs: %d feature parameters are trainable; memory features go stale "
                    "(finetune.mfs.allow_stale_features)", len(trainable))
    return trainable


def attach_mfs(model: torch.nn.Module, mfs: MemoryAugmentedSampling, *, allow_stale_features: bool = False
               ) -> MemoryAugmentedSampling:
    """Check the feature extractor is frozen, then set ``model.roi_heads.mfs = mfs``.

    When the sampler reads mean scores and the loss keeps none (MFS with plain CE), the mean-score
    observer (an :class:`~taildet.losses.equilibrium.EquilibriumLoss` used only for its update) is
    created here and registered as ``model.roi_heads.mfs_observer``, so its ``mean_score`` is in
    the ``state_dict`` and checkpoints and a resume continues from it. Inference-time loaders drop
    that key for models without MFS (:func:`taildet.engine.checkpoint.load_model_weights`).
    """
    check_frozen_features(model, allow_stale_features)
    rh, loss = model.roi_heads, model.cls_head.loss
    if mfs.sampler.prior == "mean_score" and not _has_mean_score(loss) and mfs.observer is None:
        from taildet.losses.equilibrium import EquilibriumLoss

        if loss.num_outputs() != mfs.num_classes + 1:
            raise ConfigError(
                f"finetune.mfs.prior: 'mean_score' needs a softmax head with a background column "
                f"({mfs.num_classes + 1} outputs), got {loss.num_outputs()}; use prior: instance_counts")
        mfs.observer = EquilibriumLoss(mfs.num_classes, alpha=mfs.alpha, bg_score=mfs.bg_score)
        rh.mfs_observer = mfs.observer  # a submodule: checkpointed with the model
    model.roi_heads.mfs = mfs
    rpn = getattr(model, "rpn", None)
    if rpn is not None and getattr(rpn, "_taildet_mfs_hook", None) is None:
        rpn._taildet_mfs_hook = rpn.register_forward_pre_hook(functools.partial(_start_enqueue_hook, model))
    return mfs


def _start_enqueue_hook(model: torch.nn.Module, rpn: torch.nn.Module, args: tuple) -> None:
    """RPN pre-hook: in training on CPU, start the MFS enqueue of this iteration in the background
    (the RPN gets ``(images, features, targets)``, everything the enqueue needs)."""
    rh = model.roi_heads
    mfs = getattr(rh, "mfs", None)
    if mfs is None or not mfs.overlap or not rh.training or len(args) < 3 or args[2] is None:
        return
    images, features, targets = args[0], args[1], args[2]
    if not features or next(iter(features.values())).device.type != "cpu":
        return
    mfs.start_enqueue(rh, features, targets, images.image_sizes)


_BACKGROUND: ThreadPoolExecutor | None = None


def _forget_background_after_fork() -> None:
    global _BACKGROUND
    _BACKGROUND = None  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_background_after_fork)


def _background() -> ThreadPoolExecutor:
    global _BACKGROUND
    if _BACKGROUND is None:
        _BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taildet-mfs")
    return _BACKGROUND


def _class_members(labels_per_image: Sequence[Any], num_classes: int) -> list[list[int]]:
    """For every class, the indices of the images containing it (ascending)."""
    from taildet.data.samplers import labels_to_arrays

    arrays, _ = labels_to_arrays(labels_per_image, num_classes)
    members: list[list[int]] = [[] for _ in range(num_classes)]
    for i, a in enumerate(arrays):
        for c in set(a.tolist()):
            members[c].append(i)
    return members


def prefill_image_indices(labels_per_image: Sequence[Any], num_classes: int, images_per_class: int,
                          seed: int = 0, rank: int = 0) -> list[int]:
    """Class-balanced image pick of one process: ``images_per_class`` (``k``) images per class.

    For every class, a seeded permutation of the images containing it (the same on every process);
    process ``rank`` takes positions ``rank * k .. rank * k + k - 1`` of it, cyclically. So every
    process gets ``k`` images of every class, distinct across processes while the class has enough
    images (the memory is per process, as the reference's distributed balanced sampler), and a
    class with fewer than ``k`` images repeats them (as the reference tops up): each repeat is a
    forward with fresh jittered boxes. An image picked for several classes runs once per the
    largest number of times any one class picked it, in first-pick order.
    """
    return _pick(_class_members(labels_per_image, num_classes), images_per_class, seed, rank)


def _pick(members: list[list[int]], images_per_class: int, seed: int, rank: int) -> list[int]:
    """:func:`prefill_image_indices` from the per-class image lists."""
    k = int(images_per_class)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 16]))
    times: dict[int, int] = {}
    for imgs in members:
        if not imgs:
            continue
        perm = rng.permutation(len(imgs))
        picks = [imgs[perm[(int(rank) * k + j) % len(imgs)]] for j in range(k)]
        for i in dict.fromkeys(picks):
            times[i] = max(times.get(i, 0), picks.count(i))
    return [i for i, t in times.items() for _ in range(t)]


class _TrainForwardNoGrad:
    """Training-mode forward without gradients and with every BatchNorm in eval mode."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        return self

    def __exit__(self, *exc):
        torch.set_grad_enabled(self.grad)
        self.model.train(self.was_training)
        return False


def _batches(dataset, indices: list[int], batch_size: int, seed: int, device: torch.device, num_workers: int):
    from taildet.engine.inference import list_collate
    from taildet.engine.train import _SeededDataset, _sample_seed, _to_device

    keys = [(int(i), _sample_seed(seed, 0, 0, p)) for p, i in enumerate(indices)]
    batches = [keys[b: b + batch_size] for b in range(0, len(keys), batch_size)]
    loader = torch.utils.data.DataLoader(_SeededDataset(dataset), batch_sampler=batches, collate_fn=list_collate,
                                         num_workers=num_workers)
    for images, targets in loader:
        yield [im.to(device) for im in images], _to_device(targets, device)


def prefill_memory(model: torch.nn.Module, dataset, *, images_per_class: int | None = None, batch_size: int = 2,
                   device: torch.device | str | None = None, seed: int = 0, num_workers: int = 0,
                   progress: bool = True) -> dict:
    """Class-balanced pre-fill of ``model.roi_heads.mfs`` (before fine-tuning and after a resume).

    ``images_per_class`` (default ``ceil(M / 16)``, 5 for M = 80) images per class
    (:func:`prefill_image_indices`) go through the training forward without gradients (every
    BatchNorm in eval mode): each batch enqueues its GTs' jittered-box features, samples the
    memory and updates the mean score, as a training iteration does; the losses are discarded and
    no parameter changes. The global RNG state is left as it was. Under DDP every process fills
    its own memory with its own ``images_per_class`` images per class (distinct across processes
    where the class has enough), lists padded to equal length so every process runs the same
    number of forwards. Returns ``{"images", "entries", "seconds"}``.
    """
    import time

    from taildet.engine.distributed import get_rank, get_world_size

    mfs = getattr(model.roi_heads, "mfs", None)
    if mfs is None:
        raise ValueError("prefill_memory: attach MFS first (model.roi_heads.mfs)")
    if images_per_class is None:
        images_per_class = max(1, math.ceil(mfs.capacity / 16))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    world, rank = get_world_size(), get_rank()
    members = _class_members(dataset.labels_per_image, mfs.num_classes)
    indices = _pick(members, images_per_class, seed, rank)
    if world > 1 and indices:
        # every process runs as many forwards as the longest list (the mean-score update is a
        # collective): the shorter ones repeat their own images
        longest = max(len(_pick(members, images_per_class, seed, r)) for r in range(world))
        indices = (indices * math.ceil(longest / len(indices)))[:longest]
    t0 = time.perf_counter()
    before = len(mfs.memory)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc="MFS pre-fill", unit="img", dynamic_ncols=True)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), _TrainForwardNoGrad(model):
            for images, targets in _batches(dataset, indices, max(1, int(batch_size)), seed, device, num_workers):
                model(images, targets)
                if bar is not None:
                    bar.update(len(images))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    filled = int((mfs.memory.count > 0).sum())
    log.info("MFS pre-fill: %d images (%d per class), %d entries, %d of %d classes in memory, %.1f s",
             len(indices), images_per_class, len(mfs.memory), filled, mfs.num_classes, seconds)
    return {"images": len(indices), "entries": len(mfs.memory) - before, "seconds": seconds}


# --------------------------------------------------------------------------------------------
# Analysis: the paper's Fig. 4


def observe_mean_score(model: torch.nn.Module, dataset, *, device: torch.device | str | None = None,
                       batch_size: int = 2, max_images: int | None = None, alpha: float = 0.9,
                       bg_score: float = 0.01, seed: int = 0, num_workers: int = 0,
                       progress: bool = True) -> Tensor:
    """Mean classification score ``[C + 1]`` of any softmax two-stage model over the training set.

    Runs the EBL update rule (methods.md section 2) as a pure observer: each batch goes through
    the training forward without gradients (BatchNorm in eval mode, MFS detached, no parameter
    or loss-state change other than what the loss's own ``update`` does) and an
    :class:`~taildet.losses.equilibrium.EquilibriumLoss` observer takes the sampled RoIs' logits,
    labels and GT ids from ``model.cls_head.record``. Images in dataset order (the first
    ``max_images``). So a CE model and a LOCE model can be compared on one plot.
    """
    from taildet.losses.equilibrium import EquilibriumLoss

    rh = model.roi_heads
    device = torch.device(device) if device is not None else next(model.parameters()).device
    observer = EquilibriumLoss(rh.num_classes, alpha=alpha, bg_score=bg_score).to(device)
    n = len(dataset) if max_images is None else min(int(max_images), len(dataset))
    head = model.cls_head
    saved_mfs, saved_loss_state = getattr(rh, "mfs", None), {k: v.clone() for k, v in head.loss.state_dict().items()}
    rh.mfs = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="mean score", unit="img", dynamic_ncols=True)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), _TrainForwardNoGrad(model):
            for images, targets in _batches(dataset, list(range(n)), max(1, int(batch_size)), seed, device,
                                            num_workers):
                model(images, targets)
                r = head.record
                observer.update(r.logits, r.labels, r.gt_index)
                if bar is not None:
                    bar.update(len(images))
    finally:
        rh.mfs = saved_mfs
        head.loss.load_state_dict(saved_loss_state)
        if bar is not None:
            bar.close()
    return observer.mean_score.detach().cpu()


def plot_mean_score_vs_instances(
    mean_score: Tensor | np.ndarray | Mapping[str, Tensor | np.ndarray],
    instance_counts: Sequence[int] | np.ndarray,
    out_png: str | os.PathLike,
    label: str | None = None,
    *,
    title: str | None = None,
    log_y: bool = True,
) -> str:
    """The paper's Fig. 4: per-class mean classification score against training instance count.

    ``mean_score``: one run (``[C]`` or ``[C + 1]``, background dropped) named ``label``, or a
    mapping ``{label: scores}`` for several runs (e.g. CE from :func:`observe_mean_score` and
    LOCE's ``cls_head.loss.mean_score``). Each run is a scatter of its classes plus the median
    over log-spaced instance-count bins. Classes with 0 instances are drawn at x = 0.5.
    Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    counts = np.asarray(instance_counts, dtype=np.float64).reshape(-1)
    C = counts.size
    runs = dict(mean_score) if isinstance(mean_score, Mapping) else {label or "model": mean_score}
    x = np.where(counts > 0, counts, 0.5)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    edges = np.unique(np.geomspace(0.5, max(float(x.max()), 1.0) * 1.0001, num=9))
    for i, (name, s) in enumerate(runs.items()):
        s = np.asarray(s.detach().cpu() if isinstance(s, Tensor) else s, dtype=np.float64).reshape(-1)
        if s.size == C + 1:
            s = s[:C]
        if s.size != C:
            raise ValueError(f"plot_mean_score_vs_instances: run {name!r} has {s.size} scores, "
                             f"expected {C} (or {C + 1} with background)")
        col = colours[i % len(colours)]
        ax.scatter(x, s, s=12, alpha=0.6, color=col, label=str(name))
        centres, medians = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (x >= lo) & (x < hi)
            if sel.any():
                centres.append(math.sqrt(lo * hi))
                medians.append(float(np.median(s[sel])))
        if centres:
            ax.plot(centres, medians, color=col, linewidth=1.5)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("training instances per class (log)")
    ax.set_ylabel("mean classification score")
    ax.set_title(title or "Mean classification score vs. instances")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
