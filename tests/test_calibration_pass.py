"""End-to-end LogN statistics pass on tiny detectors (taildet two-/one-stage, plain torchvision),
applying the result, statistics files, the figure, and a real 2-process gloo merge."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from taildet.calibration import (
    LogitNormalizer,
    apply_calibration,
    apply_logit_normalization,
    calibrate_torchvision_model,
    collect_logit_statistics,
    merge_moments,
    plot_logit_statistics,
    training_sampling_mode,
)
from taildet.errors import ConfigError, DataError
from taildet.models import build_backbone, build_faster_rcnn
from taildet.models.one_stage import build_retinanet

C = 6


pytestmark = pytest.mark.usefixtures("one_thread")


class _Boxes(torch.utils.data.Dataset):
    """Random 96 px images with 1-3 boxes of classes 0..C-1 (``offset`` shifts the labels)."""

    class_names = [f"class_{i}" for i in range(C)]

    def __init__(self, n=4, offset=0, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            k = 1 + i % 3
            xy = torch.randint(0, 50, (k, 2), generator=g).float()
            wh = torch.randint(16, 40, (k, 2), generator=g).float()
            boxes = torch.cat([xy, (xy + wh).clamp(max=95)], 1)
            labels = (torch.arange(k) + i) % C + offset
            self.items.append((torch.rand(3, 96, 96, generator=g), {"boxes": boxes, "labels": labels}))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _loader(ds, batch_size=2):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=lambda b: tuple(zip(*b)))


def _train_a_few_steps(model, loader, steps=3):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    it = iter(loader)
    for _ in range(steps):
        try:
            images, targets = next(it)
        except StopIteration:
            it = iter(loader)
            images, targets = next(it)
        loss = sum(model(list(images), list(targets)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snap):
    state = model.state_dict()
    for k, v in snap.items():
        assert torch.equal(state[k], v), f"{k} changed during the statistics pass"


@pytest.fixture(scope="module")
def two_stage():
    torch.manual_seed(0)
    model = build_faster_rcnn(C, backbone="tiny", min_size=96, max_size=96, representation_size=128)
    loader = _loader(_Boxes(n=4))
    _train_a_few_steps(model, loader)
    return model, loader


def test_two_stage_pass_statistics_and_no_side_effects(two_stage):
    model, loader = two_stage
    model.eval()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    seen_modes = []
    h = bn.register_forward_pre_hook(lambda m, a: seen_modes.append(m.training))
    snap = _snapshot(model)
    try:
        norm = collect_logit_statistics(model, loader, progress=False)
    finally:
        h.remove()
    _assert_unchanged(model, snap)
    assert seen_modes and not any(seen_modes)  # BatchNorm ran in eval mode
    assert all(not m.training for m in model.modules())  # flags restored
    assert norm.background and norm.num_outputs == C + 1 and norm.stage == "roi_heads"
    assert norm.class_names == _Boxes.class_names  # found on the loader's dataset
    assert 0 < float(norm.count) <= 512 * 4
    assert torch.isfinite(norm.mean).all() and torch.isfinite(norm.variance).all() and (norm.variance > 0).all()
    # the statistics are those of the training-time sampled RoIs (same seed -> same sampling)
    images, targets = next(iter(loader))
    torch.manual_seed(123)
    one = collect_logit_statistics(model, [(images, targets)], progress=False)
    torch.manual_seed(123)
    with training_sampling_mode(model):
        model(list(images), list(targets))
        sampled = model.roi_heads.last_sampled
    assert (sampled["labels"] < C).any() and (sampled["labels"] == C).any()  # positives and negatives
    ref = sampled["logits"].double().numpy()
    assert float(one.count) == ref.shape[0]
    np.testing.assert_allclose(one.mean.numpy(), ref.mean(0), atol=1e-10)
    np.testing.assert_allclose(one.variance.numpy(), ref.var(0), rtol=1e-8, atol=1e-12)


def test_two_stage_apply_changes_eval_scores_and_file_round_trip(two_stage, tmp_path):
    model, loader = two_stage
    norm = collect_logit_statistics(model, loader, progress=False, max_batches=1)
    images, _ = next(iter(loader))
    model.eval()
    with torch.no_grad():
        before = model(list(images))
        raw = model.roi_heads.last_logits.clone()
        apply_logit_normalization(model, norm)
        after = model(list(images))
    assert model.cls_head.logit_transform is norm
    assert torch.equal(model.roi_heads.last_logits, raw)  # raw logits recorded before the transform
    assert any(
        b["scores"].shape != a["scores"].shape or not torch.allclose(b["scores"], a["scores"])
        for b, a in zip(before, after)
    )
    path = tmp_path / "logn.json"
    norm.save(path)
    apply_logit_normalization(model, None)
    assert model.cls_head.logit_transform is None
    apply_calibration(model, path, class_names=_Boxes.class_names)
    with torch.no_grad():
        again = model(list(images))
    for a, b in zip(after, again):
        assert torch.equal(a["scores"], b["scores"])
    with pytest.raises(DataError, match="class 0"):
        apply_calibration(model, path, class_names=["x"] + _Boxes.class_names[1:])
    with pytest.raises(ConfigError, match="columns"):
        apply_logit_normalization(model, LogitNormalizer(C + 1))
    with pytest.raises(ConfigError, match="background"):
        apply_logit_normalization(model, LogitNormalizer(C, background_index=0))
    apply_logit_normalization(model, None)
    out = plot_logit_statistics(norm, np.array([0, 1, 5, 20, 100, 1000]), tmp_path / "fig" / "stats.png")
    assert os.path.getsize(out) > 1000


def test_statistics_pass_loss_state_is_restored():
    from taildet.losses.online_logn import OnlineLogNLoss
    from taildet.losses import SoftmaxCrossEntropyLoss

    torch.manual_seed(0)
    model = build_faster_rcnn(C, backbone="tiny", min_size=96, max_size=96, representation_size=64,
                              box_batch_size_per_image=64)
    model.cls_head.loss = OnlineLogNLoss(SoftmaxCrossEntropyLoss(C), momentum=0.5)  # a loss with state
    snap = _snapshot(model)
    collect_logit_statistics(model, _loader(_Boxes(n=2)), progress=False)
    _assert_unchanged(model, snap)
    assert int(model.cls_head.loss.online.num_updates) == 0


def _tiny_torchvision_faster_rcnn():
    torch.manual_seed(0)
    backbone = build_backbone("tiny")
    return FasterRCNN(
        backbone,
        num_classes=C + 1,  # torchvision counts the background
        min_size=96,
        max_size=96,
        rpn_anchor_generator=AnchorGenerator(((16, 32, 64),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
    )


def test_torchvision_one_call_api(tmp_path):
    model = _tiny_torchvision_faster_rcnn()
    loader = _loader(_Boxes(n=4, offset=1))  # torchvision labels 1..C
    _train_a_few_steps(model, loader, steps=2)
    model.eval()
    keys = set(model.state_dict())
    snap = _snapshot(model)
    images, _ = next(iter(loader))
    with torch.no_grad():
        before = model(list(images))
    out = calibrate_torchvision_model(model, loader, progress=False, save_path=tmp_path / "tv.json")
    assert out is model and not model.training
    _assert_unchanged(model, snap)
    norm = model.roi_heads.box_predictor.logit_transform
    assert norm.background_index == 0 and norm.num_classes == C and float(norm.count) > 0
    assert keys < set(model.state_dict())  # only keys added
    pred = model.roi_heads.box_predictor
    feats = torch.randn(5, pred.cls_score.in_features)
    with torch.no_grad():
        cls_eval, _ = pred(feats)
        pred.train()
        cls_raw, _ = pred(feats)  # training: raw logits
        pred.eval()
    assert torch.equal(cls_eval[:, 0], cls_raw[:, 0])  # background column 0 untouched
    torch.testing.assert_close(cls_eval, norm(cls_raw))
    with torch.no_grad():
        after = model(list(images))
    assert any(
        b["scores"].shape != a["scores"].shape or not torch.allclose(b["scores"], a["scores"])
        for b, a in zip(before, after)
    )
    assert LogitNormalizer.load(tmp_path / "tv.json", num_classes=C).background_index == 0
    apply_logit_normalization(model, None)
    with torch.no_grad():
        undone = model(list(images))
    for a, b in zip(before, undone):
        assert torch.equal(a["scores"], b["scores"])


def test_one_stage_retinanet_statistics():
    torch.manual_seed(0)
    model = build_retinanet(C, backbone="tiny", min_size=96, max_size=96)
    loader = _loader(_Boxes(n=2))
    _train_a_few_steps(model, loader, steps=1)
    model.eval()
    snap = _snapshot(model)
    norm = collect_logit_statistics(model, loader, progress=False)
    _assert_unchanged(model, snap)
    assert not norm.background and norm.beta == "min_fg" and norm.stage == "head" and norm.num_outputs == C
    images, targets = next(iter(loader))
    with training_sampling_mode(model):
        model(list(images), list(targets))
        logits, labels = (model.cls_head.record.logits, model.cls_head.record.labels)
    ref = logits[labels >= 0].double().numpy()
    assert float(norm.count) == ref.shape[0] < logits.shape[0]  # ignored anchors left out
    np.testing.assert_allclose(norm.mean.numpy(), ref.mean(0), atol=1e-10)
    with torch.no_grad():
        before = model(list(images))
        apply_logit_normalization(model, norm)
        after = model(list(images))
    assert model.cls_head.logit_transform is norm
    assert any(not torch.equal(b["scores"], a["scores"]) for b, a in zip(before, after))


# -- a real 2-process merge over gloo ---------------------------------------------------------------


def _rank_main(rank, world, init_method, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        x = torch.from_numpy(np.random.default_rng(0).normal(size=(101, C + 1)) * 2 - 1).float()
        shard = x[:30] if rank == 0 else x[30:]
        norm = LogitNormalizer(C)
        for part in torch.split(shard, 16):
            norm.update(part)
        norm.sync()
        norm.sync()  # a second sync must not merge again
        torch.save({"count": norm.count, "mean": norm.mean, "m2": norm.m2}, f"{path}.{rank}")
        dist.barrier()  # both ranks done before gloo is torn down
    finally:
        dist.destroy_process_group()


def test_sync_two_process_gloo(tmp_path):
    path = str(tmp_path / "rank")
    mp.start_processes(_rank_main, args=(2, (tmp_path / "rendezvous").as_uri(), path), nprocs=2, start_method="spawn")
    x = (np.random.default_rng(0).normal(size=(101, C + 1)) * 2 - 1).astype(np.float32).astype(np.float64)
    results = [torch.load(f"{path}.{r}") for r in range(2)]
    for res in results:
        assert float(res["count"]) == 101
        np.testing.assert_allclose(res["mean"].numpy(), x.mean(0), atol=1e-12)
        np.testing.assert_allclose((res["m2"] / res["count"]).numpy(), x.var(0), rtol=1e-10)
    assert torch.equal(results[0]["mean"], results[1]["mean"])
    c, mu, m2 = merge_moments(torch.tensor([101.0]), results[0]["mean"][None], results[0]["m2"][None])
    assert torch.equal(mu, results[0]["mean"])
