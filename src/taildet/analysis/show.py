"""Looking at detections: ground truth and detections drawn on dataset images, as one PNG grid.

:func:`detection_grid` (``taildet show``) reads an LVIS/COCO ground truth, a bbox results JSON and
the images, and writes a grid of tiles, one per image:

* the image, upscaled by an integer ``scale`` (nearest neighbour, so the 96 px images of the
  embedded dataset stay sharp and the labels readable);
* the ground-truth boxes in white, :data:`GT_WIDTH` px wide, without labels;
* the detections kept for the image (score >= ``score_thresh``, then the ``top_k`` best,
  :func:`select_detections`), :data:`DET_WIDTH` px wide in the colour of the frequency group of the
  *predicted* class (:data:`GROUP_COLORS`: the GT's ``frequency`` field, as the evaluation uses it),
  each labelled ``"<class name> <score>"`` on a box of that colour;
* under the image a caption strip (:data:`CAPTION_PX` px): ``image <id>: GT <n> r, <n> c, <n> f;
  <kept> of <all> detections`` (the ground-truth boxes per frequency group, the detections drawn
  of the image's detections in the results).

A legend strip (:data:`LEGEND_PX` px) under the grid says what the colours mean. Boxes and text
are drawn by :func:`torchvision.utils.draw_bounding_boxes` and PIL, the tiles laid out by
:func:`torchvision.utils.make_grid`.

Size of the PNG (:func:`grid_size`; ``n`` images, the largest ``W x H`` among them): every tile is
``W * scale`` wide and ``H * scale + CAPTION_PX`` high (a smaller image sits at its tile's top-left
corner on black); with ``c = min(cols, n)`` columns and ``r = ceil(n / c)`` rows the PNG is
``c * (W * scale + PADDING) + PADDING`` wide and ``r * (H * scale + CAPTION_PX + PADDING) +
PADDING + LEGEND_PX`` high. Image ``k`` (in the given order, row by row) has its top-left pixel
at ``x = PADDING + (k % c) * (W * scale + PADDING)``, ``y = PADDING + (k // c) * (H * scale +
CAPTION_PX + PADDING)``; a box ``[x0, y0, x1, y1]`` (image pixels, ``xyxy``) is drawn as the
rectangle from ``(floor(scale * x0), floor(scale * y0))`` to ``(floor(scale * x1), floor(scale *
y1))`` of that tile, its outline running inward from those edges.

Images shown when ``image_ids`` is not given (:func:`default_image_ids`, deterministic): images
whose ground truth holds a rare class first, then those holding a common class, then the rest,
each group by image id; the first ``num_images``.
"""

from __future__ import annotations

import io
import math
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes, make_grid

from taildet.data.lvis import LVISDataset, load_lvis
from taildet.errors import ConfigError, DataError
from taildet.evaluation.result_columns import GtIds, read_result_columns
from taildet.fileio import atomic_write, check_not_inputs, check_output_path

__all__ = ["CAPTION_PX", "DEFAULT_SCORE_THRESH", "DEFAULT_TOP_K", "DET_WIDTH", "GROUP_COLORS", "GT_COLOR", "GT_WIDTH",
           "LEGEND_PX", "PADDING", "default_image_ids", "default_scale", "detection_grid", "draw_detections", "grid_size",
           "select_detections", "upscale"]

#: Box colour of each frequency group of the predicted class (RGB): rare magenta, common orange,
#: frequent cyan -- saturated, apart from the ground truth's white and the grey backgrounds of the
#: embedded dataset (its ``lvis`` vocabulary has shapes of similar colours: the label says the group).
GROUP_COLORS: dict[str, tuple[int, int, int]] = {"r": (255, 0, 255), "c": (255, 160, 0), "f": (0, 230, 255)}
GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}
GT_COLOR = (255, 255, 255)
GT_WIDTH = 1
DET_WIDTH = 2
LABEL_TEXT_COLOR = (0, 0, 0)
#: Pixels between tiles and around the grid (make_grid's ``padding``).
PADDING = 2
#: Height of the caption strip under each image and of the legend strip under the grid.
CAPTION_PX = 14
LEGEND_PX = 16
#: Default detection filter of :func:`detection_grid` (and ``taildet show``).
DEFAULT_SCORE_THRESH = 0.3
DEFAULT_TOP_K = 10
#: The default scale makes the largest image side about this many pixels (:func:`default_scale`).
TARGET_SIDE = 384


def default_scale(sizes: Sequence[tuple[int, int]]) -> int:
    """``max(1, TARGET_SIDE // largest side)`` over the images' ``(height, width)``: 4 for the
    embedded dataset's 96 px images, 1 for LVIS-size ones."""
    return max(1, TARGET_SIDE // max(max(h, w) for h, w in sizes))


def grid_size(sizes: Sequence[tuple[int, int]], scale: int, cols: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of the PNG :func:`detection_grid` writes for images of
    ``sizes`` (``(height, width)`` each), see the module docstring."""
    n = len(sizes)
    c = min(cols, n)
    r = math.ceil(n / c)
    tile_w = max(w for _, w in sizes) * scale
    tile_h = max(h for h, _ in sizes) * scale + CAPTION_PX
    return c * (tile_w + PADDING) + PADDING, r * (tile_h + PADDING) + PADDING + LEGEND_PX


def select_detections(scores: torch.Tensor, score_thresh: float, top_k: int) -> torch.Tensor:
    """Indices of the detections shown: score >= ``score_thresh``, highest first (ties in input
    order), at most ``top_k``. ``scores``: float ``[N]``; returns int64 ``[<= top_k]``."""
    keep = torch.nonzero(scores >= score_thresh).flatten()
    order = torch.sort(scores[keep], descending=True, stable=True).indices
    return keep[order][:top_k]


def upscale(image: torch.Tensor, scale: int) -> torch.Tensor:
    """Nearest-neighbour upscaling by an integer factor: ``[3, H, W]`` -> ``[3, H * scale, W * scale]``
    (every pixel becomes a ``scale x scale`` block)."""
    return image.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def draw_detections(image: torch.Tensor, gt_boxes: torch.Tensor, boxes: torch.Tensor, labels: Sequence[str],
                    colors: Sequence[tuple[int, int, int]], scale: int = 1) -> torch.Tensor:
    """One image with its ground truth and detections drawn, upscaled by ``scale``.

    Args:
        image: uint8 ``[3, H, W]``.
        gt_boxes: float ``[G, 4]`` xyxy in image pixels, drawn white, :data:`GT_WIDTH` px.
        boxes: float ``[N, 4]`` xyxy in image pixels, the detections (drawn after the ground
            truth, so on top), :data:`DET_WIDTH` px, each in ``colors[i]`` with ``labels[i]``
            written on a box of that colour inside its top-left corner.
        scale: integer upscale factor (:func:`upscale`); boxes are scaled with the image.

    Returns:
        uint8 ``[3, H * scale, W * scale]``.
    """

    out = upscale(image, scale)
    if len(gt_boxes):
        out = draw_bounding_boxes(out, gt_boxes.float() * scale, colors=GT_COLOR, width=GT_WIDTH)
    if len(boxes):
        out = draw_bounding_boxes(out, boxes.float() * scale, labels=list(labels), colors=list(colors),
                                  width=DET_WIDTH, fill_labels=True, label_colors=LABEL_TEXT_COLOR)
    return out


def default_image_ids(ds: LVISDataset, num: int) -> list[int]:
    """The first ``num`` image ids when none are given: images whose ground truth holds a rare
    class, then a common one, then the rest; by id within each group."""
    rank = {"r": 0, "c": 1, "f": 2}

    def key(i: int) -> tuple[int, int]:
        groups = [rank.get(ds.frequency_groups[int(lab)], 2) for lab in ds.labels_per_image[i]]
        return (min(groups, default=3), int(ds.image_ids[i]))

    return [int(ds.image_ids[i]) for i in sorted(range(ds.num_images), key=key)[:num]]


def _check_params(num_images: int, score_thresh: float, top_k: int, cols: int, scale: int | None) -> None:
    for name, v in (("num_images", num_images), ("top_k", top_k), ("cols", cols)):
        if int(v) < 1:
            raise ConfigError(f"show: {name} must be at least 1, got {v}")
    if scale is not None and int(scale) < 1:
        raise ConfigError(f"show: scale must be an integer >= 1, got {scale}")
    if not math.isfinite(float(score_thresh)):
        raise ConfigError(f"show: score_thresh must be a finite number, got {score_thresh}")


def _tile(drawn: torch.Tensor, tile_h: int, tile_w: int, caption: str) -> torch.Tensor:
    """One grid cell: ``drawn`` (uint8 ``[3, h, w]``, ``h <= tile_h``, ``w <= tile_w``) at the top-left
    of a black ``[3, tile_h + CAPTION_PX, tile_w]`` cell, ``caption`` written in the strip under it
    (cut at the cell's edge)."""

    cell = Image.new("RGB", (tile_w, tile_h + CAPTION_PX), (0, 0, 0))
    cell.paste(Image.fromarray(drawn.permute(1, 2, 0).numpy()), (0, 0))
    ImageDraw.Draw(cell).text((2, tile_h + 1), caption, fill=(255, 255, 255), font=ImageFont.load_default())
    return torch.from_numpy(np.array(cell)).permute(2, 0, 1)


def _with_legend(grid: torch.Tensor) -> np.ndarray:
    """The grid (uint8 ``[3, H, W]``) with the legend strip added under it: ``[H + LEGEND_PX, W, 3]``."""

    h, w = grid.shape[1:]
    canvas = Image.new("RGB", (w, h + LEGEND_PX), (0, 0, 0))
    canvas.paste(Image.fromarray(grid.permute(1, 2, 0).numpy()), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x, y = PADDING + 2, h + 2
    items = [("ground truth", GT_COLOR)] + [(f"{GROUP_NAMES[g]} class", GROUP_COLORS[g]) for g in "rcf"]
    for text, color in items:
        draw.rectangle((x, y + 2, x + 8, y + 10), fill=color)
        draw.text((x + 12, y), text, fill=(255, 255, 255), font=font)
        x += 12 + int(draw.textlength(text, font=font)) + 14
    return np.asarray(canvas)


def detection_grid(gt: str | os.PathLike | LVISDataset, results: str | os.PathLike, out_png: str | os.PathLike,
                   image_root: str | os.PathLike | None = None, image_ids: Sequence[int] | None = None,
                   num_images: int = 16, score_thresh: float = DEFAULT_SCORE_THRESH, top_k: int = DEFAULT_TOP_K, cols: int = 4,
                   scale: int | None = None) -> dict:
    """Draw ground truth and detections on dataset images into one PNG grid (module docstring).

    Args:
        gt: the ground-truth JSON (or a dataset :func:`~taildet.data.load_lvis` made).
        results: bbox results JSON (LVIS/COCO results format, original category ids).
        out_png: the PNG to write; never one of the inputs.
        image_root: image directory, resolved as :func:`~taildet.data.load_lvis` does (default
            ``<gt dir>/../images`` when it exists, else the GT's directory); ignored for a dataset.
        image_ids: the images, in this order; default :func:`default_image_ids` (``num_images``).
        score_thresh, top_k: which detections of an image are drawn (:func:`select_detections`).
        cols: tiles per row. scale: integer upscale factor (default :func:`default_scale`).

    Returns:
        ``{"path", "image_ids", "scale", "size": (width, height), "shown": {image id: detections
        drawn}}``.

    Raises:
        DataError naming the file and the item: unreadable GT or results, a result whose image or
        category is not in the GT (``results[i]``), an image id not in the GT, a missing image file.
        ConfigError for a parameter out of range; OutputError when ``out_png`` is an input or
        cannot be written. Everything is checked and drawn before the PNG is written.
    """


    _check_params(num_images, score_thresh, top_k, cols, scale)
    ds = gt if isinstance(gt, LVISDataset) else None
    check_not_inputs({"output PNG": out_png}, {"GT": ds.path if ds else gt, "results": results})
    if ds is None:
        ds = load_lvis(gt, image_root)
    cols_ = GtIds({"images": [{"id": i} for i in ds.image_ids], "categories": [{"id": c} for c in ds.cat_ids]})
    res = read_result_columns(results, cols_, "bbox")
    index = {int(i): k for k, i in enumerate(ds.image_ids)}
    if image_ids is None:
        image_ids = default_image_ids(ds, int(num_images))
    image_ids = [int(i) for i in image_ids]
    for i in image_ids:
        if i not in index:
            raise DataError(ds.path, f"image id {i}", "not an image of this ground truth (asked for by image_ids)")
    if not image_ids:
        raise DataError(ds.path, "images", "no image to show")
    check_not_inputs({"output PNG": out_png}, {f"image {i}": ds.image_path(index[i]) for i in image_ids})
    check_output_path(out_png, what="output PNG")

    sizes = [(int(ds.images[index[i]]["height"]), int(ds.images[index[i]]["width"])) for i in image_ids]
    scale = int(scale) if scale is not None else default_scale(sizes)
    tile_h, tile_w = max(h for h, _ in sizes) * scale, max(w for _, w in sizes) * scale
    tiles, shown = [], {}
    for i in image_ids:
        image, target = ds[index[i]]
        image = (image * 255).round().to(torch.uint8)
        sel = np.nonzero(res.image_id == i)[0]
        scores = torch.from_numpy(res.score[sel])
        keep = sel[select_detections(scores, float(score_thresh), int(top_k)).numpy()]
        boxes = box_convert(torch.from_numpy(res.bbox[keep]).reshape(-1, 4), "xywh", "xyxy")
        labels_ = [ds.cat_id_to_label[int(c)] for c in res.category_id[keep]]
        names = [f"{ds.class_names[lab]} {s:.2f}" for lab, s in zip(labels_, res.score[keep].tolist())]
        colors = [GROUP_COLORS[ds.frequency_groups[lab]] for lab in labels_]
        drawn = draw_detections(image, target["boxes"], boxes, names, colors, scale)
        gt_groups = [ds.frequency_groups[int(lab)] for lab in target["labels"]]
        counts = ", ".join(f"{gt_groups.count(g)} {g}" for g in "rcf")
        tiles.append(_tile(drawn, tile_h, tile_w, f"image {i}: GT {counts}; {len(keep)} of {len(sel)} detections"))
        shown[i] = len(keep)
    grid = make_grid(tiles, nrow=int(cols), padding=PADDING, pad_value=0)
    if len(tiles) == 1:  # make_grid returns a single image without its border
        grid = torch.nn.functional.pad(grid, (PADDING,) * 4)
    pixels = _with_legend(grid)

    def write(fh) -> None:

        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        fh.write(buf.getvalue())

    path = atomic_write(out_png, write)
    return {"path": str(path), "image_ids": image_ids, "scale": scale,
            "size": (pixels.shape[1], pixels.shape[0]), "shown": shown}
