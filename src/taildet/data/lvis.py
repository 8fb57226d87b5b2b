"""LVIS / COCO instance annotations: reader, validation and the dataset object.

``load_lvis(path)`` reads an LVIS (v0.5 / v1) or COCO instances JSON, checks it, and returns an
:class:`LVISDataset` whose items are ``(image, target)`` pairs in the format torchvision detectors
take: ``image`` float32 ``[3, H, W]`` in ``[0, 1]``; ``target["boxes"]`` absolute ``xyxy``,
``target["labels"]`` contiguous ``0..C-1`` (LVIS category ids are mapped here, at the data
boundary; ``ds.cat_ids[label]`` maps back).

Validation policy (every error is a :class:`taildet.errors.DataError` naming the file, the item and
the problem):

* structural problems are always errors: unreadable file, invalid JSON, a missing top-level key,
  a missing per-item key, duplicate ids, an id that is not an integer within +-(2**53 - 1)
  (:data:`MAX_SAFE_ID`), an image without a positive width/height, an empty ``images`` or
  ``categories`` list, a category ``frequency`` that is not ``r``/``c``/``f``;
* per-annotation problems (unknown image id, unknown category id, malformed / non-finite bbox,
  non-positive box width or height, box outside the image beyond a 1 px tolerance, an ``area``
  that is not a finite number >= 0, malformed segmentation when masks are requested) raise by
  default; with ``skip_invalid=True`` the
  annotation is dropped, counted in ``ds.skipped[reason]`` and one warning summarises them.

Boxes that stick out of the image by at most 1 px (rounding in real LVIS/COCO) are clipped to the
image and counted in ``ds.clipped_boxes``.

The checks are in :mod:`taildet.data.lvis_validate` (its names are importable from here too), the
indexing in :mod:`taildet.data.lvis_index`.

Memory: the file is read a piece at a time (:mod:`taildet.data.json_stream`) and every image and
annotation is kept as a serialized record in one numpy buffer, with boxes, labels, areas and
iscrowd flags in flat numpy arrays (:mod:`taildet.data.records`). ``images``,
``annotations_per_image`` and ``labels_per_image`` are read-only sequences that decode an item
when it is accessed, and ``get_target`` reads the arrays: DataLoader workers started by ``fork``
share all of it without copying (LVIS v1 train: ~1.5 GB in all, instead of a Python object per
polygon coordinate in every worker).

Crowd annotations (``iscrowd=1``) are kept in the target with ``iscrowd=1``; the models decide what
to do with them. They count towards ``image_counts`` / ``instance_counts`` like any annotation.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from typing import Any, Callable, Iterable

import numpy as np
import torch
from PIL import Image

from taildet.errors import DataError
from taildet.data.json_stream import read_json_object
from taildet.data.lvis_index import AnnotationPacker, parse_lvis
from taildet.data.lvis_validate import (BOX_TOLERANCE, MAX_SAFE_ID, federated_ids_problem, frequency_group, id_problem,
                                        rle_counts_problem)
from taildet.data.lvis_validate import _check_segmentation as _check_segmentation  # re-exported

__all__ = [
    "BOX_TOLERANCE",
    "LVISDataset",
    "MAX_SAFE_ID",
    "check_same_categories",
    "frequency_group",
    "id_problem",
    "federated_ids_problem",
    "image_path",
    "load_lvis",
    "rle_counts_problem",
]


def _read_json_whole(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(path, "", f"cannot read annotation file: {e.strerror or e}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno} column {e.colno}", f"invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, "", f"not a UTF-8 JSON file: {e}") from None
    if not isinstance(data, dict):
        raise DataError(path, "top level", f"expected a JSON object, got {type(data).__name__}")
    return data


def _read_json(path: str, with_masks: bool) -> dict:
    """The file's JSON object, its ``annotations`` packed as they are read (see
    :mod:`taildet.data.json_stream`): the Python objects of the whole file never exist at once."""
    try:
        return read_json_object(path, {"annotations": lambda: AnnotationPacker(with_masks)},
                                lambda: _read_json_whole(path), errors="surrogatepass")
    except OSError as e:
        raise DataError(path, "", f"cannot read annotation file: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno} column {e.colno}", f"invalid JSON: {e.msg}") from None


def _decode_mask(seg: Any, height: int, width: int, box_xyxy: np.ndarray) -> np.ndarray:
    """Decode one polygon list / RLE into a uint8 ``[H, W]`` mask.

    A polygon too thin to cover any pixel centre decodes to nothing in pycocotools; rather than
    return an empty mask for an object that exists, the pixel under the box centre is set.
    """
    from pycocotools import mask as mask_utils  # optional: pycocotools, imported on use

    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
        m = mask_utils.decode(rle)
        if not m.any():
            cx = int(min(max((box_xyxy[0] + box_xyxy[2]) / 2, 0), width - 1))
            cy = int(min(max((box_xyxy[1] + box_xyxy[3]) / 2, 0), height - 1))
            m[cy, cx] = 1
        return m.astype(np.uint8)
    if isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(np.uint8)


def _to_rgb8(img: Image.Image) -> np.ndarray:
    """An opened image as uint8 ``[H, W, 3]``.

    16-bit grey images (PNG ``I;16``; Pillow opens 16-bit colour PNGs as 8-bit RGB itself) are
    scaled to 8 bit (``v * 255 / 65535``, rounded): ``convert("RGB")`` would clip every value
    above 255 to white. 32-bit integer and float images have no defined range: a DataError.
    """
    if img.mode.startswith("I;16"):
        v = np.asarray(img).astype(np.uint32)
        grey = ((v * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise DataError("image", "", f"{kind} image (mode {img.mode}) has no defined pixel range; "
                        "save it as 8- or 16-bit")
    return np.array(img.convert("RGB"), dtype=np.uint8)


class LVISDataset(torch.utils.data.Dataset):
    """An LVIS/COCO instances file, checked and indexed. Build it with :func:`load_lvis`.

    Attributes (public API):
        path, image_root: the annotation file and the image directory.
        num_classes: C. Labels are contiguous ``0..C-1`` in category-id order.
        categories: category dicts in label order. cat_ids: label -> category id.
        cat_id_to_label: category id -> label. class_names: label -> name.
        frequency_groups: 'r'/'c'/'f' per label (the file's ``frequency`` field, else its
            ``image_count`` field, else computed from this file's annotations).
        image_counts, instance_counts: np.int64 [C], counted from this file's kept annotations.
        image_frequency: np.float64 [C] = image_counts / num_images (f_c).
        num_images, num_annotations: after skipping.
        images: image dicts sorted by id (``neg_category_ids`` / ``not_exhaustive_category_ids``
            untouched), a read-only sequence decoding each on access. image_ids: their ids (list).
        labels_per_image: np.int64 array of the unique labels in each image (dataset order); a
            read-only sequence, each array a fresh copy.
        annotations_per_image: the kept annotation dicts per image (equal to the file's JSON
            objects, in file order), a read-only sequence decoding each image's list on access.
        skipped: reason -> count of skipped annotations; skipped_examples: a few messages.
        clipped_boxes: number of boxes clipped to the image (they stuck out by <= 1 px).
    """

    def __init__(
        self,
        path: str,
        image_root: str,
        data: dict,
        *,
        transforms: Callable | None = None,
        with_masks: bool = False,
        skip_invalid: bool = False,
    ):
        self.path = str(path)
        self.image_root = str(image_root)
        self.transforms = transforms
        self.with_masks = bool(with_masks)
        self.skip_invalid = bool(skip_invalid)
        parse_lvis(self, data)

    # ------------------------------------------------------------------ helpers
    def image_path(self, i: int) -> str:
        """Path of the image at dataset index ``i``."""
        im = self.images[i]
        name = im.get("file_name")
        if name:
            return os.path.join(self.image_root, name)
        # LVIS v1 has no file_name: its coco_url ends in "<split>/<file>" (train2017 or val2017 --
        # LVIS v1 val mixes both). Prefer image_root/<split>/<file> (image_root = the COCO
        # directory), fall back to image_root/<file> (image_root = one split's directory).
        split, base = str(im["coco_url"]).rstrip("/").rsplit("/", 2)[-2:]
        nested = os.path.join(self.image_root, split, base)
        flat = os.path.join(self.image_root, base)
        return flat if (not os.path.exists(nested) and os.path.exists(flat)) else nested

    def label_to_category_id(self, labels: Iterable[int] | torch.Tensor | np.ndarray) -> list[int]:
        """Map contiguous labels back to the file's category ids (for writing results)."""
        if isinstance(labels, torch.Tensor):
            labels = labels.tolist()
        elif isinstance(labels, np.ndarray):
            labels = labels.tolist()
        out = []
        for lab in labels:
            if not (0 <= int(lab) < self.num_classes):
                raise DataError(self.path, f"label {lab}", f"outside 0..{self.num_classes - 1}")
            out.append(self.cat_ids[int(lab)])
        return out

    def group_counts(self) -> dict[str, int]:
        """Number of classes in each frequency group, ``{'r': .., 'c': .., 'f': ..}``."""
        cnt = Counter(self.frequency_groups)
        return {g: cnt.get(g, 0) for g in ("r", "c", "f")}

    def check_image_files(self, max_listed: int = 5) -> None:
        """Check that every image file exists (no decoding: one ``stat`` per image, fast enough to
        run before every training); DataError listing the first missing ones."""
        self.check_images(max_listed, decode=False)

    def check_images(self, max_listed: int = 5, decode: bool = True) -> None:
        """Check that every image file exists and decodes (every pixel: PIL's ``verify()`` alone
        passes a truncated JPEG); DataError listing the first bad ones."""
        bad: list[str] = []
        n_bad = 0
        for i in range(self.num_images):
            p = self.image_path(i)
            problem = None
            if not os.path.isfile(p):
                problem = "missing"
            elif decode:
                try:
                    with Image.open(p) as img:
                        img.verify()  # structure and checksums (PNG)
                    with Image.open(p) as img:  # verify() leaves the file unusable: open it again
                        img.load()  # decode every pixel: a truncated JPEG / PNG fails only here
                except Exception as e:  # noqa: BLE001 - any decoder failure means unreadable
                    problem = f"unreadable ({type(e).__name__}: {e})"
            if problem is not None:
                n_bad += 1
                if len(bad) < max_listed:
                    bad.append(f"{p} (image id {self.image_ids[i]}, {problem})")
        if n_bad:
            more = f" and {n_bad - len(bad)} more" if n_bad > len(bad) else ""
            raise DataError(
                self.path, f"image_root {self.image_root}",
                f"{n_bad} of {self.num_images} image files are missing or unreadable: "
                + "; ".join(bad) + more,
            )

    # ------------------------------------------------------------------ Dataset protocol
    def __len__(self) -> int:
        return self.num_images

    def _load_image(self, i: int) -> torch.Tensor:
        p = self.image_path(i)
        im = self.images[i]
        item = f"image id {im['id']}"
        if not os.path.isfile(p):
            raise DataError(p, item, f"image file not found (image_root {self.image_root}, annotations {self.path})")
        try:
            with Image.open(p) as img:
                arr = _to_rgb8(img)
        except DataError as e:
            raise DataError(p, item, e.problem) from None
        except Exception as e:  # noqa: BLE001
            raise DataError(p, item, f"cannot read image: {type(e).__name__}: {e}") from None
        h, w = arr.shape[:2]
        if (h, w) != (int(im["height"]), int(im["width"])):
            raise DataError(
                p, item,
                f"image is {w}x{h} (WxH) but {self.path} says {int(im['width'])}x{int(im['height'])}",
            )
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)

    def get_target(self, i: int) -> dict[str, Any]:
        """The target dict of image ``i`` without reading the image (no transforms)."""
        if not -self.num_images <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.num_images} images")
        i = int(i) % self.num_images
        im = self.images[i]
        H, W = int(im["height"]), int(im["width"])
        s, e = int(self._ann_offsets[i]), int(self._ann_offsets[i + 1])
        n = e - s
        boxes = self._ann_boxes[s:e]
        target: dict[str, Any] = {
            "boxes": torch.from_numpy(boxes.copy()),
            "labels": torch.from_numpy(self._ann_labels[s:e].copy()),
            "image_id": int(im["id"]),
            "orig_size": torch.tensor([H, W], dtype=torch.int64),
            "size": torch.tensor([H, W], dtype=torch.int64),
            "area": torch.from_numpy(self._ann_area[s:e].copy()),
            "iscrowd": torch.from_numpy(self._ann_iscrowd[s:e].copy()),
            "gt_index": torch.arange(n, dtype=torch.int64),
        }
        if self.with_masks:
            masks = np.zeros((n, H, W), dtype=np.uint8)
            for k, r in enumerate(self._ann_order[s:e].tolist()):
                masks[k] = _decode_mask(self._ann_records.get(r)["segmentation"], H, W, boxes[k])
            target["masks"] = torch.from_numpy(masks)
        return target

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not -self.num_images <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.num_images} images")
        i = i % self.num_images
        image = self._load_image(i)
        target = self.get_target(i)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        g = self.group_counts()
        skipped = f", skipped={sum(self.skipped.values())}" if self.skipped else ""
        return (
            f"LVISDataset({self.path!r}, images={self.num_images}, "
            f"annotations={self.num_annotations}, classes={self.num_classes} "
            f"(r={g['r']}, c={g['c']}, f={g['f']}){skipped})"
        )


def image_path(ds: LVISDataset, i: int) -> str:
    """Path of the image at index ``i`` of ``ds``."""
    return ds.image_path(i)


def _default_image_root(path: str) -> str:
    json_dir = os.path.dirname(os.path.abspath(path))
    candidate = os.path.normpath(os.path.join(json_dir, "..", "images"))
    return candidate if os.path.isdir(candidate) else json_dir


def load_lvis(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    transforms: Callable | None = None,
    with_masks: bool = False,
    skip_invalid: bool = False,
    check_images: bool = False,
) -> LVISDataset:
    """Read and check an LVIS v0.5/v1 or COCO instances JSON; return an :class:`LVISDataset`.

    Args:
        path: the annotation JSON.
        image_root: image directory; default ``<json dir>/../images`` if it exists, else the
            json's directory. Image paths are ``image_root/file_name`` (``file_name`` may hold
            sub-directories), or for LVIS v1 ``image_root/<split>/<file>`` from ``coco_url`` (falling back
            to ``image_root/<file>`` when only that exists).
        transforms: ``callable(image, target) -> (image, target)`` applied in ``__getitem__``.
        with_masks: decode segmentations into ``target["masks"]`` (uint8 [N, H, W]).
        skip_invalid: drop (and count, and warn about) invalid annotations instead of raising.
        check_images: open every image file now; error listing the missing/unreadable ones.
    """
    path = os.fspath(path)
    data = _read_json(path, with_masks)
    if image_root is None:
        root = _default_image_root(path)
    else:
        root = os.fspath(image_root)
        if not os.path.isdir(root):
            warnings.warn(f"{path}: image_root {root} is not a directory; reading images will fail", stacklevel=2)
    ds = LVISDataset(path, root, data, transforms=transforms, with_masks=with_masks, skip_invalid=skip_invalid)
    if check_images:
        ds.check_images()
    return ds


def check_same_categories(train_ds: LVISDataset, val_ds: LVISDataset) -> None:
    """Raise DataError unless both datasets have the same categories (ids and names, in order)."""
    files = f"{train_ds.path} vs {val_ds.path}"
    a = list(zip(train_ds.cat_ids, train_ds.class_names))
    b = list(zip(val_ds.cat_ids, val_ds.class_names))
    for label, (ca, cb) in enumerate(zip(a, b)):
        if ca != cb:
            raise DataError(
                files, f"label {label}",
                f"categories differ: category id {ca[0]} '{ca[1]}' in {train_ds.path} but "
                f"category id {cb[0]} '{cb[1]}' in {val_ds.path}",
            )
    if len(a) != len(b):
        longer, ds_long = (a, train_ds) if len(a) > len(b) else (b, val_ds)
        cid, name = longer[min(len(a), len(b))]
        raise DataError(
            files, f"category id {cid}",
            f"category count differs ({len(a)} in {train_ds.path}, {len(b)} in {val_ds.path}); "
            f"first extra: category id {cid} '{name}' only in {ds_long.path}",
        )
