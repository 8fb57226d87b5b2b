"""Tests of the LVIS/COCO reader: parsing, validation errors, counts, images, masks."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from taildet.data.lvis import (
    LVISDataset,
    check_same_categories,
    frequency_group,
    image_path,
    load_lvis,
)
from taildet.errors import DataError
from helpers import LVIS_VAL_100

LVIS_SAMPLE = str(LVIS_VAL_100)


def make_data() -> dict:
    """Three images (one without annotations), three categories (ids not contiguous)."""
    return {
        "images": [
            {"id": 2, "width": 40, "height": 30, "file_name": "b.png"},
            {"id": 1, "width": 20, "height": 10, "file_name": "a.png", "neg_category_ids": [9],
             "not_exhaustive_category_ids": [5]},
            {"id": 3, "width": 16, "height": 16, "file_name": "c.png"},
        ],
        "categories": [
            {"id": 9, "name": "zebra"},
            {"id": 5, "name": "cat"},
            {"id": 7, "name": "dog"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [2, 1, 10, 5], "area": 50.0,
             "segmentation": [[2, 1, 12, 1, 12, 6, 2, 6]]},
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [0, 0, 4, 4], "area": 16.0,
             "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [10, 5, 20, 20], "area": 400.0,
             "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]], "iscrowd": 1},
            {"id": 4, "image_id": 2, "category_id": 5, "bbox": [1, 2, 3, 4], "area": 12.0,
             "segmentation": [[1, 2, 4, 2, 4, 6, 1, 6]]},
        ],
    }


def write(tmp_path, data, name="ann.json", images=True) -> str:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    if images:
        rng = np.random.default_rng(0)
        for im in data.get("images", []):
            arr = rng.integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / im["file_name"])
    return str(p)


def expect_error(path, *fragments, **kw):
    with pytest.raises(DataError) as ei:
        load_lvis(path, **kw)
    msg = str(ei.value)
    assert os.path.basename(path) in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return ei.value


# ---------------------------------------------------------------------------- happy path


def test_basic_fields(tmp_path):
    path = write(tmp_path, make_data())
    ds = load_lvis(path)
    assert isinstance(ds, LVISDataset)
    assert ds.image_root == str(tmp_path)  # no ../images: the json's directory
    assert ds.num_classes == 3 and ds.cat_ids == [5, 7, 9]
    assert ds.cat_id_to_label == {5: 0, 7: 1, 9: 2}
    assert ds.class_names == ["cat", "dog", "zebra"]
    assert ds.image_ids == [1, 2, 3] and len(ds) == 3 and ds.num_images == 3
    assert ds.num_annotations == 4
    assert ds.instance_counts.tolist() == [3, 1, 0] and ds.instance_counts.dtype == np.int64
    assert ds.image_counts.tolist() == [2, 1, 0] and ds.image_counts.dtype == np.int64
    np.testing.assert_allclose(ds.image_frequency, [2 / 3, 1 / 3, 0.0])
    assert [lab.tolist() for lab in ds.labels_per_image] == [[0], [0, 1], []]
    assert all(lab.dtype == np.int64 for lab in ds.labels_per_image)
    assert [[a["id"] for a in anns] for anns in ds.annotations_per_image] == [[1, 2], [3, 4], []]
    assert ds.images[0]["neg_category_ids"] == [9]
    assert ds.images[0]["not_exhaustive_category_ids"] == [5]
    assert ds.skipped == {} and ds.clipped_boxes == 0
    assert ds.label_to_category_id(torch.tensor([2, 0])) == [9, 5]
    assert image_path(ds, 0) == os.path.join(str(tmp_path), "a.png")
    r = repr(ds)
    assert "images=3" in r and "r=3" in r  # computed groups: all classes in <= 10 images


def test_getitem(tmp_path):
    path = write(tmp_path, make_data())
    ds = load_lvis(path)
    image, t = ds[1]  # image id 2, 40x30
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    raw = np.array(Image.open(tmp_path / "b.png"))
    assert torch.allclose(image, torch.from_numpy(raw).permute(2, 0, 1).float() / 255)
    assert t["boxes"].dtype == torch.float32
    assert t["boxes"].tolist() == [[10, 5, 30, 25], [1, 2, 4, 6]]
    assert t["labels"].tolist() == [1, 0] and t["labels"].dtype == torch.int64
    assert t["image_id"] == 2
    assert t["orig_size"].tolist() == [30, 40] and t["orig_size"].dtype == torch.int64
    assert t["iscrowd"].tolist() == [1, 0]
    assert t["area"].tolist() == [400.0, 12.0]
    assert t["gt_index"].tolist() == [0, 1]
    assert "masks" not in t
    _, t3 = ds[2]  # no annotations
    assert t3["boxes"].shape == (0, 4) and t3["labels"].shape == (0,)


def test_transforms_applied(tmp_path):
    path = write(tmp_path, make_data())
    calls = []

    def tf(image, target):
        calls.append(target["image_id"])
        return image * 0, target

    ds = load_lvis(path, transforms=tf)
    image, _ = ds[0]
    assert calls == [1] and image.abs().sum() == 0


def test_image_root_default_and_subdirs_and_coco_url(tmp_path):
    data = make_data()
    data["images"][0]["file_name"] = "sub/dir/b.png"
    del data["images"][1]["file_name"]
    data["images"][1]["coco_url"] = "http://images.cocodataset.org/val2017/a.png"
    (tmp_path / "annotations").mkdir()
    (tmp_path / "images" / "sub" / "dir").mkdir(parents=True)
    p = tmp_path / "annotations" / "x.json"
    p.write_text(json.dumps(data))
    for name, (h, w) in {"sub/dir/b.png": (30, 40), "a.png": (10, 20), "c.png": (16, 16)}.items():
        Image.new("RGB", (w, h)).save(tmp_path / "images" / name)
    ds = load_lvis(str(p), check_images=True)
    assert os.path.samefile(ds.image_root, tmp_path / "images")
    assert ds.image_path(0).endswith(os.path.join("images", "a.png"))
    assert ds.image_path(1).endswith(os.path.join("images", "sub", "dir", "b.png"))
    assert ds[1][0].shape == (3, 30, 40)


# ---------------------------------------------------------------------------- frequency groups


def test_frequency_from_field_image_count_and_computed(tmp_path):
    data = make_data()
    data["categories"][0]["frequency"] = "f"  # id 9, no instances here: the field wins
    data["categories"][0]["image_count"] = 3  # would say 'r'
    data["categories"][1]["image_count"] = 50  # id 5 -> 'c' (file has 2 images)
    # id 7: nothing -> computed from this file (1 image) -> 'r'
    ds = load_lvis(write(tmp_path, data))
    assert ds.frequency_groups == ["c", "r", "f"]
    assert ds.group_counts() == {"r": 1, "c": 1, "f": 1}


@pytest.mark.parametrize(
    "count,group", [(0, "r"), (1, "r"), (10, "r"), (11, "c"), (100, "c"), (101, "f")]
)
def test_frequency_group_thresholds(count, group):
    assert frequency_group(count) == group


def test_frequency_computed_from_annotations_counts_images(tmp_path):
    data = make_data()
    data["images"] = [{"id": i, "width": 8, "height": 8, "file_name": f"{i}.png"} for i in range(1, 13)]
    data["annotations"] = [
        {"id": i, "image_id": i, "category_id": 5, "bbox": [0, 0, 2, 2]} for i in range(1, 12)
    ] + [{"id": 100 + k, "image_id": 1, "category_id": 7, "bbox": [0, 0, 2, 2]} for k in range(20)]
    ds = load_lvis(write(tmp_path, data, images=False))
    # cat 5 in 11 images -> common; cat 7: 20 instances but one image -> rare
    assert ds.frequency_groups == ["c", "r", "r"]
    assert ds.image_counts.tolist() == [11, 1, 0]
    assert ds.instance_counts.tolist() == [11, 20, 0]


# ---------------------------------------------------------------------------- validation: file level


def test_missing_file(tmp_path):
    expect_error(str(tmp_path / "nope.json"), "cannot read")


def test_invalid_json_reports_line_and_column(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "images": [\n    {"id": 1,,}\n')
    expect_error(str(p), "invalid JSON", "line 3")


def test_top_level_not_object(tmp_path):
    p = tmp_path / "list.json"
    p.write_text("[1, 2]")
    expect_error(str(p), "top level", "JSON object")


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tmp_path, key):
    data = make_data()
    del data[key]
    expect_error(write(tmp_path, data, images=False), f"'{key}'")


@pytest.mark.parametrize("key", ["id", "width", "height"])
def test_missing_image_key(tmp_path, key):
    data = make_data()
    del data["images"][1][key]
    expect_error(write(tmp_path, data, images=False), "images[1]", f"missing required key '{key}'")


@pytest.mark.parametrize("key", ["image_id", "category_id", "bbox"])
def test_missing_annotation_key_is_error_even_when_skipping(tmp_path, key):
    data = make_data()
    del data["annotations"][2][key]
    path = write(tmp_path, data, images=False)
    expect_error(path, "annotation id 3", f"missing required key '{key}'", skip_invalid=True)


def test_missing_annotation_id(tmp_path):
    data = make_data()
    del data["annotations"][1]["id"]
    expect_error(write(tmp_path, data, images=False), "annotations[1]", "'id'")


@pytest.mark.parametrize("key", ["id", "name"])
def test_missing_category_key(tmp_path, key):
    data = make_data()
    del data["categories"][2][key]
    expect_error(write(tmp_path, data, images=False), "categories[2]", f"'{key}'")


def test_bad_image_size(tmp_path):
    data = make_data()
    data["images"][0]["width"] = 0
    expect_error(write(tmp_path, data, images=False), "image id 2", "width must be a positive")


def test_bad_frequency_value(tmp_path):
    data = make_data()
    data["categories"][1]["frequency"] = "x"
    expect_error(write(tmp_path, data, images=False), "category id 5", "frequency")


@pytest.mark.parametrize(
    "section,item", [("images", "image id 2"), ("annotations", "annotation id 1"),
                     ("categories", "category id 9")]
)
def test_duplicate_ids(tmp_path, section, item):
    data = make_data()
    dup = copy.deepcopy(data[section][0])
    if section == "annotations":
        dup["bbox"] = [0, 0, 1, 1]
    data[section].append(dup)
    expect_error(write(tmp_path, data, images=False), item, "duplicate", skip_invalid=True)


@pytest.mark.parametrize("section", ["images", "categories"])
def test_empty_dataset(tmp_path, section):
    data = make_data()
    data[section] = []
    if section == "images":
        data["annotations"] = []
    expect_error(write(tmp_path, data, images=False), section, "empty")


def test_no_annotations_is_allowed(tmp_path):
    data = make_data()
    data["annotations"] = []
    ds = load_lvis(write(tmp_path, data, images=False))
    assert ds.num_annotations == 0 and ds.image_counts.tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------- validation: annotations

BAD_ANNOTATIONS = [
    ("image_id", 99, "unknown image id", "99"),
    ("category_id", 42, "unknown category id", "42"),
    ("bbox", [1, 2, 3], "malformed bbox", "4 numbers"),
    ("bbox", [1, 2, "3", 4], "malformed bbox", "4 numbers"),
    ("bbox", [1, 2, float("nan"), 4], "non-finite bbox", "NaN"),
    ("bbox", [1, 2, 0, 4], "non-positive box size", "width 0"),
    ("bbox", [1, 2, 3, -4], "non-positive box size", "height -4"),
    ("bbox", [15, 2, 10, 4], "box outside image", "20x10"),  # x2 = 25 > 20 + 1
    ("bbox", [-2, 2, 5, 4], "box outside image", "beyond"),
    ("bbox", [20.5, 2, 0.4, 4], "box outside image", "no area inside"),
]


@pytest.mark.parametrize("field,value,reason,detail", BAD_ANNOTATIONS)
def test_bad_annotation_raises(tmp_path, field, value, reason, detail):
    data = make_data()
    data["annotations"][0][field] = value
    path = write(tmp_path, data, images=False)
    expect_error(path, "annotation id 1", reason, detail)


@pytest.mark.parametrize("field,value,reason,detail", BAD_ANNOTATIONS)
def test_bad_annotation_skipped_and_counted(tmp_path, field, value, reason, detail):
    data = make_data()
    data["annotations"][0][field] = value
    path = write(tmp_path, data, images=False)
    with pytest.warns(UserWarning) as rec:
        ds = load_lvis(path, skip_invalid=True)
    assert ds.skipped == {reason: 1}
    assert ds.num_annotations == 3
    assert [a["id"] for a in ds.annotations_per_image[0]] == [2]
    assert any("annotation id 1" in e for e in ds.skipped_examples)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and "ann.json" in msgs[0] and f"{reason}: 1" in msgs[0]


def test_skip_counts_multiple_reasons(tmp_path):
    data = make_data()
    data["annotations"][0]["category_id"] = 1000
    data["annotations"][1]["image_id"] = 1000
    data["annotations"][3]["category_id"] = 2000
    with pytest.warns(UserWarning, match="skipped 3"):
        ds = load_lvis(write(tmp_path, data, images=False), skip_invalid=True)
    assert ds.skipped == {"unknown category id": 2, "unknown image id": 1}
    assert ds.num_annotations == 1
    assert ds.instance_counts.tolist() == [0, 1, 0]


def test_no_warning_when_nothing_skipped(tmp_path):
    path = write(tmp_path, make_data(), images=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_lvis(path, skip_invalid=True)


def test_box_slightly_outside_is_clipped(tmp_path):
    data = make_data()
    data["annotations"][0]["bbox"] = [-0.5, 1, 21.0, 9.8]  # x2 = 20.5 on a 20 px wide image
    ds = load_lvis(write(tmp_path, data, images=False))
    assert ds.clipped_boxes == 1
    assert ds.get_target(0)["boxes"][0].tolist() == pytest.approx([0, 1, 20, 10])


# ---------------------------------------------------------------------------- images


def test_missing_image_at_getitem(tmp_path):
    path = write(tmp_path, make_data())
    os.remove(tmp_path / "b.png")
    ds = load_lvis(path)
    with pytest.raises(DataError) as ei:
        ds[1]
    assert "b.png" in str(ei.value) and "image id 2" in str(ei.value) and "not found" in str(ei.value)


def test_unreadable_image_at_getitem(tmp_path):
    path = write(tmp_path, make_data())
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"b\.png: image id 2: cannot read image"):
        load_lvis(path)[1]


def test_image_size_mismatch(tmp_path):
    path = write(tmp_path, make_data())
    Image.new("RGB", (30, 40)).save(tmp_path / "b.png")  # transposed
    with pytest.raises(DataError, match="image id 2.*30x40.*40x30"):
        load_lvis(path)[1]


def test_check_images_lists_missing(tmp_path):
    path = write(tmp_path, make_data())
    os.remove(tmp_path / "a.png")
    (tmp_path / "c.png").write_bytes(b"junk")
    err = expect_error(path, "2 of 3 image files", "a.png", "image id 1", "c.png", check_images=True)
    assert "missing" in str(err) and "unreadable" in str(err)


# ---------------------------------------------------------------------------- masks


def test_masks_decode_with_correct_area(tmp_path):
    data = make_data()
    data["annotations"].append(
        {"id": 5, "image_id": 3, "category_id": 9, "bbox": [2, 3, 6, 4],
         "segmentation": {"size": [16, 16], "counts": [35, 4, 12, 4, 12, 4, 12, 4, 12, 4, 12, 4, 137]}}
    )
    ds = load_lvis(write(tmp_path, data), with_masks=True)
    _, t = ds[0]
    m = t["masks"]
    assert m.dtype == torch.uint8 and m.shape == (2, 10, 20)
    # polygon [2,1]-[12,6] is a 10x5 rectangle; pycocotools rasterises it to exactly 50 pixels
    assert int(m[0].sum()) == 50 and int(m[1].sum()) == 16
    assert m[0, 1:6, 2:12].all()
    _, t3 = ds[2]
    assert int(t3["masks"][0].sum()) == 24  # uncompressed RLE: 6 runs of 4 pixels


def test_thin_polygon_mask_not_empty(tmp_path):
    data = make_data()
    data["annotations"][0]["segmentation"] = [[2.1, 1.1, 11.9, 1.1, 11.9, 1.3, 2.1, 1.3]]
    ds = load_lvis(write(tmp_path, data), with_masks=True)
    assert int(ds[0][1]["masks"][0].sum()) >= 1


@pytest.mark.parametrize(
    "seg,detail",
    [([[1, 2, 3, 4]], "need an even number >= 6"), ([1, 2, 3, 4, 5, 6], "not a list"),
     ({"counts": [1]}, "'size'"), ({"size": [5, 5], "counts": [25]}, "differs from the image size"),
     ([], "empty polygon")],
)
def test_bad_segmentation(tmp_path, seg, detail):
    data = make_data()
    data["annotations"][0]["segmentation"] = seg
    path = write(tmp_path, data, images=False)
    expect_error(path, "annotation id 1", "bad segmentation", detail, with_masks=True)
    load_lvis(path)  # not checked without masks


def test_missing_segmentation_with_masks(tmp_path):
    data = make_data()
    del data["annotations"][3]["segmentation"]
    with pytest.warns(UserWarning, match="bad segmentation: 1"):
        ds = load_lvis(write(tmp_path, data, images=False), with_masks=True, skip_invalid=True)
    assert ds.num_annotations == 3


# ---------------------------------------------------------------------------- categories


def test_check_same_categories(tmp_path):
    a = load_lvis(write(tmp_path, make_data(), "train.json", images=False))
    b = load_lvis(write(tmp_path, make_data(), "val.json", images=False))
    check_same_categories(a, b)
    data = make_data()
    data["categories"][2]["name"] = "hound"
    c = load_lvis(write(tmp_path, data, "val2.json", images=False))
    with pytest.raises(DataError) as ei:
        check_same_categories(a, c)
    msg = str(ei.value)
    assert "train.json" in msg and "val2.json" in msg and "'dog'" in msg and "'hound'" in msg
    data = make_data()
    data["categories"].append({"id": 11, "name": "emu"})
    d = load_lvis(write(tmp_path, data, "val3.json", images=False))
    with pytest.raises(DataError, match="category id 11"):
        check_same_categories(a, d)


# ---------------------------------------------------------------------------- real LVIS sample


@pytest.fixture(scope="module")
def lvis_sample():
    with open(LVIS_SAMPLE) as f:
        raw = json.load(f)
    return raw, load_lvis(LVIS_SAMPLE)


def test_real_lvis_counts(lvis_sample):
    raw, ds = lvis_sample
    assert ds.num_classes == len(raw["categories"]) == 1230
    assert ds.num_images == len(raw["images"]) == 100
    assert ds.num_annotations == len(raw["annotations"]) == 977
    assert ds.skipped == {}
    inst = Counter(a["category_id"] for a in raw["annotations"])
    pairs = {(a["category_id"], a["image_id"]) for a in raw["annotations"]}
    imgs = Counter(c for c, _ in pairs)
    assert ds.instance_counts.tolist() == [inst.get(c, 0) for c in ds.cat_ids]
    assert ds.image_counts.tolist() == [imgs.get(c, 0) for c in ds.cat_ids]
    assert int((ds.instance_counts == 0).sum()) > 0  # some classes absent from this file
    freq = {c["id"]: c["frequency"] for c in raw["categories"]}
    assert ds.frequency_groups == [freq[c] for c in ds.cat_ids]
    assert sum(len(lab) for lab in ds.labels_per_image) == len(pairs)
    assert ds.cat_ids == sorted(ds.cat_ids)


def test_real_lvis_fields(lvis_sample):
    raw, ds = lvis_sample
    by_id = {im["id"]: im for im in raw["images"]}
    for im in ds.images:
        assert im["neg_category_ids"] == by_id[im["id"]]["neg_category_ids"]
        assert im["not_exhaustive_category_ids"] == by_id[im["id"]]["not_exhaustive_category_ids"]
    assert ds.image_path(0).endswith(ds.images[0]["file_name"])
    k = next(i for i, a in enumerate(ds.annotations_per_image) if a)
    t = ds.get_target(k)
    a0 = ds.annotations_per_image[k][0]
    x, y, w, h = a0["bbox"]
    assert t["boxes"][0].tolist() == pytest.approx([x, y, x + w, y + h], abs=1e-4)
    assert ds.cat_ids[int(t["labels"][0])] == a0["category_id"]


def test_real_lvis_masks(tmp_path):
    ds = load_lvis(LVIS_SAMPLE, with_masks=True)
    k = next(i for i, a in enumerate(ds.annotations_per_image) if a)
    t = ds.get_target(k)
    areas = torch.tensor([a["area"] for a in ds.annotations_per_image[k]])
    sums = t["masks"].flatten(1).sum(1).float()
    # pixel counts of decoded polygons are close to the annotated polygon areas
    assert torch.allclose(sums, areas, rtol=0.15, atol=20)


def test_lvis_v1_coco_url_resolves_split_directory(tmp_path):
    """LVIS v1 val mixes COCO train2017 and val2017 images: image_root is the COCO directory."""
    data = make_data()
    for im, split in zip(data["images"], ["train2017", "val2017", "val2017"]):
        del im["file_name"]
        im["coco_url"] = f"http://images.cocodataset.org/{split}/{im['id']:012d}.png"
    p = write(tmp_path, data, images=False)
    coco = tmp_path / "coco"
    for im, split in zip(data["images"], ["train2017", "val2017", "val2017"]):
        (coco / split).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (im["width"], im["height"])).save(coco / split / f"{im['id']:012d}.png")
    ds = load_lvis(p, image_root=str(coco), check_images=True)
    split_of = {im["id"]: im["coco_url"].split("/")[-2] for im in data["images"]}
    assert [os.path.basename(os.path.dirname(ds.image_path(i))) for i in range(3)] == [
        split_of[i] for i in ds.image_ids]
    # one split's directory given directly also works
    ds2 = load_lvis(p, image_root=str(coco / "val2017"))
    val_idx = [i for i, iid in enumerate(ds2.image_ids) if split_of[iid] == "val2017"]
    assert val_idx and all(os.path.exists(ds2.image_path(i)) for i in val_idx)
