"""The LogN statistics file module (taildet.calibration.stats_file) on its own, and the losses
package no longer importing calibration (the online LogN loss lives in taildet.losses)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from taildet.calibration.stats_file import FILE_FORMAT, read_statistics_file, write_statistics_file
from taildet.errors import DataError


def test_write_then_read_round_trip(tmp_path):
    entry = {"num_classes": 2, "background": True, "count": 3.0, "mean": [0.5, -1.0, 2.0], "var": [1.0, 2.0, 3.0]}
    path = tmp_path / "sub" / "stats.json"
    write_statistics_file(path, 2, ["a", "b"], {"roi_heads": entry}, extra={"run": "x"})
    doc = json.loads(path.read_text())
    assert doc["format"] == FILE_FORMAT and doc["extra"] == {"run": "x"} and doc["class_names"] == ["a", "b"]
    names, stages = read_statistics_file(path, class_names=["a", "b"])
    assert names == ["a", "b"] and stages == {"roi_heads": entry}
    names, _ = read_statistics_file(path)  # the file's names when the model gives none
    assert names == ["a", "b"]


def test_read_validates_format_classes_and_stages(tmp_path):
    path = tmp_path / "stats.json"
    write_statistics_file(path, 2, ["a", "b"], {"head": {"num_classes": 2}})
    with pytest.raises(DataError, match="label 1 is 'b' in the file, 'c' in the model"):
        read_statistics_file(path, class_names=["a", "c"])
    with pytest.raises(DataError, match="statistics are for 2 classes, the model has 3"):
        read_statistics_file(path, num_classes=3)
    write_statistics_file(path, 2, None, {"head": {"num_classes": 5}})
    with pytest.raises(DataError, match="has 5 classes, file says 2"):
        read_statistics_file(path)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataError, match="not a taildet statistics file"):
        read_statistics_file(path)
    with pytest.raises(DataError, match="statistics file not found"):
        read_statistics_file(tmp_path / "missing.json")


def test_losses_import_without_calibration():
    code = "import sys, taildet.losses; print('taildet.calibration' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
