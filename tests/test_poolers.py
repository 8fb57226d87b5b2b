"""ParallelMultiScaleRoIAlign: the CPU multi-threaded pooling equals torchvision's serial module."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from taildet.models.poolers import ParallelMultiScaleRoIAlign, image_groups


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def _inputs(requires_grad=False, num_images=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = 128
    feats = {str(i): torch.randn(num_images, 8, size // 2 ** (i + 2), size // 2 ** (i + 2), generator=g)
             for i in range(4)}
    for v in feats.values():
        v.requires_grad_(requires_grad)
    boxes = []
    for n in (40, 3, 0, 70, 25)[:num_images]:
        xy = torch.rand(n, 2, generator=g) * size * 0.7
        wh = 4 + torch.rand(n, 2, generator=g) * size * 0.5
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=size)], 1))
    shapes = [(size, size - 8 * i) for i in range(num_images)]
    return feats, boxes, shapes


def test_image_groups_are_contiguous_balanced_and_cover_all():
    assert image_groups([10, 10, 10, 10], 2) == [slice(0, 2), slice(2, 4)]
    assert image_groups([100, 1, 1, 1], 2) == [slice(0, 1), slice(1, 4)]
    assert image_groups([5], 4) == [slice(0, 1)]
    groups = image_groups([3, 0, 9, 1, 7, 2], 3)
    assert groups[0].start == 0 and groups[-1].stop == 6 and len(groups) == 3
    assert all(a.stop == b.start for a, b in zip(groups, groups[1:]))


def test_parallel_pooling_and_gradients_equal_serial(two_threads):
    serial = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    parallel = ParallelMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    calls = []
    fwd = MultiScaleRoIAlign.forward

    def spy(self, x, boxes, image_shapes):
        calls.append(len(boxes))
        return fwd(self, x, boxes, image_shapes)

    feats, boxes, shapes = _inputs(requires_grad=True)
    ref = serial(feats, boxes, shapes)
    (g_ref,) = torch.autograd.grad((ref * ref).sum(), [feats["0"]])
    parallel(feats, boxes, shapes)  # first call: scales inferred serially
    MultiScaleRoIAlign.forward = spy
    try:
        out = parallel(feats, boxes, shapes)
    finally:
        MultiScaleRoIAlign.forward = fwd
    assert len(calls) == 2 and sum(calls) == len(boxes)  # two image groups pooled
    assert torch.equal(out, ref)
    (g,) = torch.autograd.grad((out * out).sum(), [feats["0"]])
    assert torch.equal(g, g_ref)
    # caller's modes reach the worker threads
    with torch.no_grad():
        assert not parallel(feats, boxes, shapes).requires_grad
    with torch.inference_mode():
        assert torch.equal(parallel(feats, boxes, shapes), ref.detach())


def test_serial_path_with_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parallel = ParallelMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
        feats, boxes, shapes = _inputs()
        out = parallel(feats, boxes, shapes)
        out2 = parallel(feats, boxes, shapes)
        assert torch.equal(out, MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(feats, boxes, shapes))
        assert torch.equal(out, out2)
    finally:
        torch.set_num_threads(n)



def test_fork_handler_forgets_the_parent_pool(two_threads):
    """After fork the child has none of the parent's threads; the registered handler drops the
    pool so the child's first parallel call starts a new one (forking a process that ran OpenMP
    and calling torch there is not something to do in a test: libgomp is not fork-safe)."""
    from taildet.models import poolers

    parallel = ParallelMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    feats, boxes, shapes = _inputs()
    ref = parallel(feats, boxes, shapes)
    parallel(feats, boxes, shapes)
    assert poolers._POOL is not None
    poolers._forget_pool_after_fork()
    assert poolers._POOL is None
    assert torch.equal(parallel(feats, boxes, shapes), ref) and poolers._POOL is not None
