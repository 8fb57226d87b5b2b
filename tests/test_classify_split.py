"""taildet.classify: the CIFAR-LT split builder, the manifest and the datasets' bad-input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from taildet.classify.data import ClassificationDataset, list_image_folder, load_split
from taildet.classify.splits import build_lt_split, lt_counts, make_split, read_manifest
from taildet.errors import ConfigError, DataError


def test_lt_counts_equal_the_exponential_profile():
    # CIFAR-10-LT at imbalance 100 (Cao et al.'s table of counts): 5000 * 0.01 ** (c / 9), floored
    assert lt_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    # CIFAR-100-LT ends at n_max / imbalance; every count is the floor of the profile
    c100 = lt_counts(500, 100, 100)
    assert c100[0] == 500 and c100[-1] == 5 and len(c100) == 100
    assert c100 == [math.floor(500 * 100 ** (-c / 99) + 1e-9) for c in range(100)]
    assert lt_counts(10, 4, 1) == [10, 10, 10, 10]
    assert lt_counts(3, 3, 1000) == [3, 1, 1]  # at least one image per class
    with pytest.raises(ConfigError, match="imbalance"):
        lt_counts(10, 3, 0.5)


def test_split_counts_balanced_splits_and_determinism():
    labels = np.repeat(np.arange(5), 60)
    np.random.default_rng(3).shuffle(labels)
    s = build_lt_split(labels, 5, 10, seed=1, test_per_class=7, val_per_class=3)
    assert s["n_max"] == 50 and s["counts"] == lt_counts(50, 5, 10) == [50, 28, 15, 8, 5]
    assert np.bincount(labels[s["train"]], minlength=5).tolist() == s["counts"]
    assert np.bincount(labels[s["test"]], minlength=5).tolist() == [7] * 5
    assert np.bincount(labels[s["val"]], minlength=5).tolist() == [3] * 5
    parts = np.concatenate([s["train"], s["val"], s["test"]])
    assert np.unique(parts).size == parts.size  # disjoint
    again = build_lt_split(labels, 5, 10, seed=1, test_per_class=7, val_per_class=3)
    other = build_lt_split(labels, 5, 10, seed=2, test_per_class=7, val_per_class=3)
    assert all(np.array_equal(s[k], again[k]) for k in ("train", "val", "test"))
    assert not np.array_equal(s["train"], other["train"])
    with pytest.raises(DataError, match="class 0: needs 56 training images.*only 55"):
        build_lt_split(labels, 5, 1, n_max=56, test_per_class=5)


def test_make_split_npz_manifest_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (90, 6, 6), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 30)
    np.savez(tmp_path / "src.npz", images=images, labels=labels)
    out = make_split(str(tmp_path / "src.npz"), tmp_path / "lt", 4, test_per_class=5, val_per_class=0)
    assert out["counts"] == [25, 12, 6] and out["sizes"] == {"train": 43, "val": 0, "test": 15}
    m = read_manifest(out["manifest"])
    ds = load_split(m, "train")
    assert np.bincount(ds.labels).tolist() == [25, 12, 6]
    x, t = ds[0]
    ref = m["splits"]["train"][0][0]
    assert x.shape == (3, 6, 6) and int(t["label"]) == labels[ref]
    assert np.allclose(x[0].numpy(), (images[ref] / 255.0 - 0.5) / 0.25, atol=1e-6)


def test_image_folder_errors_and_manifest_missing_file(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for cls, n in (("cat", 3), ("dog", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (5, 5), (i * 40, 0, 0)).save(root / cls / f"{i}.png")
    classes, items = list_image_folder(str(root))
    assert classes == ["cat", "dog"] and len(items) == 5
    out = make_split(str(root), tmp_path / "lt", 2, test_per_class=1, val_per_class=0, n_max=2)
    m = read_manifest(out["manifest"])
    x, t = load_split(m, "train")[0]
    assert x.shape == (3, 5, 5)
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="class folder 'empty'.*no image"):
        list_image_folder(str(root))
    (root / "empty").rmdir()
    (root / "dog" / "1.png").unlink()
    with pytest.raises(DataError, match=r"splits\.\w+\[\d+\].*not found"):
        read_manifest(out["manifest"])
    doc = json.loads((tmp_path / "lt" / "manifest.json").read_text())
    doc["splits"]["train"][0] = ["cat/0.png", 7]
    (tmp_path / "bad.json").write_text(json.dumps({**doc, "source": {"kind": "folder", "root": str(root)}}))
    with pytest.raises(DataError, match=r"bad\.json: splits\.train\[0\]: expected"):
        read_manifest(tmp_path / "bad.json")


def test_digits_source_at_imbalance_100(tmp_path):
    pytest.importorskip("sklearn")
    out = make_split("digits", tmp_path / "d", 100, test_per_class=40, val_per_class=20)
    # the smallest digit class has 174 images: 174 - 60 = 114 = n_max
    assert out["n_max"] == 114 and out["counts"] == lt_counts(114, 10, 100) == [114, 68, 40, 24, 14, 8, 5, 3, 1, 1]
    ds = load_split(read_manifest(out["manifest"]), "test")
    assert np.bincount(ds.labels).tolist() == [40] * 10 and ds[0][0].shape == (3, 8, 8)


def test_synthetic_crops_source(tmp_path):
    out = make_split("synthetic", tmp_path / "s", 10, per_class=6, test_per_class=2, val_per_class=0)
    assert out["counts"] == lt_counts(4, 48, 10) and out["counts"][0] == 4 and out["counts"][-1] == 1
    m = read_manifest(out["manifest"])
    assert len(m["classes"]) == 48 and m["source"]["kind"] == "npz"
    x, t = load_split(m, "test")[0]
    assert x.shape == (3, 32, 32) and 0 <= int(t["label"]) < 48


def test_separate_test_source_cifar_lt_protocol(tmp_path):
    """CIFAR-LT keeps the official test set: --test-src's images are the whole test split."""
    rng = np.random.default_rng(2)
    tr = rng.integers(0, 255, (40, 4, 4, 3), dtype=np.uint8)
    te = rng.integers(0, 255, (9, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=tr, labels=np.repeat(np.arange(2), 20), classes=np.array(["a", "b"]))
    np.savez(tmp_path / "test.npz", images=te, labels=np.array([0, 1] * 4 + [1]), classes=np.array(["a", "b"]))
    out = make_split(str(tmp_path / "train.npz"), tmp_path / "lt", 10, test_per_class=0, val_per_class=0,
                     test_src=str(tmp_path / "test.npz"))
    assert out["counts"] == [20, 2] and out["sizes"] == {"train": 22, "val": 0, "test": 9}
    test = load_split(read_manifest(out["manifest"]), "test")
    assert test.labels.tolist() == [0, 1] * 4 + [1]
    assert np.allclose(test[8][0][0].numpy(), (te[8, :, :, 0] / 255.0 - 0.5) / 0.25, atol=1e-6)
    with pytest.raises(ConfigError, match="--test-per-class: must be 0"):
        make_split(str(tmp_path / "train.npz"), tmp_path / "x", 10, test_src=str(tmp_path / "test.npz"))
    np.savez(tmp_path / "other.npz", images=te, labels=np.zeros(9, dtype=np.int64), classes=np.array(["a", "c"]))
    with pytest.raises(DataError, match="other.npz: classes: differ"):
        make_split(str(tmp_path / "train.npz"), tmp_path / "y", 10, test_per_class=0, val_per_class=0,
                   test_src=str(tmp_path / "other.npz"))


def test_augmentation_is_seeded_flip_and_pad_crop(tmp_path):
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4) * 7
    plain = ClassificationDataset(images, [0, 1], 2)[0][0]
    aug = ClassificationDataset(images, [0, 1], 2, augment=("flip", "pad_crop"), pad=1)
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        x = aug[0][0]
        torch.manual_seed(seed)
        assert torch.equal(x, aug[0][0])  # the same RNG state, the same crop and flip
        # every output is a flip and/or a 1-px shift of the image (zero padding = (0 - 0.5) / 0.25)
        seen.add(bytes(x.numpy().tobytes()))
        inner = [x[:, i:i + 2, j:j + 2] for i in range(3) for j in range(3)]
        assert any(torch.equal(p, plain[:, a:a + 2, b:b + 2]) or torch.equal(p, plain.flip(-1)[:, a:a + 2, b:b + 2])
                   for p in inner for a in range(3) for b in range(3))
    assert len(seen) > 5
