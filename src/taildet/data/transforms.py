"""Detection transforms on ``(image, target)`` pairs, in plain torch.

``image`` is a ``[3, H, W]`` tensor (float in ``[0, 1]``; :class:`ToFloat` converts uint8);
``target`` is the dict :class:`taildet.data.lvis.LVISDataset` produces. Every transform returns a
new pair and keeps ``boxes`` (absolute xyxy), ``masks`` (uint8 ``[N, H, W]``), ``area`` and
``size`` (current ``(H, W)``) consistent; ``orig_size`` is never touched. ``scale_factor``
(``[sx, sy]`` float32, current size / original size) lets results be mapped back to the original
image: ``boxes_orig = boxes / scale_factor.repeat(2)``. ``gt_index`` passes through unchanged.

Randomness comes from ``torch``'s global RNG (so ``torch.manual_seed`` makes runs repeatable) or,
when given, from the transform's own ``generator``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "Compose",
    "RandomHorizontalFlip",
    "ResizeShortestEdge",
    "ToFloat",
    "build_transforms",
    "resized_shape",
]

Pair = tuple[torch.Tensor, dict[str, Any]]


def _hw(image: torch.Tensor) -> tuple[int, int]:
    if image.dim() != 3:
        raise ValueError(f"expected an image tensor [C, H, W], got shape {tuple(image.shape)}")
    return int(image.shape[-2]), int(image.shape[-1])


def _update_size(target: dict[str, Any], h: int, w: int) -> None:
    target["size"] = torch.tensor([h, w], dtype=torch.int64)
    if "orig_size" in target:
        oh, ow = (int(v) for v in target["orig_size"])
        target["scale_factor"] = torch.tensor([w / ow, h / oh], dtype=torch.float32)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor, dict], Pair]]):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> Pair:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class ToFloat:
    """uint8 image in ``[0, 255]`` -> float32 in ``[0, 1]``; float images are cast to float32."""

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> Pair:
        if image.dtype == torch.uint8:
            image = image.float().div_(255.0)
        else:
            image = image.float()
        return image, target

    def __repr__(self) -> str:
        return "ToFloat()"


def resized_shape(h: int, w: int, short_edge: int, max_size: int | None) -> tuple[int, int]:
    """Output ``(H, W)`` when the short edge is resized to ``short_edge`` with the long edge
    capped at ``max_size`` (``None`` or 0: no cap). Aspect ratio kept up to rounding."""
    scale = short_edge / min(h, w)
    if max_size and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


class ResizeShortestEdge:
    """Resize so the short edge is one of ``short_edge_lengths`` (long edge at most ``max_size``).

    ``sample_style="choice"`` draws one of the lengths uniformly (multi-scale jitter);
    ``"range"`` draws an integer uniformly from ``[min, max]`` of two lengths. The image is
    resized bilinearly with antialiasing, masks with nearest-exact; boxes are scaled by the exact
    per-axis factors ``new_w / w`` and ``new_h / h``; ``area`` by their product.
    """

    def __init__(
        self,
        short_edge_lengths: int | Sequence[int],
        max_size: int | None = 1333,
        sample_style: str = "choice",
        generator: torch.Generator | None = None,
    ):
        if isinstance(short_edge_lengths, int):
            short_edge_lengths = (short_edge_lengths,)
        lengths = tuple(int(s) for s in short_edge_lengths)
        if not lengths or any(s <= 0 for s in lengths):
            raise ValueError(f"short_edge_lengths must be positive integers, got {short_edge_lengths!r}")
        if sample_style not in ("choice", "range"):
            raise ValueError(f"sample_style must be 'choice' or 'range', got {sample_style!r}")
        if sample_style == "range" and len(lengths) != 2:
            raise ValueError(f"sample_style 'range' needs two lengths (min, max), got {lengths}")
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must be positive or None, got {max_size}")
        self.short_edge_lengths = lengths
        self.max_size = max_size
        self.sample_style = sample_style
        self.generator = generator

    def sample_short_edge(self) -> int:
        lengths = self.short_edge_lengths
        if self.sample_style == "range":
            lo, hi = min(lengths), max(lengths)
            return int(torch.randint(lo, hi + 1, (1,), generator=self.generator).item())
        if len(lengths) == 1:
            return lengths[0]
        k = int(torch.randint(len(lengths), (1,), generator=self.generator).item())
        return lengths[k]

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> Pair:
        h, w = _hw(image)
        nh, nw = resized_shape(h, w, self.sample_short_edge(), self.max_size)
        target = dict(target)
        if (nh, nw) != (h, w):
            dtype = image.dtype
            x = image.float().unsqueeze(0)
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
            image = x.squeeze(0)
            if dtype == torch.uint8:
                image = image.round_().clamp_(0, 255).to(torch.uint8)
            else:
                image = image.to(dtype)
            sx, sy = nw / w, nh / h
            if "boxes" in target:
                scale = torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
                target["boxes"] = target["boxes"] * scale
            if "area" in target:
                target["area"] = target["area"] * (sx * sy)
            if "masks" in target:
                m = target["masks"]
                if m.shape[0] == 0:
                    target["masks"] = m.new_zeros((0, nh, nw))
                else:
                    r = F.interpolate(m[None].float(), size=(nh, nw), mode="nearest-exact")
                    target["masks"] = r[0].to(m.dtype)
        _update_size(target, nh, nw)
        return image, target

    def __repr__(self) -> str:
        return (
            f"ResizeShortestEdge(short_edge_lengths={self.short_edge_lengths}, "
            f"max_size={self.max_size}, sample_style={self.sample_style!r})"
        )


class RandomHorizontalFlip:
    """Flip image, boxes (``x1' = W - x2``, ``x2' = W - x1``) and masks with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = float(p)
        self.generator = generator

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> Pair:
        h, w = _hw(image)
        # Always draw, so the RNG stream does not depend on p being 0 or 1.
        u = float(torch.rand((), generator=self.generator))
        target = dict(target)
        if u < self.p:
            image = image.flip(-1)
            if "boxes" in target:
                b = target["boxes"]
                target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        _update_size(target, h, w)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def build_transforms(
    train: bool,
    min_sizes: int | Sequence[int] = (800,),
    max_size: int | None = 1333,
    flip_prob: float = 0.5,
) -> Compose:
    """Standard detection transforms.

    Training: multi-scale ``ResizeShortestEdge(min_sizes, max_size)`` then
    ``RandomHorizontalFlip(flip_prob)``. Evaluation: resize to ``max(min_sizes)``, no flip.
    If you resize here, give the torchvision detector the same ``min_size``/``max_size`` (or sizes
    that leave the images as they are), or it resizes them again.
    """
    if isinstance(min_sizes, int):
        min_sizes = (min_sizes,)
    if train:
        return Compose([ResizeShortestEdge(tuple(min_sizes), max_size), RandomHorizontalFlip(flip_prob)])
    return Compose([ResizeShortestEdge(max(min_sizes), max_size)])
