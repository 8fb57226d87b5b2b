"""The LVIS-size benchmark's generator (benchmarks/lvis_scale_data.py) makes what it says: LVIS v1's
category split, sizes proportional to the fraction, files taildet reads, and results with an AP
far from 0 and 1 -- so the full-size numbers in the README measure LVIS-shaped work."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from taildet.data.lvis import load_lvis
from taildet.evaluation import evaluate_lvis
from helpers import load_benchmark

@pytest.fixture(scope="module")
def gen():
    return load_benchmark("lvis_scale_data")


def test_category_split_is_lvis_v1s(gen):
    full = gen.category_image_counts(1.0)
    assert len(full) == 1203
    assert Counter(gen.frequency(full).tolist()) == {"r": 337, "c": 461, "f": 405}


def test_files_are_lvis_shaped_and_readable(gen, tmp_path):
    paths = gen.write_lvis_pair(tmp_path, 0.003, points=8, dets=50, progress=lambda *a: None)
    train = json.loads(paths["train"].read_text())
    n_img = round(gen.TRAIN_IMAGES * 0.003)
    assert len(train["images"]) == n_img
    assert 0.7 < len(train["annotations"]) / (gen.TRAIN_ANNS * 0.003) < 1.3
    assert all(len(a["segmentation"][0]) == 16 for a in train["annotations"])
    assert any(im["neg_category_ids"] for im in train["images"])
    assert any(im["not_exhaustive_category_ids"] for im in train["images"])
    ds = load_lvis(paths["train"])
    assert ds.num_images == n_img and ds.num_classes == 1203
    assert ds.num_annotations == len(train["annotations"])
    # every category's training image count is what the curve gives at this fraction
    assert ds.image_counts.tolist() == gen.category_image_counts(0.003).tolist()
    m = evaluate_lvis(paths["val"], paths["results"])
    assert m["num_results"] == len(json.loads(paths["val"].read_text())["images"]) * 50
    assert 0.1 < m["AP"] < 0.9
