"""The drawing of the embedded dataset (:mod:`taildet.data.synthetic`): the class vocabularies
(shapes x colours), the shapes' outlines, and :func:`draw_image`, which draws one image's background
and objects from a random generator (the detection images and the balanced classification crops
both use it)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from taildet.errors import ConfigError

__all__ = ["COLOURS", "SHAPES", "VOCABULARIES", "Vocabulary", "draw_image"]


SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "semicircle", "arrow")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
_RGB = {
    "red": (215, 45, 45),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 50),
    "green": (50, 165, 70),
    "blue": (45, 90, 220),
    "purple": (145, 65, 190),
    # the larger "lvis" vocabulary's extra colours (saturated: none occurs in the grey backgrounds)
    "pink": (240, 120, 190),
    "brown": (130, 75, 30),
    "cyan": (40, 200, 215),
    "lime": (160, 225, 40),
    "navy": (25, 35, 120),
    "magenta": (220, 40, 200),
    "teal": (20, 130, 120),
    "maroon": (120, 20, 45),
    "olive": (120, 125, 20),
}
NUM_CLASSES = len(SHAPES) * len(COLOURS)
_REF_SIZE = 96  # object sizes below are in pixels at this image size


def _unit_polygon(shape: str) -> np.ndarray:
    """Outline of ``shape`` as an (N, 2) array inside the box [-1, 1]^2, y pointing down."""
    if shape == "circle":
        t = np.linspace(0.0, 2 * np.pi, 32, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.9
    if shape == "triangle":
        return np.array([[0, -1], [1, 0.8], [-1, 0.8]], float)
    if shape == "diamond":
        return np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], float)
    if shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t) + 0.1], 1)
    if shape == "cross":
        a = 0.34
        return np.array(
            [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a],
             [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]], float)
    if shape == "semicircle":
        t = np.linspace(np.pi, 2 * np.pi, 17)
        return np.stack([np.cos(t), 0.6 + 1.5 * np.sin(t)], 1)
    if shape in ("pentagon", "hexagon"):  # regular polygons, a vertex up (the "lvis" vocabulary)
        n = 5 if shape == "pentagon" else 6
        t = -np.pi / 2 + np.arange(n) * 2 * np.pi / n
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "arrow":
        return np.array(
            [[-1, -0.3], [0.1, -0.3], [0.1, -0.8], [1, 0], [0.1, 0.8], [0.1, 0.3], [-1, 0.3]], float)
    raise KeyError(shape)


_UNIT_POLYGONS = {s: _unit_polygon(s) for s in SHAPES + ("pentagon", "hexagon")}


@dataclass(frozen=True)
class Vocabulary:
    """A class vocabulary: ``shapes x colours`` classes (ids shape-major) and how many of them are
    frequent, common and rare (``group_sizes``, in ranks: the first ``f`` ranks are frequent)."""

    name: str
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    group_sizes: tuple[tuple[str, int], ...]

    @property
    def num_classes(self) -> int:
        return len(self.shapes) * len(self.colours)

    def class_names(self) -> list[str]:
        return [f"{c}_{s}" for s in self.shapes for c in self.colours]

    def shape_colour(self, cat_id: int) -> tuple[int, int]:
        return (cat_id - 1) // len(self.colours), (cat_id - 1) % len(self.colours)


#: ``"default"``: 48 classes (8 shapes x 6 colours; 10 frequent, 20 common, 18 rare).
#: ``"lvis"``: 150 classes (10 shapes x 15 colours) whose rare / common / frequent shares follow
#: LVIS v1 (337 / 461 / 405 of 1,203 -> 42 / 57 / 51 of 150, largest remainders), with the same
#: per-group image-count ranges; ``scale`` ~0.25 gives about the default's number of images.
VOCABULARIES: dict[str, Vocabulary] = {
    "default": Vocabulary("default", SHAPES, COLOURS, (("f", 10), ("c", 20), ("r", 18))),
    "lvis": Vocabulary(
        "lvis", SHAPES + ("pentagon", "hexagon"),
        COLOURS + ("pink", "brown", "cyan", "lime", "navy", "magenta", "teal", "maroon", "olive"),
        (("f", 51), ("c", 57), ("r", 42))),
}
_DEFAULT_VOCAB = VOCABULARIES["default"]


def _vocabulary(vocabulary: Any) -> Vocabulary:
    if isinstance(vocabulary, Vocabulary):
        return vocabulary
    if vocabulary not in VOCABULARIES:
        raise ConfigError(f"vocabulary: expected one of {', '.join(VOCABULARIES)}, got {vocabulary!r}")
    return VOCABULARIES[vocabulary]


def _class_names() -> list[str]:
    return _DEFAULT_VOCAB.class_names()


def _shape_colour(cat_id: int) -> tuple[int, int]:
    return _DEFAULT_VOCAB.shape_colour(cat_id)


def _polygon_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _rasterise(flat: list[float], size: int) -> np.ndarray:
    rle = mask_utils.frPyObjects([flat], size, size)
    with warnings.catch_warnings():  # pycocotools' Cython RLEs warn under numpy 2 (harmless)
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)[:, :, 0].astype(bool)


def _dilate(m: np.ndarray) -> np.ndarray:
    d = m.copy()
    d[1:] |= m[:-1]
    d[:-1] |= m[1:]
    d[:, 1:] |= m[:, :-1]
    d[:, :-1] |= m[:, 1:]
    return d


def draw_image(rng: np.random.Generator, size: int, objects: list[int], vocabulary: str = "default"
               ) -> tuple[np.ndarray, list[tuple[int, list[float], list[float], float]]]:
    """Draw one ``size`` px image holding ``objects`` (category ids of ``vocabulary``) with the
    generator's design.

    Returns ``(image uint8 [size, size, 3], [(cat, polygon, bbox xywh, area)])``. Everything
    random comes from ``rng`` in a fixed order, so a given generator state gives the same pixels;
    the detection images (:func:`taildet.data.synthetic.make_dataset`) and the balanced classification crops
    (:mod:`taildet.data.pretrain`) are both drawn by this one function.
    """
    vocab = _vocabulary(vocabulary)
    f = size / _REF_SIZE
    # Background: low-saturation grey, random tint, linear gradient, Gaussian noise.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    grey = rng.uniform(90, 170)
    tint = rng.uniform(-10, 10, 3)
    gx, gy = rng.uniform(-18, 18, 2)
    bg = grey + gx * xx + gy * yy
    img = bg[:, :, None] + tint[None, None, :] + rng.normal(0.0, 5.0, (size, size, 3))
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    n = len(objects)
    lo = 14 * f
    hi0 = {1: 40, 2: 40, 3: 34, 4: 30}[n] * f
    anns: list[tuple[int, list[float], list[float], float]] = []
    for layout_try in range(200):
        hi = max(lo + 1, hi0 - 2 * f * layout_try)
        occupied = np.zeros((size, size), dtype=bool)
        anns, masks = [], []
        for k in objects:
            shape = vocab.shapes[vocab.shape_colour(k)[0]]
            for _ in range(60):
                s = rng.uniform(lo, hi)
                aspect = rng.uniform(0.85, 1.15)
                theta = np.deg2rad(rng.uniform(-12, 12))
                pts = _UNIT_POLYGONS[shape] * np.array([aspect, 1 / aspect]) * (s / 2)
                rot = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
                pts = pts @ rot
                pts *= s / float((pts.max(0) - pts.min(0)).max())  # longer box side = s
                mn, mx = pts.min(0), pts.max(0)
                if np.any(mx - mn > size - 2):
                    continue
                cx = rng.uniform(1 - mn[0], size - 1 - mx[0])
                cy = rng.uniform(1 - mn[1], size - 1 - mx[1])
                xy = np.round(pts + np.array([cx, cy]), 2)
                flat = [float(v) for v in xy.reshape(-1)]
                m = _rasterise(flat, size)
                if not m.any() or (m & _dilate(occupied)).any():
                    continue
                occupied |= m
                x0, y0 = xy.min(0)
                x1, y1 = xy.max(0)
                bbox = [round(float(x0), 2), round(float(y0), 2),
                        round(float(x1 - x0), 2), round(float(y1 - y0), 2)]
                anns.append((k, flat, bbox, round(_polygon_area(xy), 2)))
                masks.append(m)
                break
            else:
                break
        if len(anns) == n:
            break
    else:  # pragma: no cover - 4 objects of <= 30 px always fit in 96 px
        raise RuntimeError(f"could not place {n} objects in a {size} px image")

    for (k, *_), m in zip(anns, masks):
        base = np.array(_RGB[vocab.colours[vocab.shape_colour(k)[1]]])
        colour = np.clip(base + rng.integers(-12, 13, 3), 0, 255).astype(np.uint8)
        img[m] = colour
    return img, anns
