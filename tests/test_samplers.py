"""Tests for taildet.data.samplers: RFS, class-balanced and random samplers (seeded, DDP, resume)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from taildet.data.samplers import (
    ClassBalancedSampler,
    RandomSampler,
    RepeatFactorSampler,
    TrainingSampler,
)
from taildet.errors import DataError

# 10 images: class 0 in 9 of them (images 0-7 and 9), class 1 only in image 9, image 8 empty.
# f_0 = 0.9, f_1 = 0.1.
LABELS = [[0]] * 8 + [[]] + [[0, 1]]


def _hand_rfs(t: float) -> tuple[float, float]:
    return max(1.0, math.sqrt(t / 0.9)), max(1.0, math.sqrt(t / 0.1))


# ------------------------------------------------------------------ repeat factors


def test_rfs_repeat_factors_hand_computed():
    # t = 0.225: r_0 = sqrt(0.25) = 0.5 -> 1, r_1 = sqrt(2.25) = 1.5.
    s = RepeatFactorSampler(LABELS, threshold=0.225)
    np.testing.assert_allclose(s.category_repeat_factors, [1.0, 1.5])
    np.testing.assert_allclose(s.repeat_factors, [1.0] * 9 + [1.5])
    assert s.repeat_factors.dtype == np.float64
    # t = 1.296: r_0 = sqrt(1.44) = 1.2, r_1 = sqrt(12.96) = 3.6; empty image 8 stays 1.
    s = RepeatFactorSampler(LABELS, threshold=1.296)
    r0, r1 = _hand_rfs(1.296)
    assert (r0, r1) == pytest.approx((1.2, 3.6))
    np.testing.assert_allclose(s.category_repeat_factors, [r0, r1])
    np.testing.assert_allclose(s.repeat_factors, [r0] * 8 + [1.0] + [r1])
    assert s.expected_num_samples == pytest.approx(8 * 1.2 + 1 + 3.6)


def test_rfs_lvis_threshold_does_nothing_on_small_data_and_scaled_threshold_does():
    s = RepeatFactorSampler(LABELS)  # t = 0.001: every f_c >= 0.1
    np.testing.assert_array_equal(s.repeat_factors, np.ones(10))
    t = RepeatFactorSampler.threshold_for_dataset(10, target_images=5)
    assert t == pytest.approx(0.5)
    assert RepeatFactorSampler.threshold_for_dataset(100_000) == pytest.approx(0.001)
    s = RepeatFactorSampler(LABELS, threshold=t)
    assert s.repeat_factors[9] == pytest.approx(math.sqrt(5.0))


def test_rfs_ceil_is_exact_and_deterministic():
    s = RepeatFactorSampler(LABELS, threshold=1.296, rounding="ceil", shuffle=False)
    expected = [2] * 8 + [1] + [4]
    for epoch in (0, 1, 7):
        np.testing.assert_array_equal(s.repeats(epoch), expected)
        s.set_epoch(epoch)
        assert list(s) == list(np.repeat(np.arange(10), expected))
        assert len(s) == sum(expected)
    # 100 images, class 1 in 3: sqrt(0.27 / 0.03) = 3.0000000000000004 in floating point.
    s = RepeatFactorSampler([[0]] * 97 + [[1]] * 3, threshold=0.27, rounding="ceil")
    assert s.repeat_factors[99] == pytest.approx(3.0) and s.repeat_factors[99] > 3.0
    assert s.repeats()[99] == 3


def test_rfs_stochastic_mean_repeats_match_repeat_factors():
    s = RepeatFactorSampler(LABELS, threshold=1.296, rounding="stochastic", seed=3)
    epochs = 3000
    reps = np.stack([s.repeats(e) for e in range(epochs)])
    # Each image gets floor(r) or floor(r) + 1 copies.
    assert np.all(reps >= np.floor(s.repeat_factors)) and np.all(reps <= np.floor(s.repeat_factors) + 1)
    assert np.all(reps[:, 8] == 1)  # empty image: exactly once
    mean = reps.mean(axis=0)
    # Bernoulli(0.2) / Bernoulli(0.6) over 3000 epochs: standard error <= 0.009.
    np.testing.assert_allclose(mean, s.repeat_factors, atol=0.04)
    # The occurrences in the yielded order agree with repeats().
    s.set_epoch(5)
    np.testing.assert_array_equal(np.bincount(list(s), minlength=10), s.repeats(5))


def test_rfs_length_follows_current_epoch():
    s = RepeatFactorSampler(LABELS, threshold=1.296, seed=0)
    lengths = set()
    for e in range(20):
        s.set_epoch(e)
        assert len(s) == len(list(s)) == int(s.repeats().sum())
        lengths.add(len(s))
    assert len(lengths) > 1  # stochastic rounding: the epoch size varies


# ------------------------------------------------------------------ class-balanced


def test_class_balanced_probabilities_and_frequencies():
    # class 0 in images 0-5, class 1 in images 5-6, class 2 in image 7; image 8 empty; class 3 absent.
    labels = [[0], [0], [0], [0], [0], [0, 1], [1], [2], []]
    s = ClassBalancedSampler(labels, num_classes=4, num_samples=30_000, seed=1)
    k = 3
    expected = np.array([1 / (k * 6)] * 5 + [1 / (k * 6) + 1 / (k * 2), 1 / (k * 2), 1 / k, 0.0])
    np.testing.assert_allclose(s.image_probabilities, expected)
    assert s.image_probabilities.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(s.present_classes, [0, 1, 2])

    idx = np.asarray(list(s))
    assert len(idx) == len(s) == 30_000
    counts = np.bincount(idx, minlength=len(labels))
    assert counts[8] == 0  # unlabelled images are never drawn
    nz = expected > 0
    exp_counts = expected[nz] * len(idx)
    chi2 = float(((counts[nz] - exp_counts) ** 2 / exp_counts).sum())
    df = int(nz.sum()) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df), chi2  # generous bound, seeded
    # Each class is picked about 1/3 of the time: image 7 is the only image of class 2.
    assert counts[7] / len(idx) == pytest.approx(1 / 3, abs=0.015)


def test_class_balanced_default_num_samples():
    s = ClassBalancedSampler(LABELS)
    assert len(s) == len(LABELS)
    assert all(0 <= i < len(LABELS) and i != 8 for i in s)


# ------------------------------------------------------------------ determinism, resume, DDP


def _samplers(**kw):
    return [
        TrainingSampler(len(LABELS), **kw),
        RepeatFactorSampler(LABELS, threshold=1.296, **kw),
        RepeatFactorSampler(LABELS, threshold=1.296, rounding="ceil", **kw),
        ClassBalancedSampler(LABELS, num_samples=25, **kw),
    ]


@pytest.mark.parametrize("i", range(4))
def test_determinism_epochs_differ_and_resume(i):
    a, b = _samplers(seed=11)[i], _samplers(seed=11)[i]
    other_seed = _samplers(seed=12)[i]
    orders = []
    for e in range(4):
        a.set_epoch(e)
        orders.append(list(a))
    # A "resumed" sampler jumping straight to epoch 2 yields the same indices.
    b.set_epoch(2)
    assert list(b) == orders[2]
    assert list(b) == orders[2]  # iterating twice in one epoch repeats the order
    assert len({tuple(o) for o in orders}) == 4  # different epochs differ
    other_seed.set_epoch(2)
    assert list(other_seed) != orders[2]


@pytest.mark.parametrize("i", range(4))
@pytest.mark.parametrize("epoch", [0, 1])
def test_ddp_shards_disjoint_and_cover(i, epoch):
    full = _samplers(seed=5, num_replicas=1, rank=0)[i]
    r0 = _samplers(seed=5, num_replicas=2, rank=0)[i]
    r1 = _samplers(seed=5, num_replicas=2, rank=1)[i]
    for s in (full, r0, r1):
        s.set_epoch(epoch)
    glob = list(full)
    s0, s1 = list(r0), list(r1)
    assert len(s0) == len(s1) == len(r0) == len(r1) == math.ceil(len(glob) / 2)
    # Interleaving the shards gives the global list padded by repeating from its start.
    merged = [x for pair in zip(s0, s1) for x in pair]
    pad = len(merged) - len(glob)
    assert 0 <= pad < 2
    assert merged == glob + glob[:pad]
    # Positions are disjoint: the multiset of the shards is the epoch's list plus the padding.
    assert sorted(s0 + s1) == sorted(glob + glob[:pad])


def test_ddp_odd_size_padding():
    s = [TrainingSampler(5, shuffle=False, num_replicas=2, rank=r) for r in (0, 1)]
    assert list(s[0]) == [0, 2, 4] and list(s[1]) == [1, 3, 0]
    s = [TrainingSampler(2, shuffle=False, num_replicas=4, rank=r) for r in range(4)]
    assert [list(x) for x in s] == [[0], [1], [0], [1]]


def test_replicas_default_from_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 3)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 2)
    s = RandomSampler(9)
    assert (s.num_replicas, s.rank) == (3, 2) and len(s) == 3
    s = RandomSampler(9, num_replicas=1, rank=0)
    assert (s.num_replicas, s.rank) == (1, 0)


def test_random_sampler_alias_and_no_shuffle():
    assert RandomSampler is TrainingSampler
    s = RandomSampler(7, shuffle=False)
    assert list(s) == list(range(7))
    s = RandomSampler(7, seed=2)
    assert sorted(s) == list(range(7))


def test_from_dataset():
    class DS:
        labels_per_image = [np.array([0]), np.array([], dtype=np.int64), torch.tensor([2, 2])]
        num_classes = 4

        def __len__(self):
            return 3

    rfs = RepeatFactorSampler.from_dataset(DS(), threshold=1.0)
    assert rfs.num_classes == 4 and rfs.category_repeat_factors.shape == (4,)
    assert rfs.category_repeat_factors[1] == 1.0  # class in no image
    cb = ClassBalancedSampler.from_dataset(DS(), seed=3)
    np.testing.assert_allclose(cb.image_probabilities, [0.5, 0.0, 0.5])
    assert len(TrainingSampler.from_dataset(DS())) == 3


# ------------------------------------------------------------------ bad input


def test_bad_input_errors():
    with pytest.raises(DataError, match="empty"):
        RepeatFactorSampler([])
    with pytest.raises(DataError, match="empty"):
        ClassBalancedSampler([])
    with pytest.raises(DataError, match="empty"):
        TrainingSampler(0)
    with pytest.raises(ValueError, match="threshold"):
        RepeatFactorSampler(LABELS, threshold=0)
    with pytest.raises(ValueError, match="threshold"):
        RepeatFactorSampler(LABELS, threshold=-1.0)
    with pytest.raises(ValueError, match="rounding"):
        RepeatFactorSampler(LABELS, rounding="floor")
    with pytest.raises(DataError, match=r"image 1.*out of range for num_classes=2"):
        RepeatFactorSampler([[0], [2]], num_classes=2)
    with pytest.raises(DataError, match=r"image 0.*negative"):
        ClassBalancedSampler([[-1]])
    with pytest.raises(DataError, match=r"image 0.*integers"):
        ClassBalancedSampler([[0.5]])
    with pytest.raises(DataError, match="no image has any label"):
        ClassBalancedSampler([[], []])
    with pytest.raises(ValueError, match="rank"):
        TrainingSampler(4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_samples"):
        ClassBalancedSampler(LABELS, num_samples=0)
    with pytest.raises(ValueError, match="epoch"):
        TrainingSampler(4).set_epoch(-1)
    with pytest.raises(ValueError, match="num_images"):
        RepeatFactorSampler.threshold_for_dataset(0)
