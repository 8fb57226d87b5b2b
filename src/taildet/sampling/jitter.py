"""MFS box generator (LOCE, methods.md section 2): jittered copies of every GT box.

For every GT box ``(w, h)`` 16 jittered boxes, one per sign pattern of the four coordinates,
``x1 +- u1 w/6, y1 +- u2 h/6, x2 +- u3 w/6, y2 +- u4 h/6`` with ``u ~ U(0, 1)`` drawn once per
image (``16 x 4`` values), clipped to the image; every box carries the GT label (no IoU filter);
its regression target is the detector's own ``BoxCoder`` encoding of the GT with respect to the
jittered box. :func:`make_batch_entries` does a whole batch in one pass (the RoI head's path;
same draws as per-image calls in image order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["SIGN_PATTERNS", "jitter_boxes", "make_memory_entries", "make_batch_entries"]

#: ``[16, 4]`` signs (+1 / -1) of the four coordinate offsets; row ``k`` has ``+1`` in column
#: ``j`` when bit ``j`` of ``k`` is set. Every sign pattern appears exactly once.
SIGN_PATTERNS = torch.tensor([[1.0 if (k >> j) & 1 else -1.0 for j in range(4)] for k in range(16)])


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
