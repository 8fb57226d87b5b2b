"""Tests of the embedded long-tail dataset generator (taildet.data.synthetic)."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from taildet.data import synthetic
from taildet.data.synthetic import describe_design, design_counts, make_dataset
from taildet.errors import ConfigError

# pycocotools' Cython RLE objects warn under numpy 2 when decoded; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _lvis_group(n: int) -> str:
    return "r" if n <= 10 else ("c" if n <= 100 else "f")


def _load(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One scale-1 dataset (a few seconds), shared by the tests that need the real design."""
    out = tmp_path_factory.mktemp("synthetic_full")
    info = make_dataset(out, seed=0, scale=1.0, progress=False)
    return info, _load(info["train_json"]), _load(info["val_json"])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_small")
    info = make_dataset(out, seed=3, scale=0.2, num_workers=1, progress=False)
    return out, info


def test_api_and_layout(full):
    info, train, val = full
    assert set(info) >= {"train_json", "val_json", "image_dir", "num_train_images",
                         "num_val_images", "num_classes"}
    assert info["num_classes"] == 48
    assert info["num_train_images"] == len(train["images"])
    assert info["num_val_images"] == len(val["images"])
    assert 1000 <= info["num_train_images"] <= 1300
    assert 300 <= info["num_val_images"] <= 500
    image_dir = Path(info["image_dir"])
    for data, split in ((train, "train"), (val, "val")):
        for im in data["images"][:5] + data["images"][-5:]:
            assert im["file_name"].startswith(f"{split}/")
            with Image.open(image_dir / im["file_name"]) as img:
                assert img.size == (im["width"], im["height"]) == (96, 96)
                assert img.mode == "RGB"
    names = [c["name"] for c in train["categories"]]
    assert names[:2] == ["red_circle", "orange_circle"] and len(set(names)) == 48
    assert [c["id"] for c in train["categories"]] == list(range(1, 49))
    # val repeats the train category list with the train statistics, as LVIS does
    assert val["categories"] == train["categories"]


def test_frequency_groups_at_scale_1(full):
    _, train, _ = full
    images_of = defaultdict(set)
    instances = Counter()
    for a in train["annotations"]:
        images_of[a["category_id"]].add(a["image_id"])
        instances[a["category_id"]] += 1
    groups = Counter()
    for c in train["categories"]:
        n = len(images_of[c["id"]])
        assert n >= 1
        assert c["image_count"] == n
        assert c["instance_count"] == instances[c["id"]]
        assert c["frequency"] == _lvis_group(n), c["name"]
        groups[c["frequency"]] += 1
    assert all(groups[g] >= 3 for g in "rcf"), groups
    assert groups == {"r": 18, "c": 20, "f": 10}


def test_tail_classes_share_attributes_with_head(full):
    _, train, _ = full
    freq = {c["name"]: c["frequency"] for c in train["categories"]}
    for attr_values, pos in ((synthetic.SHAPES, 1), (synthetic.COLOURS, 0)):
        for v in attr_values:
            members = [g for n, g in freq.items() if n.split("_", 1)[pos] == v]
            assert "f" in members and "r" in members, v


def test_every_class_in_val(full, small):
    _, _, val = full
    per_class = Counter(a["category_id"] for a in val["annotations"])
    assert set(per_class) == set(range(1, 49))
    assert min(per_class.values()) >= 10
    out, info = small
    small_val = _load(info["val_json"])
    assert {a["category_id"] for a in small_val["annotations"]} == set(range(1, 49))


def test_annotations_are_valid(full):
    _, train, val = full
    ann_ids = set()
    for data in (train, val):
        sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
        per_image = Counter()
        for a in data["annotations"]:
            assert a["id"] not in ann_ids
            ann_ids.add(a["id"])
            w, h = sizes[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            assert all(isinstance(v, float) for v in a["bbox"])
            assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h
            assert 13.9 <= max(bw, bh) <= 40.01
            assert a["iscrowd"] == 0
            poly = np.array(a["segmentation"][0]).reshape(-1, 2)
            assert len(a["segmentation"]) == 1 and len(poly) >= 3
            assert np.allclose(poly.min(0), [x, y], atol=0.011)
            assert np.allclose(poly.max(0), [x + bw, y + bh], atol=0.011)
            assert a["area"] > 0
            per_image[a["image_id"]] += 1
        assert set(per_image) == set(sizes)  # no empty image
        assert max(per_image.values()) <= 4
    circles = [a for a in train["annotations"] if a["category_id"] <= 6]
    assert all(len(a["segmentation"][0]) == 64 for a in circles)  # 32-gons
    # train and val image ids never collide
    assert not {im["id"] for im in train["images"]} & {im["id"] for im in val["images"]}


def test_polygon_matches_drawn_pixels(full):
    info, train, _ = full
    image_dir = Path(info["image_dir"])
    anns_of = defaultdict(list)
    for a in train["annotations"]:
        anns_of[a["image_id"]].append(a)
    checked = 0
    for im in train["images"][:40]:
        pixels = np.asarray(Image.open(image_dir / im["file_name"]).convert("RGB"))
        h, w = pixels.shape[:2]
        for a in anns_of[im["id"]]:
            rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))
            seg = mask_utils.decode(rle).astype(bool)
            # the object's colour is the most common colour under its mask ...
            cols, counts = np.unique(pixels[seg], axis=0, return_counts=True)
            colour = cols[counts.argmax()]
            # ... and the colour mask near its box is exactly the decoded polygon
            x, y, bw, bh = a["bbox"]
            near = np.zeros_like(seg)
            near[max(0, int(y) - 2):int(y + bh) + 3, max(0, int(x) - 2):int(x + bw) + 3] = True
            by_colour = np.all(pixels == colour, axis=2) & near
            iou = (by_colour & seg).sum() / (by_colour | seg).sum()
            assert iou >= 0.99, (a["id"], iou)
            assert abs(seg.sum() - a["area"]) <= 0.1 * a["area"] + 2, (a["id"], seg.sum(), a["area"])
            checked += 1
    assert checked >= 80


def test_negative_categories_truly_absent(full):
    _, train, val = full
    for data in (train, val):
        present = defaultdict(set)
        for a in data["annotations"]:
            present[a["image_id"]].add(a["category_id"])
        for im in data["images"]:
            neg = im["neg_category_ids"]
            assert 1 <= len(neg) <= 8 and len(set(neg)) == len(neg)
            assert all(1 <= k <= 48 for k in neg)
            assert not set(neg) & present[im["id"]]
            assert im["not_exhaustive_category_ids"] == []


def test_deterministic(small, tmp_path):
    out, info = small
    again = make_dataset(tmp_path / "again", seed=3, scale=0.2, num_workers=2, progress=False)
    assert not again["reused"]
    for key in ("train_json", "val_json"):
        assert Path(info[key]).read_bytes() == Path(again[key]).read_bytes()
    data = _load(info["train_json"])
    for im in data["images"][::37]:
        assert _sha(Path(info["image_dir"]) / im["file_name"]) == \
            _sha(Path(again["image_dir"]) / im["file_name"])
    other = make_dataset(tmp_path / "other", seed=4, scale=0.2, progress=False)
    assert Path(info["train_json"]).read_bytes() != Path(other["train_json"]).read_bytes()
    first = data["images"][0]["file_name"]
    assert _sha(Path(info["image_dir"]) / first) != _sha(Path(other["image_dir"]) / first)


def test_reuse_and_regenerate(tmp_path):
    out = tmp_path / "ds"
    first = make_dataset(out, seed=1, scale=0.1, progress=False)
    assert not first["reused"]
    stamp = os.stat(first["train_json"]).st_mtime_ns
    second = make_dataset(out, seed=1, scale=0.1, progress=False)
    assert second["reused"] and second["num_train_images"] == first["num_train_images"]
    assert os.stat(first["train_json"]).st_mtime_ns == stamp
    # a different scale regenerates and leaves no stale images behind
    third = make_dataset(out, seed=1, scale=0.05, progress=False)
    assert not third["reused"]
    data = _load(third["train_json"])
    on_disk = sorted(p.name for p in (out / "images" / "train").iterdir())
    assert on_disk == sorted(Path(im["file_name"]).name for im in data["images"])
    # a missing image makes the directory incomplete: regenerate
    (out / "images" / data["images"][0]["file_name"]).unlink()
    fourth = make_dataset(out, seed=1, scale=0.05, progress=False)
    assert not fourth["reused"]
    assert (out / "images" / data["images"][0]["file_name"]).is_file()
    meta = _load(out / "meta.json")
    assert meta["seed"] == 1 and meta["scale"] == 0.05 and meta["image_size"] == 96
    assert meta["version"] == synthetic.GENERATOR_VERSION


def test_scale_keeps_groups_and_scales_counts():
    base, half, double = design_counts(0, 1.0), design_counts(0, 0.2), design_counts(0, 2.0)
    assert [d["frequency"] for d in base] == [d["frequency"] for d in half] == \
        [d["frequency"] for d in double]
    for b, s in zip(base, double):
        assert s["train_images"] == 2 * b["train_images"]
    assert sum(d["train_images"] for d in half) < 0.3 * sum(d["train_images"] for d in base)
    assert all(d["train_images"] >= 1 and d["val_images"] >= 1 for d in half)


def test_small_scale_categories_consistent(small):
    out, info = small
    train = _load(info["train_json"])
    assert {c["frequency"] for c in train["categories"]} == {"r", "c", "f"}
    design = {d["id"]: d for d in design_counts(3, 0.2)}
    for c in train["categories"]:
        assert c["image_count"] == design[c["id"]]["train_images"]


def test_other_image_size(tmp_path):
    info = make_dataset(tmp_path / "s64", seed=0, scale=0.05, image_size=64, progress=False)
    data = _load(info["train_json"])
    assert all(im["width"] == im["height"] == 64 for im in data["images"])
    for a in data["annotations"]:
        x, y, bw, bh = a["bbox"]
        assert x >= 0 and y >= 0 and x + bw <= 64 and y + bh <= 64


@pytest.mark.parametrize("kwargs", [
    {"seed": -1}, {"seed": 1.5}, {"scale": 0}, {"scale": float("nan")}, {"image_size": 16},
])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        make_dataset(tmp_path / "bad", progress=False, **kwargs)


def test_describe_design_lists_every_class():
    text = describe_design(0)
    for d in design_counts(0):
        assert d["name"] in text
    assert "rare (18 classes)" in text and "frequent (10 classes)" in text
