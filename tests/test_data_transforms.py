"""Tests of the detection transforms: boxes, masks, area and sizes stay consistent."""

from __future__ import annotations

import pytest
import torch

from taildet.data.transforms import (
    Compose,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    ToFloat,
    build_transforms,
    resized_shape,
)


def make_pair(h=20, w=40):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, h, w, generator=g)
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 2:8, 4:14] = 1  # box [4, 2, 14, 8]
    masks[1, 10:20, 30:40] = 1  # box [30, 10, 40, 20]
    target = {
        "boxes": torch.tensor([[4.0, 2.0, 14.0, 8.0], [30.0, 10.0, 40.0, 20.0]]),
        "labels": torch.tensor([3, 1]),
        "area": torch.tensor([60.0, 100.0]),
        "masks": masks,
        "gt_index": torch.arange(2),
        "orig_size": torch.tensor([h, w]),
        "image_id": 7,
    }
    return image, target


def mask_boxes(masks):
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    return torch.tensor(out, dtype=torch.float32)


def test_flip_boxes_and_masks():
    image, target = make_pair()
    im2, t2 = RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(im2, image.flip(-1))
    assert t2["boxes"].tolist() == [[26, 2, 36, 8], [0, 10, 10, 20]]
    assert torch.equal(mask_boxes(t2["masks"]), t2["boxes"])
    assert torch.equal(t2["gt_index"], target["gt_index"])
    assert torch.equal(t2["labels"], target["labels"])
    assert t2["size"].tolist() == [20, 40]
    # input target not modified
    assert target["boxes"].tolist() == [[4, 2, 14, 8], [30, 10, 40, 20]]


def test_flip_twice_is_identity():
    image, target = make_pair()
    flip = RandomHorizontalFlip(p=1.0)
    im2, t2 = flip(*flip(image, target))
    assert torch.equal(im2, image)
    assert torch.equal(t2["boxes"], target["boxes"])
    assert torch.equal(t2["masks"], target["masks"])


def test_flip_p0_and_probability_with_seed():
    image, target = make_pair()
    im2, t2 = RandomHorizontalFlip(p=0.0)(image, target)
    assert torch.equal(im2, image) and torch.equal(t2["boxes"], target["boxes"])
    flip = RandomHorizontalFlip(p=0.5)

    def run():
        torch.manual_seed(123)
        return [bool(flip(image, target)[1]["boxes"][0, 0] != 4) for _ in range(200)]

    a, b = run(), run()
    assert a == b  # global RNG seeding makes it repeatable
    assert 70 < sum(a) < 130
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    f1, f2 = RandomHorizontalFlip(0.5, generator=g1), RandomHorizontalFlip(0.5, generator=g2)
    assert [f1(image, target)[1]["boxes"][0, 0].item() for _ in range(20)] == [
        f2(image, target)[1]["boxes"][0, 0].item() for _ in range(20)
    ]


def test_flip_empty_boxes():
    image = torch.rand(3, 5, 6)
    target = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 5, 6, dtype=torch.uint8)}
    _, t = RandomHorizontalFlip(1.0)(image, target)
    assert t["boxes"].shape == (0, 4) and t["masks"].shape == (0, 5, 6)


def test_resize_scales_boxes_exactly():
    image, target = make_pair(20, 40)
    im2, t2 = ResizeShortestEdge(50, max_size=1000)(image, target)
    assert im2.shape == (3, 50, 100) and im2.dtype == torch.float32
    assert torch.allclose(t2["boxes"], target["boxes"] * 2.5)
    assert torch.allclose(t2["area"], target["area"] * 6.25)
    assert t2["size"].tolist() == [50, 100]
    assert t2["orig_size"].tolist() == [20, 40]
    assert t2["scale_factor"].tolist() == [2.5, 2.5]
    assert t2["masks"].shape == (2, 50, 100) and t2["masks"].dtype == torch.uint8
    assert torch.equal(mask_boxes(t2["masks"]), t2["boxes"])
    assert torch.equal(t2["gt_index"], target["gt_index"])
    # boxes map back to the original with scale_factor
    back = t2["boxes"] / t2["scale_factor"].repeat(2)
    assert torch.allclose(back, target["boxes"])


def test_resize_non_uniform_rounding_uses_per_axis_factors():
    image, target = make_pair(21, 40)
    _, t2 = ResizeShortestEdge(10, max_size=None)(image, target)
    nh, nw = t2["size"].tolist()
    assert (nh, nw) == (10, 19)  # 40 * 10 / 21 = 19.05
    expected = target["boxes"] * torch.tensor([nw / 40, nh / 21, nw / 40, nh / 21])
    assert torch.allclose(t2["boxes"], expected)


def test_resize_max_size_caps_long_edge():
    assert resized_shape(100, 400, 200, 500) == (125, 500)
    assert resized_shape(100, 400, 200, None) == (200, 800)
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)
    image, target = make_pair(20, 40)
    im2, _ = ResizeShortestEdge(100, max_size=60)(image, target)
    assert im2.shape == (3, 30, 60)


def test_multiscale_draws_all_sizes_with_seed():
    image, target = make_pair(20, 40)
    tf = ResizeShortestEdge((8, 10, 12), max_size=1000)

    def run():
        torch.manual_seed(0)
        return [tf(image, target)[0].shape[1] for _ in range(60)]

    sizes = run()
    assert set(sizes) == {8, 10, 12}
    assert sizes == run()
    rng = ResizeShortestEdge((8, 12), max_size=1000, sample_style="range",
                             generator=torch.Generator().manual_seed(1))
    assert {rng(image, target)[0].shape[1] for _ in range(100)} == {8, 9, 10, 11, 12}


def test_resize_uint8_image_and_to_float():
    image = (torch.rand(3, 10, 20) * 255).to(torch.uint8)
    im2, t = ToFloat()(image, {})
    assert im2.dtype == torch.float32 and im2.max() <= 1.0
    assert torch.allclose(im2 * 255, image.float())
    im3, _ = ResizeShortestEdge(20, None)(image, {"boxes": torch.zeros(0, 4)})
    assert im3.dtype == torch.uint8 and im3.shape == (3, 20, 40)


def test_resize_constant_image_stays_constant():
    image = torch.full((3, 16, 24), 0.25)
    im2, _ = ResizeShortestEdge(7, None)(image, {})
    assert torch.allclose(im2, torch.full_like(im2, 0.25), atol=1e-6)


def test_compose_and_build_transforms():
    image, target = make_pair(20, 40)
    torch.manual_seed(0)
    tf = build_transforms(True, min_sizes=(10, 30), max_size=1000, flip_prob=0.5)
    assert isinstance(tf, Compose) and len(tf.transforms) == 2
    shapes = set()
    for _ in range(40):
        im, t = tf(image, target)
        shapes.add(tuple(im.shape[1:]))
        assert torch.equal(mask_boxes(t["masks"]), t["boxes"])
    assert shapes == {(10, 20), (30, 60)}
    ev = build_transforms(False, min_sizes=(10, 30), max_size=1000)
    im, t = ev(image, target)
    assert im.shape == (3, 30, 60)
    assert torch.allclose(t["boxes"], target["boxes"] * 1.5)  # no flip at eval


@pytest.mark.parametrize(
    "kwargs", [dict(short_edge_lengths=()), dict(short_edge_lengths=0),
               dict(short_edge_lengths=(5,), sample_style="random"),
               dict(short_edge_lengths=(5, 6, 7), sample_style="range")]
)
def test_resize_bad_args(kwargs):
    with pytest.raises(ValueError):
        ResizeShortestEdge(**kwargs)


def test_flip_bad_p():
    with pytest.raises(ValueError):
        RandomHorizontalFlip(1.5)
