"""Tests for taildet.data.stats: counts, frequency groups, text table and long-tail plot."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from taildet.data.stats import dataset_stats, format_stats, frequency_from_image_count, plot_long_tail
from taildet.errors import DataError
from helpers import LVIS_VAL_100


def _tiny() -> dict:
    """4 images; cat 1 in 3 images (4 instances), cat 2 in 1 image (2), cat 3 in none; no frequency field."""
    return {
        "images": [{"id": i, "width": 10, "height": 10} for i in (10, 11, 12, 13)],
        "categories": [
            {"id": 3, "name": "zebra"},
            {"id": 1, "name": "apple"},
            {"id": 2, "name": "bee"},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 1, "bbox": [0, 0, 1, 1]},
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [0, 0, 1, 1]},
            {"id": 3, "image_id": 11, "category_id": 1, "bbox": [0, 0, 1, 1]},
            {"id": 4, "image_id": 12, "category_id": 1, "bbox": [0, 0, 1, 1]},
            {"id": 5, "image_id": 12, "category_id": 2, "bbox": [0, 0, 1, 1]},
            {"id": 6, "image_id": 12, "category_id": 2, "bbox": [0, 0, 1, 1]},
        ],
    }


@pytest.fixture
def tiny_json(tmp_path) -> Path:
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(_tiny()))
    return p


def test_tiny_exact_numbers(tiny_json):
    s = dataset_stats(tiny_json)
    assert s["file"] == str(tiny_json)
    assert (s["num_images"], s["num_annotations"], s["num_classes"]) == (4, 6, 3)
    assert s["num_images_with_annotations"] == 3
    assert s["frequency_source"] == "image_count"
    assert s["classes"] == [
        {"id": 1, "name": "apple", "frequency": "r", "image_count": 3, "instance_count": 4},
        {"id": 2, "name": "bee", "frequency": "r", "image_count": 1, "instance_count": 2},
        {"id": 3, "name": "zebra", "frequency": "r", "image_count": 0, "instance_count": 0},
    ]
    assert s["groups"] == {"r": 3, "c": 0, "f": 0}
    assert s["group_instance_counts"] == {"r": 6, "c": 0, "f": 0}
    assert s["group_image_counts"] == {"r": 3, "c": 0, "f": 0}
    assert s["imbalance_ratio"] == pytest.approx(3.0)
    json.dumps(s)  # JSON-serialisable


def test_frequency_field_wins_and_groups_by_count():
    d = _tiny()
    d["categories"][1]["frequency"] = "f"  # apple
    d["categories"][2]["frequency"] = "c"  # bee
    s = dataset_stats(d)
    assert s["frequency_source"] == "mixed"
    assert [c["frequency"] for c in s["classes"]] == ["f", "c", "r"]
    assert s["groups"] == {"r": 1, "c": 1, "f": 1}
    assert s["group_image_counts"] == {"r": 0, "c": 1, "f": 3}
    assert s["group_instance_counts"] == {"r": 0, "c": 2, "f": 4}
    assert [frequency_from_image_count(n) for n in (0, 1, 10, 11, 100, 101)] == ["r", "r", "r", "c", "c", "f"]


def test_lvis_val_sample_matches_direct_count():
    data = json.loads(LVIS_VAL_100.read_text())
    s = dataset_stats(LVIS_VAL_100)
    assert s["num_classes"] == len(data["categories"]) == 1230
    assert s["num_images"] == len(data["images"])
    assert s["num_annotations"] == len(data["annotations"])
    direct = Counter(c["frequency"] for c in data["categories"])
    assert s["groups"] == {g: direct[g] for g in "rcf"}
    assert s["frequency_source"] == "field"
    # Counts computed from the annotations, checked against a direct count.
    inst = Counter(a["category_id"] for a in data["annotations"])
    imgs = Counter(c for c, _ in {(a["category_id"], a["image_id"]) for a in data["annotations"]})
    for c in s["classes"]:
        assert c["instance_count"] == inst.get(c["id"], 0)
        assert c["image_count"] == imgs.get(c["id"], 0)
    nz = [v for v in imgs.values() if v > 0]
    assert s["imbalance_ratio"] == pytest.approx(max(nz) / min(nz))
    text = format_stats(s)
    for word in ("rare", "common", "frequent", "1230", "head", "tail"):
        assert word in text


def test_plot_long_tail_writes_png(tmp_path, tiny_json):
    s = dataset_stats(LVIS_VAL_100)
    out = plot_long_tail(s, tmp_path / "sub" / "lt.png")
    data = Path(out).read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = plot_long_tail(s, tmp_path / "declared.png", count="declared_image_count")
    assert Path(out2).stat().st_size > 1000
    with pytest.raises(DataError, match="declared_image_count"):
        plot_long_tail(dataset_stats(tiny_json), tmp_path / "x.png", count="declared_image_count")


def test_bad_input(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        dataset_stats(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        dataset_stats(bad)
    d = _tiny()
    del d["categories"]
    with pytest.raises(DataError, match="categories"):
        dataset_stats(d)
    d = _tiny()
    d["annotations"][2]["category_id"] = 99
    with pytest.raises(DataError, match=r"annotation id 3.*category_id 99"):
        dataset_stats(d)
    d = _tiny()
    d["annotations"][0]["image_id"] = 77
    with pytest.raises(DataError, match=r"annotation id 1.*image_id 77"):
        dataset_stats(d)
    d = _tiny()
    d["categories"][0]["frequency"] = "x"
    with pytest.raises(DataError, match=r"category id 3.*frequency"):
        dataset_stats(d)
