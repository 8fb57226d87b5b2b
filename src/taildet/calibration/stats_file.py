"""The LogN statistics file: writing, reading and validating it (JSON).

Format::

    {"format": "taildet-logit-statistics", "version": 1,
     "num_classes": C, "class_names": [...] | null,
     "stages": {"roi_heads": {"num_classes": C, "background": true, "background_index": C,
                              "momentum": null, "mode": "all", "beta": "min_fg", "eps": 1e-11,
                              "count": n, "mean": [K], "var": [K], "m2": [K]}, ...},
     "extra": {...}}

One key per classification stage: ``"roi_heads"`` (Faster/Mask R-CNN), ``"head"`` (one-stage),
and for a cascade one key per stage (e.g. ``"roi_heads.0"``, ``"roi_heads.1"``, ...) -- each
stage keeps its own statistics (spec section 1). All stages share the class list.

This module knows the document only; a stage entry is made from and turned back into a
:class:`~taildet.calibration.logit_norm.LogitNormalizer` by that class
(``state_for_file`` / ``from_file_state``; :func:`~taildet.calibration.logit_norm.save_normalizers`
and :func:`~taildet.calibration.logit_norm.load_normalizers`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from taildet.errors import DataError

__all__ = ["FILE_FORMAT", "FILE_VERSION", "write_statistics_file", "read_statistics_file"]

#: ``"format"`` value of a statistics file.
FILE_FORMAT = "taildet-logit-statistics"
FILE_VERSION = 1


def write_statistics_file(path: str | os.PathLike, num_classes: int, class_names: Sequence[str] | None,
                          stages: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> None:
    """Write the document (to a temporary name, then renamed): ``stages`` maps stage keys to their
    entries (JSON-able dicts)."""
    doc = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "num_classes": int(num_classes),
        "class_names": None if class_names is None else list(class_names),
        "stages": {str(k): dict(v) for k, v in stages.items()},
        "extra": dict(extra) if extra else {},
    }
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def _read_doc(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DataError(path, "", "statistics file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, "", f"not a taildet statistics file (invalid JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
        raise DataError(path, "format", f"not a taildet statistics file (expected format {FILE_FORMAT!r})")
    if int(doc.get("version", 0)) > FILE_VERSION:
        raise DataError(path, "version", f"written by a newer taildet (version {doc.get('version')})")
    if not isinstance(doc.get("stages"), dict) or not doc["stages"]:
        raise DataError(path, "stages", "missing or empty")
    return doc


def read_statistics_file(path: str | os.PathLike, class_names: Sequence[str] | None = None,
                         num_classes: int | None = None) -> tuple[list[str] | None, dict[str, dict]]:
    """Read and validate a statistics file: ``(class names, {stage: entry})``.

    ``num_classes`` / ``class_names``: the model's; a mismatch is a :class:`DataError` that names
    the file and the first class that differs. A file saved without class names is checked on
    the count only. The names returned are the model's when given, else the file's.
    """
    path = os.fspath(path)
    doc = _read_doc(path)
    file_c = doc.get("num_classes")
    file_names = doc.get("class_names")
    if class_names is not None:
        class_names = [str(n) for n in class_names]
        if num_classes is not None and len(class_names) != int(num_classes):
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        num_classes = len(class_names)
    if num_classes is not None and file_c != int(num_classes):
        extra = ""
        if file_names is not None and class_names is not None:
            for i, (a, b) in enumerate(zip(file_names, class_names)):
                if a != b:
                    extra = f"; first differing class: label {i} is {a!r} in the file, {b!r} in the model"
                    break
            else:
                shorter = min(len(file_names), len(class_names))
                more = file_names if len(file_names) > shorter else class_names
                extra = f"; first differing class: label {shorter} ({more[shorter]!r}) exists only in the " + (
                    "file" if more is file_names else "model"
                )
        raise DataError(
            path, "num_classes", f"statistics are for {file_c} classes, the model has {num_classes}{extra}"
        )
    if class_names is not None and file_names is not None:
        for i, (a, b) in enumerate(zip(file_names, class_names)):
            if a != b:
                raise DataError(
                    path,
                    f"class {i}",
                    f"statistics belong to a different class list: label {i} is {a!r} in the file, "
                    f"{b!r} in the model",
                )
    names = class_names if class_names is not None else file_names
    stages = {}
    for key, entry in doc["stages"].items():
        if not isinstance(entry, dict):
            raise DataError(path, f"stage {key!r}", "not an object")
        if entry.get("num_classes") != file_c:
            raise DataError(path, f"stage {key!r}", f"has {entry.get('num_classes')} classes, file says {file_c}")
        stages[key] = entry
    return names, stages
