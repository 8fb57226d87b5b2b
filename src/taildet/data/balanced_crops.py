"""A class-balanced classification set rendered by the embedded detection generator.

LVIS detectors start from an ImageNet-pretrained backbone: a classification task with (nearly)
equal numbers of images per class, disjoint from the detection data. :func:`make_balanced_crops`
is that task for the embedded benchmark: ``per_class`` object crops of every one of the 48
classes (150 with the ``"lvis"`` vocabulary), drawn by :func:`taildet.data.synthetic.draw_image` (the same shapes, colours, jitter,
sizes and backgrounds as the detection images) and cropped around the object.

Each crop: one ``image_size`` px image holding a single object of its class, then a
``crop_size`` square window placed uniformly at random among the windows that contain the
object's whole box (so the object is off-centre, with background around it, at the scale the
detector sees it). Crop ``i`` of a split is class ``1 + i % C`` (labels ``0..C-1`` in category id
order, ``C`` classes), so every class has exactly ``per_class`` crops.

Fresh objects, never the detection images: every random number comes from
``numpy.random.default_rng([seed, purpose, index])`` with purposes ``300`` (train) and ``301``
(held-out), which the detection generator never uses (it uses ``101``-``104`` for its design and
layouts and ``201`` / ``202`` for its train / val images), so the crops are fresh draws even when
``seed`` equals the detection dataset's seed. Same arguments, same bytes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from taildet.data.synthetic import _MIN_IMAGE_SIZE, _vocabulary, draw_image
from taildet.errors import ConfigError

__all__ = ["SPLIT_PURPOSES", "make_balanced_crops", "crop_rng"]

#: RNG purpose codes of the two splits (the detection generator uses 101-104 and 201-202).
SPLIT_PURPOSES = {"train": 300, "heldout": 301}


def crop_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that draws crop ``index`` of ``split``."""
    return np.random.default_rng([int(seed), SPLIT_PURPOSES[split], int(index)])


def _check(name: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {v!r}")
    return int(v)


def make_balanced_crops(seed: int, per_class: int, split: str = "train", *, crop_size: int = 48,
                        image_size: int = 96, vocabulary: str = "default",
                        progress: bool = False) -> dict[str, Any]:
    """Render the balanced crops of ``split`` (``"train"`` or ``"heldout"``) over the classes of
    ``vocabulary`` (:data:`taildet.data.synthetic.VOCABULARIES`).

    Returns a dict with ``images`` (uint8 ``[N, crop_size, crop_size, 3]``), ``labels`` (int64
    ``[N]``, 0-based: label ``j`` is category id ``j + 1``), ``origins`` (int ``[N, 2]``: the
    window's top-left ``(x, y)`` in its ``image_size`` px source image), ``boxes`` (float
    ``[N, 4]``: the object's xywh box in crop coordinates) and ``num_classes``;
    ``N = per_class * C`` (``C`` = 48, or 150 with the ``"lvis"`` vocabulary).
    """
    vocab = _vocabulary(vocabulary)
    seed = _check("seed", seed, 0)
    per_class = _check("per_class", per_class, 1)
    image_size = _check("image_size", image_size, _MIN_IMAGE_SIZE)
    crop_size = _check("crop_size", crop_size, 1)
    if split not in SPLIT_PURPOSES:
        raise ConfigError(f"split: expected one of {', '.join(SPLIT_PURPOSES)}, got {split!r}")
    largest = math.ceil(40 * image_size / 96) + 2  # longest box side of a lone object, +1 px each side
    if not largest <= crop_size <= image_size:
        raise ConfigError(f"crop_size: expected {largest}..{image_size} px at image_size {image_size} "
                          f"(a lone object's box is up to {largest - 2} px), got {crop_size}")
    n = per_class * vocab.num_classes
    images = np.empty((n, crop_size, crop_size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    origins = np.empty((n, 2), dtype=np.int64)
    boxes = np.empty((n, 4), dtype=np.float64)
    it = range(n)
    if progress:
        from tqdm import tqdm  # optional: tqdm, imported on use

        it = tqdm(it, desc=f"balanced crops ({split})", unit="crop", leave=False)
    for i in it:
        k = 1 + i % vocab.num_classes
        rng = crop_rng(seed, split, i)
        img, anns = draw_image(rng, image_size, [k], vocab.name)
        x0, y0, w, h = anns[0][2]
        xy = []
        for lo_edge, extent in ((x0, w), (y0, h)):
            lo = max(0, math.ceil(lo_edge + extent) - crop_size)  # window must reach past the box
            hi = min(int(math.floor(lo_edge)), image_size - crop_size)
            xy.append(int(rng.integers(lo, hi + 1)))
        ox, oy = xy
        images[i] = img[oy:oy + crop_size, ox:ox + crop_size]
        labels[i] = k - 1
        origins[i] = (ox, oy)
        boxes[i] = (x0 - ox, y0 - oy, w, h)
    return {"images": images, "labels": labels, "origins": origins, "boxes": boxes,
            "num_classes": vocab.num_classes}
