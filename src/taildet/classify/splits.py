"""The CIFAR-LT split builder and the split manifest.

Long-tailed training split (the CIFAR-10/100-LT protocol of Cao et al. 2019, used by Balanced
Softmax): classes ordered by index ``c = 0..C-1`` keep

    n_c = floor(n_max * imbalance ** (-c / (C - 1)))

training images (class 0 keeps ``n_max``, class ``C-1`` keeps ``floor(n_max / imbalance)``; at least
one image each). The images kept are a seeded random subset of the class's pool. Before the
training pool is cut, ``test_per_class`` (and ``val_per_class``) images of every class are set aside
as the class-balanced test (and validation) split. ``n_max`` defaults to the smallest class pool
left after that, so every class can give its profile count.

Manifest (JSON, ``manifest.json``)::

    {"format": "taildet-classify-manifest", "version": 1,
     "source": {"kind": "npz", "file": "images.npz"}         # or {"kind": "folder", "root": DIR}
     "classes": [name, ...],
     "splits": {"train": [[ref, label], ...], "val": [...], "test": [...]},
     "protocol": {"imbalance": 100, "n_max": 114, "seed": 0, "test_per_class": 40, ...}}

``ref`` is an index into the npz's ``images`` array, or a file path relative to the folder root.
Relative ``file`` / ``root`` paths are relative to the manifest's directory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from taildet.classify.data import list_image_folder, load_digits, synthetic_crops
from taildet.errors import ConfigError, DataError
from taildet.fileio import atomic_write, atomic_write_text, check_not_inputs, check_output_path

__all__ = ["MANIFEST_FORMAT", "lt_counts", "build_lt_split", "write_manifest", "read_manifest", "make_split"]

MANIFEST_FORMAT = "taildet-classify-manifest"


def lt_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """``[C]`` training images per class of the exponential profile (module docstring); ``>= 1``."""
    if int(num_classes) < 1 or int(n_max) < 1:
        raise ConfigError(f"lt_counts: num_classes and n_max must be >= 1, got {num_classes}, {n_max}")
    if not float(imbalance) >= 1.0:
        raise ConfigError(f"--imbalance: expected a number >= 1 (n_max / n_min), got {imbalance!r}")
    c = int(num_classes)
    if c == 1:
        return [int(n_max)]
    return [max(1, math.floor(n_max * float(imbalance) ** (-k / (c - 1)) + 1e-9)) for k in range(c)]


def build_lt_split(labels: Any, num_classes: int, imbalance: float, *, seed: int = 0, n_max: int | None = None,
                   test_per_class: int = 0, val_per_class: int = 0, source: str = "labels") -> dict[str, Any]:
    """Indices of the long-tailed train split and the balanced val/test splits of ``labels``.

    Returns ``{"train", "val", "test"}`` (sorted int64 index arrays) and ``"counts"`` (the
    training count per class) and ``"n_max"``. A class whose pool is too small for the balanced
    splits plus its profile count is a :class:`DataError` naming it.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(source, "labels", f"must be in 0..{num_classes - 1}")
    rng = np.random.default_rng([int(seed), 17])
    pools = [rng.permutation(np.nonzero(y == c)[0]) for c in range(num_classes)]
    held = test_per_class + val_per_class
    left = [p.size - held for p in pools]
    short = [c for c in range(num_classes) if left[c] < 1]
    if short:
        raise DataError(source, f"class {short[0]}", f"has {pools[short[0]].size} images; the balanced "
                        f"test/val splits take {held} per class and training needs at least 1")
    if n_max is None:
        n_max = min(left)
    counts = lt_counts(n_max, num_classes, imbalance)
    bad = [c for c in range(num_classes) if counts[c] > left[c]]
    if bad:
        c = bad[0]
        raise DataError(source, f"class {c}", f"needs {counts[c]} training images (n_max {n_max}, imbalance "
                        f"{imbalance:g}) but only {left[c]} are left after the balanced splits")
    out = {"train": [], "val": [], "test": []}
    for c, p in enumerate(pools):
        out["test"].append(p[:test_per_class])
        out["val"].append(p[test_per_class:held])
        out["train"].append(p[held:held + counts[c]])
    res: dict[str, Any] = {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in out.items()}
    res["counts"] = counts
    res["n_max"] = int(n_max)
    return res


def write_manifest(path: str | os.PathLike, source: dict, classes: list[str], splits: dict[str, list],
                   protocol: dict | None = None) -> Path:
    """Write a manifest (module docstring) atomically."""
    doc = {"format": MANIFEST_FORMAT, "version": 1, "source": source, "classes": list(classes),
           "splits": splits, "protocol": protocol or {}}
    return atomic_write_text(json.dumps(doc) + "\n", path)


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and check a manifest; relative source paths resolved against its directory.

    Every problem is a :class:`DataError` naming the manifest and the item (a missing image file
    names the split and the entry)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "", "manifest not found (write one with `taildet classify split`)")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, "", f"not a JSON file: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise DataError(path, "format", f"not a taildet classification manifest (expected format {MANIFEST_FORMAT!r})")
    classes = doc.get("classes")
    if not isinstance(classes, list) or not classes:
        raise DataError(path, "classes", "expected a non-empty list of class names")
    src = doc.get("source")
    if not isinstance(src, dict) or src.get("kind") not in ("npz", "folder"):
        raise DataError(path, "source", "expected {'kind': 'npz', 'file': ...} or {'kind': 'folder', 'root': ...}")
    key = "file" if src["kind"] == "npz" else "root"
    if not isinstance(src.get(key), str):
        raise DataError(path, f"source.{key}", "missing")
    base = os.path.dirname(os.path.abspath(path))
    src = dict(src)
    src[key] = os.path.normpath(os.path.join(base, src[key]))
    if not os.path.exists(src[key]):
        raise DataError(path, f"source.{key}", f"{src[key]} does not exist")
    splits = doc.get("splits")
    if not isinstance(splits, dict) or not isinstance(splits.get("train"), list) or not splits["train"]:
        raise DataError(path, "splits.train", "expected a non-empty list of [ref, label] entries")
    num_classes = len(classes)
    for name, entries in splits.items():
        if not isinstance(entries, list):
            raise DataError(path, f"splits.{name}", "expected a list of [ref, label] entries")
        for i, e in enumerate(entries):
            ok = isinstance(e, list) and len(e) == 2 and isinstance(e[1], int) and 0 <= e[1] < num_classes
            ok = ok and (isinstance(e[0], int) if src["kind"] == "npz" else isinstance(e[0], str))
            if not ok:
                ref = "an integer index" if src["kind"] == "npz" else "a file path"
                raise DataError(path, f"splits.{name}[{i}]", f"expected [{ref}, label in 0..{num_classes - 1}], "
                                f"got {e!r}")
            if src["kind"] == "folder" and not os.path.isfile(os.path.join(src[key], e[0])):
                raise DataError(path, f"splits.{name}[{i}]", f"image file {os.path.join(src[key], e[0])} not found")
    doc["source"] = src
    doc["path"] = path
    return doc


def _source_arrays(src: str, seed: int, per_class: int | None) -> tuple[dict, list[str], Any, str | None]:
    """``(payload, classes, labels, folder_root)`` of a split source: ``digits``, ``synthetic``, an
    ``.npz`` file (``images``, ``labels``, optional ``classes``) or an image folder."""
    if src == "digits":
        images, labels = load_digits()
        return {"images": images, "labels": labels}, [str(i) for i in range(10)], labels, None
    if src == "synthetic":
        d = synthetic_crops(seed=seed, per_class=per_class or 60)
        return {"images": d["images"], "labels": d["labels"]}, d["classes"], d["labels"], None
    if os.path.isdir(src):
        classes, items = list_image_folder(src)
        return {"items": items}, classes, np.array([y for _, y in items], dtype=np.int64), src
    if src.endswith(".npz") and os.path.isfile(src):
        with np.load(src, allow_pickle=False) as z:
            if "images" not in z or "labels" not in z:
                raise DataError(src, "", "an .npz source needs arrays 'images' and 'labels'")
            images, labels = z["images"], z["labels"].astype(np.int64)
            classes = [str(c) for c in z["classes"]] if "classes" in z else [str(i) for i in range(int(labels.max()) + 1)]
        return {"images": images, "labels": labels}, classes, labels, None
    raise DataError(src, "", "not a split source: expected 'digits', 'synthetic', an image folder or an .npz file")


def make_split(src: str, out: str | os.PathLike, imbalance: float = 100.0, *, seed: int = 0,
               n_max: int | None = None, test_per_class: int = 40, val_per_class: int = 20,
               per_class: int | None = None, test_src: str | None = None) -> dict:
    """``taildet classify split``: write ``OUT/manifest.json`` (and ``OUT/images.npz`` for array
    sources) with the long-tailed train split and the balanced val/test splits of ``src``.

    ``test_src``: a separate test set (the CIFAR-LT protocol keeps the official test set), every
    image of which is the test split; ``test_per_class`` must then be 0. It must have the same
    classes (names, order) and be of the same kind (array / folder) as ``src``.

    Returns ``{"manifest", "counts", "n_max", "sizes"}``."""
    out = Path(out)
    check_output_path(out, directory=True, what="split")
    manifest = out / "manifest.json"
    if test_src is not None and test_per_class:
        raise ConfigError("--test-per-class: must be 0 with --test-src (the test split is all of --test-src)")
    payload, classes, labels, root = _source_arrays(src, seed, per_class)
    split = build_lt_split(labels, len(classes), imbalance, seed=seed, n_max=n_max, test_per_class=test_per_class,
                           val_per_class=val_per_class, source=src)
    test_entries: list = []
    if test_src is not None:
        t_payload, t_classes, t_labels, t_root = _source_arrays(test_src, seed + 1, per_class)
        if t_classes != classes:
            raise DataError(test_src, "classes", f"differ from {src}'s ({len(t_classes)} vs {len(classes)}: "
                            f"{t_classes[:3]} vs {classes[:3]} ...)")
        if (t_root is None) != (root is None):
            raise DataError(test_src, "", f"must be of the same kind as {src} (both image folders or both arrays)")
    out.mkdir(parents=True, exist_ok=True)
    if root is None:
        npz = out / "images.npz"
        check_not_inputs({"images.npz": npz}, {"source": src, "test source": test_src})
        images = np.ascontiguousarray(payload["images"])
        all_labels = labels
        if test_src is not None:
            if t_payload["images"].shape[1:] != images.shape[1:]:
                raise DataError(test_src, "images", f"shape {t_payload['images'].shape[1:]} differs from {src}'s "
                                f"{images.shape[1:]}")
            test_entries = [[len(images) + i, int(y)] for i, y in enumerate(t_labels)]
            images = np.concatenate([images, t_payload["images"]])
            all_labels = np.concatenate([labels, t_labels])
        atomic_write(npz, lambda fh: np.savez_compressed(fh, images=images, labels=all_labels))
        source = {"kind": "npz", "file": "images.npz"}
        ref = (lambda i: int(i))  # noqa: E731
    else:
        source = {"kind": "folder", "root": os.path.relpath(os.path.abspath(root), out.resolve())}
        items = payload["items"]
        ref = (lambda i: items[i][0])  # noqa: E731
        if test_src is not None:
            test_entries = [[os.path.relpath(os.path.join(os.path.abspath(t_root), rel), os.path.abspath(root)), y]
                            for rel, y in t_payload["items"]]
    splits = {k: [[ref(i), int(labels[i])] for i in split[k]] for k in ("train", "val", "test")}
    if test_src is not None:
        splits["test"] = test_entries
    protocol = {"imbalance": float(imbalance), "n_max": split["n_max"], "seed": int(seed),
                "test_per_class": int(test_per_class), "val_per_class": int(val_per_class),
                "train_counts": split["counts"], "source": src, "test_source": test_src}
    write_manifest(manifest, source, classes, splits, protocol)
    return {"manifest": str(manifest), "counts": split["counts"], "n_max": split["n_max"],
            "sizes": {k: len(v) for k, v in splits.items()}}
