"""Classification datasets: the split sources and the dataset a manifest split is read into.

Sources (:func:`taildet.classify.splits.make_split`):

* ``digits`` -- scikit-learn's bundled handwritten digits (1,797 images of 8 x 8 px, 10 classes;
  the optional ``classify`` extra), stored as uint8 ``[N, 8, 8, 1]`` (``0..16`` scaled to ``0..255``);
* ``synthetic`` -- object crops of the embedded detection generator's 48 classes
  (:func:`taildet.data.balanced_crops.make_balanced_crops`: 32 px windows of 64 px images);
* an image folder (one sub-folder per class, classes in sorted name order);
* an ``.npz`` file with ``images`` (uint8 ``[N, H, W]`` or ``[N, H, W, 1|3]``) and ``labels``.

:class:`ClassificationDataset` yields ``(image [3, H, W] float, {"label": int64 scalar})`` pairs:
pixels scaled to ``[0, 1]``, normalised with mean 0.5 / std 0.25, grey images repeated to 3
channels; augmentation (training only) is ``flip`` (horizontal) and/or ``pad_crop`` (pad by
``pad`` px with zeros, random crop back), drawn from torch's RNG (seeded per sample by the
engine). ``labels_per_image`` / ``num_classes`` / ``counts`` serve the samplers and the losses.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from taildet.data.balanced_crops import make_balanced_crops
from taildet.data.synthetic import _vocabulary
from taildet.errors import DataError

__all__ = ["load_digits", "synthetic_crops", "list_image_folder", "ClassificationDataset", "load_split",
           "IMAGE_EXTENSIONS", "AUGMENTATIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
AUGMENTATIONS = ("flip", "pad_crop")
_MEAN, _STD = 0.5, 0.25


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(uint8 [1797, 8, 8, 1], int64 [1797])``."""
    try:
        from sklearn.datasets import load_digits as _load  # optional: scikit-learn (the classify extra)
    except ImportError:
        raise DataError("digits", "", "needs scikit-learn: pip install 'taildet[classify]' "
                        "(or pip install scikit-learn)") from None
    d = _load()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64)


def synthetic_crops(seed: int = 0, per_class: int = 60, crop_size: int = 32, image_size: int = 64) -> dict:
    """``per_class`` crops of each of the generator's 48 classes (``images``, ``labels``, ``classes``)."""
    d = make_balanced_crops(seed, per_class, "train", crop_size=crop_size, image_size=image_size)
    return {"images": d["images"], "labels": d["labels"], "classes": list(_vocabulary("default").class_names())}


def list_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, [(relative path, label), ...])`` of an image folder; every class folder must hold
    at least one image (else a DataError naming it)."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(root, "", "no class sub-folders (expected one folder of images per class)")
    items: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, name))
                       if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(root, name, f)))
        if not files:
            raise DataError(root, f"class folder {name!r}", f"holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
        items.extend((os.path.join(name, f), label) for f in files)
    return classes, items


class ClassificationDataset(torch.utils.data.Dataset):
    """One split of a manifest (module docstring).

    Args:
        images: uint8 ``[N, H, W, ch]`` array, or None with ``files`` (paths read with PIL).
        labels: ``[N]`` int labels ``0..C-1``.
        num_classes: ``C``.
        augment: names from :data:`AUGMENTATIONS`.
        source: the file the data comes from (for errors).
    """

    def __init__(self, images: np.ndarray | None, labels: Any, num_classes: int, *, files: list[str] | None = None,
                 augment: tuple[str, ...] = (), pad: int = 4, source: str = "dataset", class_names=None):
        self.images, self.files = images, files
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(num_classes)
        self.augment = tuple(augment)
        self.pad = int(pad)
        self.source = source
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.labels_per_image = [[int(y)] for y in self.labels]

    @property
    def counts(self) -> np.ndarray:
        """``[C]`` images per class."""
        return np.bincount(self.labels, minlength=self.num_classes)

    # the loss statistics (taildet.losses.DATASET_STATISTICS): one instance per image
    @property
    def instance_counts(self) -> list[float]:
        return [float(v) for v in self.counts]

    image_counts = instance_counts

    @property
    def image_frequency(self) -> list[float]:
        return [float(v) / max(1, len(self)) for v in self.counts]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _raw(self, idx: int) -> np.ndarray:
        if self.images is not None:
            return self.images[idx]
        path = self.files[idx]
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(path, f"image {idx}", f"cannot read the image: {e}") from None

    def __getitem__(self, idx: int):
        a = self._raw(int(idx))
        x = torch.from_numpy(np.array(a, dtype=np.float32)).div_(255.0)
        if x.dim() == 2:
            x = x[..., None]
        x = x.permute(2, 0, 1)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        x = (x - _MEAN) / _STD
        if "pad_crop" in self.augment and self.pad > 0:
            h, w = x.shape[1:]
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            i, j = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            x = padded[:, i:i + h, j:j + w]
        if "flip" in self.augment and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x.contiguous(), {"label": torch.tensor(int(self.labels[idx]), dtype=torch.int64)}


def load_split(manifest: dict, split: str, augment: tuple[str, ...] = (), pad: int = 4) -> ClassificationDataset:
    """The ``split`` of a manifest read by :func:`taildet.classify.splits.read_manifest`."""
    entries = manifest["splits"].get(split)
    if entries is None or not entries:
        raise DataError(manifest["path"], f"splits.{split}", "missing or empty")
    src = manifest["source"]
    labels = [e[1] for e in entries]
    classes = manifest["classes"]
    if src["kind"] == "folder":
        files = [os.path.join(src["root"], e[0]) for e in entries]
        return ClassificationDataset(None, labels, len(classes), files=files, augment=augment, pad=pad,
                                     source=manifest["path"], class_names=classes)
    try:
        with np.load(src["file"], allow_pickle=False) as z:
            images = z["images"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(src["file"], "images", f"cannot read the image array: {e}") from None
    idx = np.asarray([e[0] for e in entries], dtype=np.int64)
    if idx.min() < 0 or idx.max() >= images.shape[0]:
        bad = int(np.nonzero((idx < 0) | (idx >= images.shape[0]))[0][0])
        raise DataError(manifest["path"], f"splits.{split}[{bad}]",
                        f"index {int(idx[bad])} is outside {src['file']} ({images.shape[0]} images)")
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(src["file"], "images", f"expected uint8 [N, H, W(, ch)], got {images.dtype} {images.shape}")
    return ClassificationDataset(images[idx], labels, len(classes), augment=augment, pad=pad,
                                 source=manifest["path"], class_names=classes)
