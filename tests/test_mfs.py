"""LOCE's memory-augmented feature sampling (taildet.sampling) and the LOCE fine-tune."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from taildet.config import apply_overrides, config_from_dict, load_config
from taildet.engine import load_checkpoint, train
from taildet.engine.finetune import finetune, freeze_parameters
from taildet.errors import ConfigError
from taildet.analysis.plots import plot_mean_score_vs_instances
from taildet.models import build_faster_rcnn
from taildet.sampling import (SIGN_PATTERNS, ClassMemory, MemoryAugmentedSampling, ProbabilisticSampler,
                              attach_mfs, check_frozen_features, jitter_boxes, make_batch_entries,
                              make_memory_entries,
                              observe_mean_score, prefill_image_indices)
from helpers import SMALL, two_image_batch

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = 5
LOCE_FREEZE = [r"^backbone\.", r"^roi_heads\.box_head\."]


def _model(loss="equilibrium", capacity=16, **mfs_kw):
    torch.manual_seed(0)
    model = build_faster_rcnn(C, loss=loss, **SMALL)
    freeze_parameters(model, LOCE_FREEZE)
    attach_mfs(model, MemoryAugmentedSampling.from_model(model, capacity=capacity, seed=0, **mfs_kw))
    return model


# ----------------------------------------------------------------------------- box generator


def test_jitter_boxes_patterns_offsets_clipping_and_targets():
    gt = torch.tensor([[20.0, 30.0, 50.0, 78.0], [40.0, 10.0, 64.0, 40.0], [0.0, 2.0, 30.0, 40.0]])
    H, W = 100, 70
    g = torch.Generator().manual_seed(3)
    boxes = jitter_boxes(gt, (H, W), g)
    assert boxes.shape == (3 * 16, 4)
    per_gt = boxes.reshape(3, 16, 4)
    w, h = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    size = torch.stack([w, h, w, h], 1)
    rel = (per_gt - gt[:, None]) / size[:, None]                    # [G, 16, 4] offsets / size
    # every offset within 1/6 of the box size
    assert float(rel.abs().max()) <= 1 / 6 + 1e-6
    # GTs 0 and 1 are far from the border: all 16 sign patterns, once each, same u for the image
    for i in (0, 1):
        signs = {tuple(r) for r in torch.sign(rel[i]).tolist()}
        assert signs == {tuple(r) for r in SIGN_PATTERNS.tolist()}
    assert torch.allclose(rel[0], rel[1], atol=1e-5)
    # GT 2 touches x = 0: its negative x1 offsets are clipped to the image
    assert float(per_gt[2, :, 0].min()) == 0.0
    assert bool((boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= W).all())
    assert bool((boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= H).all())
    # regression targets: the detector's box coder, decoding back to the GT
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    b, labels, targets = make_memory_entries(coder, gt, torch.tensor([2, 0, 4]), (H, W),
                                             torch.Generator().manual_seed(3))
    assert torch.equal(b, boxes)
    assert labels.tolist() == [2] * 16 + [0] * 16 + [4] * 16
    decoded = coder.decode_single(targets, b)
    assert torch.allclose(decoded, gt.repeat_interleave(16, 0), atol=1e-3)


def test_batched_generator_matches_per_image_and_flags_empty_boxes():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 44.0], [50.0, 20.0, 90.0, 70.0]]),
                "labels": torch.tensor([0, 3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
               {"boxes": torch.tensor([[0.0, 0.0, 30.0, 60.0], [60.0, 5.0, 80.0, 20.0]]),  # 2nd: outside
                "labels": torch.tensor([4, 1])}]
    sizes = [(96, 96), (96, 96), (50, 40)]
    boxes, labels, reg, valid = make_batch_entries(coder, targets, sizes, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # one u per image, drawn in image order
    for b, t, size in zip(boxes, targets, sizes):
        assert torch.allclose(b, jitter_boxes(t["boxes"], size, g))
    assert labels.tolist() == [0] * 16 + [3] * 16 + [4] * 16 + [1] * 16
    assert valid.tolist() == [True] * 48 + [False] * 16              # clipped to nothing
    assert bool(torch.isfinite(reg[valid]).all())
    mem = ClassMemory(C, capacity=80, feature_shape=(2, 1, 1), log_size=False)
    assert mem.enqueue(torch.zeros(64, 2, 1, 1), labels, reg, valid) == 48
    assert mem.count.tolist() == [16, 0, 0, 16, 16]


# ----------------------------------------------------------------------------- class memory


def _feats(values):
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, 2, 1, 1).contiguous()


def test_ring_buffer_order_and_wrap_around():
    mem = ClassMemory(3, capacity=4, feature_shape=(2, 1, 1), dtype=torch.float32, log_size=False)
    assert mem.features.dtype == torch.float32 and len(mem) == 0
    assert mem.enqueue(_feats([0, 1, 2]), torch.tensor([1, 1, 1]), torch.arange(12.0).reshape(3, 4)) == 3
    f, l, t = mem.entries(1)
    assert f[:, 0, 0, 0].tolist() == [0, 1, 2] and l.tolist() == [1, 1, 1]
    assert torch.equal(t, torch.arange(12.0).reshape(3, 4))
    mem.enqueue(_feats([3, 4, 5]), torch.tensor([1, 1, 1]), torch.zeros(3, 4))
    f, _, _ = mem.entries(1)
    assert f[:, 0, 0, 0].tolist() == [2, 3, 4, 5]                    # oldest (0, 1) overwritten
    assert mem.features[1, :, 0, 0, 0].tolist() == [4, 5, 2, 3]      # raw slots: the ring
    assert int(mem.ptr[1]) == 2 and mem.count.tolist() == [0, 4, 0]
    assert mem.labels[0].tolist() == [-1] * 4


def test_write_cap_per_class_and_sizes():
    mem = ClassMemory(3, capacity=4, feature_shape=(2, 1, 1), dtype=torch.float32, log_size=False)
    labels = torch.tensor([0] * 10 + [2, 2])
    vals = list(range(10)) + [100, 101]
    written = mem.enqueue(_feats(vals), labels, torch.zeros(12, 4))
    assert written == 4 + 2                                          # at most M per class
    assert mem.entries(0)[0][:, 0, 0, 0].tolist() == [6, 7, 8, 9]   # = writing all 10 through the ring
    assert mem.entries(2)[0][:, 0, 0, 0].tolist() == [100, 101]
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        mem.enqueue(_feats([1]), torch.tensor([3]), torch.zeros(1, 4))
    # fp16 by default; bytes per entry and the LVIS v1 estimate
    half = ClassMemory(10, capacity=8, feature_shape=(256, 7, 7), log_size=False)
    assert half.features.dtype == torch.float16
    assert half.entry_nbytes == 256 * 49 * 2 + 8 + 16
    assert half.nbytes >= 10 * 8 * half.entry_nbytes
    lvis = ClassMemory.estimate_nbytes(1203, 80, (256, 7, 7), torch.float16)
    assert 2.3e9 < lvis < 2.5e9


# ----------------------------------------------------------------------------- sampler


def test_sampler_frequencies_follow_inverse_mean_score():
    s = torch.tensor([0.5, 0.1, 0.02, 0.01, 0.2, 0.01])  # background last, ignored
    sampler = ProbabilisticSampler(C, classes_per_iter=8, samples_per_class=4, seed=0)
    p = sampler.class_probabilities(s)
    expected = 1.0 / (s[:C].double() + 1e-7)
    assert torch.allclose(p, expected / expected.sum())
    draws = torch.cat([sampler.draw_classes(p) for _ in range(5000)])
    freq = torch.bincount(draws, minlength=C).double() / draws.numel()
    assert float((freq - p).abs().max()) < 0.01
    # dataset-prior variant: 1 / n_c, classes without instances never drawn
    prior = ProbabilisticSampler(C, prior="instance_counts", instance_counts=[100, 10, 0, 1, 50], seed=1)
    q = prior.class_probabilities()
    w = torch.tensor([1 / 100, 1 / 10, 0, 1, 1 / 50], dtype=torch.float64)
    assert torch.allclose(q, w / w.sum()) and float(q[2]) == 0.0


def test_empty_queues_are_skipped():
    mem = ClassMemory(C, capacity=4, feature_shape=(2, 1, 1), dtype=torch.float32, log_size=False)
    sampler = ProbabilisticSampler(C, classes_per_iter=8, samples_per_class=4, seed=0)
    classes, slots = sampler.draw(mem, torch.full((C + 1,), 0.01))
    assert classes.numel() == 0 and slots.numel() == 0
    mem.enqueue(_feats([7, 8]), torch.tensor([2, 2]), torch.zeros(2, 4))
    n_classes = []
    for _ in range(20):
        classes, slots = sampler.draw(mem, torch.full((C + 1,), 0.01))
        assert set(classes.tolist()) <= {2} and bool((slots < 2).all())
        assert classes.numel() % 4 == 0
        n_classes.append(classes.numel() // 4)
    assert 0 < sum(n_classes) < 20 * 8   # some draws hit class 2, the others were skipped


def test_prefill_image_pick_is_class_balanced():
    labels = [[0], [0, 1], [0], [0], [0], [0], [0], [2]]
    idx = prefill_image_indices(labels, 4, images_per_class=2, seed=0)
    assert idx.count(1) == 2 and idx.count(7) == 2   # the only images of classes 1, 2: repeated to 2
    class0 = [i for i in idx if i not in (1, 7)]
    assert len(class0) == len(set(class0)) and len(class0) <= 2  # class 0: 2 picks (image 1 may be one)
    assert prefill_image_indices(labels, 4, images_per_class=2, seed=0) == idx  # seeded


def test_prefill_pick_per_process_distinct_while_enough_images():
    """Every process gets k images of every class (the memory is per process), distinct across
    processes while the class has enough images; a class with fewer repeats its images."""
    labels = [[0] for _ in range(10)] + [[1], [1], [1]]
    picks = [prefill_image_indices(labels, 2, images_per_class=3, seed=5, rank=r) for r in range(3)]
    class0 = [[i for i in p if i < 10] for p in picks]
    assert [len(c) for c in class0] == [3, 3, 3]
    assert len(set(class0[0]) | set(class0[1]) | set(class0[2])) == 9   # 9 distinct of 10
    for p in picks:  # class 1 has 3 images: each process gets 3 picks of them
        assert sum(1 for i in p if i >= 10) == 3
    assert prefill_image_indices([[0], [1]], 2, images_per_class=5) == [0] * 5 + [1] * 5


# ----------------------------------------------------------------------------- inside the RoI head


def test_memory_samples_reach_the_losses():
    model = _model()
    rh, mfs = model.roi_heads, model.roi_heads.mfs
    seen = {}
    loss_forward, box_loss, loss_update = model.cls_head.loss.forward, rh.box_regression_loss, model.cls_head.loss.update

    def spy_loss(logits, labels, weight=None):
        seen["cls"] = (logits.detach(), labels.clone())
        return loss_forward(logits, labels, weight)

    def spy_box(deltas, labels, targets):
        seen["box"] = (labels.clone(), targets.clone())
        return box_loss(deltas, labels, targets)

    def spy_update(logits, labels, gt_index=None, extra_logits=None, extra_labels=None):
        seen["update"] = (logits.shape[0], extra_logits, extra_labels)
        return loss_update(logits, labels, gt_index, extra_logits=extra_logits, extra_labels=extra_labels)

    model.cls_head.loss.forward, rh.box_regression_loss, model.cls_head.loss.update = spy_loss, spy_box, spy_update
    images, targets = two_image_batch()
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    batch = mfs.last_batch
    assert batch is not None and batch.labels.numel() > 0 and batch.labels.numel() % 4 == 0
    assert set(batch.labels.tolist()) <= {0, 1, 3, 4}                 # classes enqueued this iteration
    n_rois = rh.last_sampled["labels"].numel()
    S = batch.labels.numel()
    logits, labels = seen["cls"]
    assert logits.shape[0] == n_rois + S
    assert torch.equal(labels[:n_rois], rh.last_sampled["labels"]) and torch.equal(labels[n_rois:], batch.labels)
    box_labels, box_targets = seen["box"]
    assert torch.equal(box_labels[n_rois:], batch.labels)
    assert torch.equal(box_targets[n_rois:], batch.regression_targets)
    assert torch.equal(box_targets[:n_rois], rh.last_sampled["regression_targets"])
    n_upd, extra_logits, extra_labels = seen["update"]
    assert n_upd == n_rois and torch.equal(extra_labels, batch.labels) and extra_logits.shape == (S, C + 1)
    assert torch.allclose(extra_logits, logits[n_rois:])
    # the memory entries are the jittered GT boxes: 16 per GT, regression targets decode to a GT
    assert mfs.memory.count.tolist() == [16, 16, 0, 16, 16]
    s = model.cls_head.loss.mean_score
    assert float(s[C]) == pytest.approx(0.01) and float(s[2]) == pytest.approx(0.01) and float(s[0]) != 0.01
    # the classifier gets gradient; nothing happens at test time
    assert rh.box_predictor.cls_score.weight.grad is not None
    count = mfs.memory.count.clone()
    model.eval()
    with torch.no_grad():
        model(images)
    assert torch.equal(mfs.memory.count, count)


def test_enqueue_pools_only_written_entries_and_matches_pooling_all():
    """Class 2 has 3 GTs (48 boxes > M = 16 writes) and one GT lies outside the image (no area):
    pooling only the written boxes leaves the same memory as pooling all and enqueueing them."""
    model = _model(capacity=16)
    rh, mfs = model.roi_heads, model.roi_heads.mfs
    images, _ = two_image_batch()
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 40.0, 44.0], [50.0, 20.0, 90.0, 70.0], [200.0, 200.0, 230.0, 240.0]]),
         "labels": torch.tensor([2, 3, 1])},
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 60.0], [40.0, 40.0, 80.0, 90.0]]), "labels": torch.tensor([2, 2])},
    ]
    model.eval()
    with torch.no_grad():
        il, _ = model.transform(images)
        feats = model.backbone(il.tensors)
    shapes = il.image_sizes
    pooled_rows = []
    forward = rh.forward_box_features

    def spy(features, boxes_list, image_shapes):
        pooled_rows.append(sum(b.shape[0] for b in boxes_list))
        return forward(features, boxes_list, image_shapes)

    rh.forward_box_features = spy
    gen_state = mfs.generator.get_state()
    assert mfs.enqueue_targets(rh, feats, targets, shapes) == 16 + 16  # class 2 capped at 16, class 3: 16
    assert pooled_rows == [32]
    # reference: the same boxes (same generator state), all pooled, through ClassMemory.enqueue
    ref = ClassMemory(C, 16, feature_shape=mfs.memory.feature_shape, dtype=mfs.memory.dtype)
    mfs.generator.set_state(gen_state)
    boxes, labels, regs, valid = make_batch_entries(rh.box_coder, targets, shapes, mfs.generator)
    ref.enqueue(forward(feats, boxes, shapes), labels, regs, valid)
    assert torch.equal(ref.count, mfs.memory.count) and torch.equal(ref.ptr, mfs.memory.ptr)
    for c in range(C):
        for a, b in zip(ref.entries(c), mfs.memory.entries(c)):
            assert torch.equal(a, b), c


def test_background_enqueue_during_rpn_equals_inline_enqueue():
    """With ``overlap`` the enqueue starts in a background thread when the RPN starts; memory,
    mean scores and losses equal the inline enqueue's."""
    images, targets = two_image_batch()
    results = []
    for overlap in (True, False):
        model = _model()
        mfs = model.roi_heads.mfs
        mfs.overlap = overlap
        started = []
        start = mfs.start_enqueue
        mfs.start_enqueue = lambda *a, **k: (started.append(1), start(*a, **k))  # noqa: B023 (called within this iteration only)
        model.train()
        torch.manual_seed(1)
        losses = [{k: float(v.detach()) for k, v in model(images, targets).items()} for _ in range(2)]
        assert len(started) == (2 if overlap else 0) and mfs._pending is None
        results.append((losses, mfs.memory.count.clone(), [mfs.memory.entries(c) for c in range(C)],
                        model.cls_head.loss.mean_score.clone()))
    (l_a, n_a, e_a, s_a), (l_b, n_b, e_b, s_b) = results
    assert l_a == l_b and torch.equal(n_a, n_b) and torch.equal(s_a, s_b)
    for a, b in zip(e_a, e_b):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_mfs_with_plain_ce_keeps_an_observer_mean_score():
    """The observer's mean score is checkpointed with the model (a resume continues from it); the
    memory is not; a model built without MFS (evaluation) loads such a checkpoint."""
    from taildet.engine.checkpoint import load_model_weights

    model = _model(loss="softmax_ce")
    images, targets = two_image_batch()
    model.train()
    model(images, targets)
    obs = model.roi_heads.mfs.observer
    assert obs is model.roi_heads.mfs_observer
    assert float(obs.mean_score[0]) != pytest.approx(0.01)
    state = model.state_dict()
    assert [k for k in state if "mfs" in k] == ["roi_heads.mfs_observer.mean_score"]  # no memory
    resumed = _model(loss="softmax_ce")
    resumed.load_state_dict(state)
    assert torch.equal(resumed.roi_heads.mfs.observer.mean_score, obs.mean_score)
    plain = build_faster_rcnn(C, loss="softmax_ce", **SMALL)
    load_model_weights(plain, state)
    assert torch.equal(plain.roi_heads.box_predictor.cls_score.weight,
                       model.roi_heads.box_predictor.cls_score.weight)
    from taildet.engine.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\), e\.g\. roi_heads\.other\.x"):
        load_model_weights(plain, {**state, "roi_heads.other.x": torch.zeros(1)})
    assert "mfs_observer" not in "".join(_model().state_dict())  # EBL keeps its own mean score


def test_mfs_refuses_a_trainable_backbone():
    torch.manual_seed(0)
    model = build_faster_rcnn(C, loss="equilibrium", **SMALL)
    freeze_parameters(model, [r"^roi_heads\.box_head\."])            # backbone still trainable
    with pytest.raises(ConfigError, match="allow_stale_features"):
        attach_mfs(model, MemoryAugmentedSampling.from_model(model, capacity=4))
    assert model.roi_heads.mfs is None
    assert check_frozen_features(model, allow_stale_features=True)   # allowed explicitly, listed


def test_mfs_config_section_is_validated():
    base = {"data": {"synthetic": {"seed": 0}}, "train": {"iterations": 2}}
    cfg = config_from_dict({**base, "train": {"iterations": 2, "mfs": {"enabled": True, "capacity": 40}}})
    assert cfg.train.mfs.capacity == 40 and cfg.train.mfs.classes_per_iter == 8
    assert cfg.train.mfs.jitter == pytest.approx(1 / 6) and cfg.train.mfs.dtype == "float16"
    assert config_from_dict(cfg.to_dict()).train.mfs == cfg.train.mfs
    for bad, key in (({"capacity": 0}, "train.mfs.capacity"), ({"prior": "x"}, "train.mfs.prior"),
                     ({"dtype": "int8"}, "train.mfs.dtype"), ({"nope": 1}, "train.mfs.nope"),
                     ({"jitter": 0.7}, "train.mfs.jitter")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict({**base, "train": {"iterations": 2, "mfs": bad}})
    with pytest.raises(ConfigError, match=r"train\.mfs\.enabled"):
        config_from_dict({**base, "model": {"arch": "retinanet"}, "train": {"iterations": 2, "mfs": {"enabled": True}}})
    for name in ("ebl", "mfs", "loce", "loce_prior"):
        load_config(os.path.join(REPO, "configs", f"demo_faster_tiny_{name}_ft.yaml"))
    lvis = load_config(os.path.join(REPO, "configs", "lvis_mask_r50_loce_ft.yaml"))
    assert lvis.train.mfs.enabled and lvis.train.epochs == 6


# ----------------------------------------------------------------------------- end to end


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mfs")
    cfg = load_config(os.path.join(REPO, "configs", "demo_faster_tiny_ce.yaml"))
    cfg = apply_overrides(cfg, [f"output_dir={tmp / 's1'}", f"data.root={tmp / 'data'}",
                                "data.synthetic.scale=0.05", "train.iterations=2", "train.warmup_iters=1",
                                "data.batch_size=2", "train.device=cpu", "eval.enabled=false"])
    return tmp, train(cfg, progress=False)["checkpoint"]


def _ft_cfg(tmp, name, extra=(), run="run"):
    cfg = load_config(os.path.join(REPO, "configs", name))
    return apply_overrides(cfg, [f"output_dir={tmp / run / name}", f"data.root={tmp / 'data'}",
                                 "data.synthetic.scale=0.05", "data.batch_size=2", "train.device=cpu",
                                 "train.iterations=3", "train.warmup_iters=1",
                                 "train.checkpoint_period=1", "eval.max_dets=20",
                                 "train.mfs.capacity=16", *extra])


def test_loce_finetune_runs_resumes_and_evaluates(stage1):
    tmp, ckpt = stage1
    cfg = _ft_cfg(tmp, "demo_faster_tiny_loce_ft.yaml")
    seen = {}

    def stop_after_2(it, state):
        mfs = state["model"].roi_heads.mfs
        seen.setdefault("filled", int((mfs.memory.count > 0).sum()))
        if it == 2:
            raise _Stop

    with pytest.raises(_Stop):
        finetune(cfg, ckpt, progress=False, hooks=[stop_after_2])
    assert seen["filled"] > 0                                        # pre-filled before iteration 1
    run_dir = cfg.output_dir
    saved = load_checkpoint(os.path.join(run_dir, "checkpoint_0000002.pth"))["model"]
    s2 = saved["cls_head.loss.mean_score"]
    assert not torch.allclose(s2[:-1], torch.full_like(s2[:-1], 0.01))

    resumed = {}

    def after(it, state):
        resumed.setdefault(it, state["model"].roi_heads.mfs is not None)

    out = finetune(cfg, ckpt, resume=True, progress=False, hooks=[after])
    assert list(resumed) == [3] and resumed[3]
    final = load_checkpoint(out["checkpoint"])
    assert final["iteration"] == 3
    assert not any("mfs" in k or "memory" in k for k in final["model"])
    assert "AP" in out["metrics"]["bbox"]
    assert os.path.isfile(os.path.join(out["run_dir"], "results_bbox.json"))
    logged = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["iteration"] for r in logged][-1] == 3


def test_finetune_refuses_mfs_with_trainable_backbone(stage1):
    tmp, ckpt = stage1
    cfg = _ft_cfg(tmp, "demo_faster_tiny_loce_ft.yaml", ["train.freeze=['^roi_heads\\.box_head\\.']",
                                                         "eval.enabled=false"], run="refuse")
    with pytest.raises(ConfigError, match="backbone"):
        finetune(cfg, ckpt, progress=False)


def test_ce_mean_score_observer_and_fig4_plot(stage1, tmp_path):
    from taildet.engine.builders import build_datasets, build_model_from_cfg

    tmp, ckpt = stage1
    cfg = _ft_cfg(tmp, "demo_faster_tiny_ce.yaml")  # the stage-1 (CE) model the observer watches
    train_set, _, _ = build_datasets(cfg)
    model = build_model_from_cfg(cfg, train_set.num_classes)
    model.load_state_dict(load_checkpoint(ckpt)["model"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = observe_mean_score(model, train_set, device="cpu", max_images=4, progress=False)
    assert s.shape == (train_set.num_classes + 1,) and float(s[-1]) == pytest.approx(0.01)
    assert not torch.allclose(s[:-1], torch.full_like(s[:-1], 0.01))  # some classes observed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # pure observer
    out = plot_mean_score_vs_instances({"CE": s, "uniform": torch.full_like(s, 0.01)},
                                       train_set.instance_counts, tmp_path / "fig4.png")
    assert os.path.getsize(out) > 0


@pytest.mark.parametrize("name", ["demo_faster_tiny_ebl_ft.yaml", "demo_faster_tiny_mfs_ft.yaml",
                                  "demo_faster_tiny_loce_prior_ft.yaml"])
def test_other_loce_recipes_fine_tune(stage1, name):
    tmp, ckpt = stage1
    cfg = _ft_cfg(tmp, name, ["train.iterations=2", "eval.enabled=false"], run="recipes")
    seen = {}
    out = finetune(cfg, ckpt, progress=False, hooks=[lambda it, st: seen.setdefault("mfs", st["model"].roi_heads.mfs)])
    assert load_checkpoint(out["checkpoint"])["iteration"] == 2
    assert (seen["mfs"] is None) == (name == "demo_faster_tiny_ebl_ft.yaml")
    if name == "demo_faster_tiny_loce_prior_ft.yaml":
        assert seen["mfs"].sampler.prior == "instance_counts"
    if name == "demo_faster_tiny_mfs_ft.yaml":  # CE + MFS: the observer's mean score is checkpointed
        from taildet.engine import evaluate_checkpoint

        saved = load_checkpoint(out["checkpoint"])["model"]
        assert torch.equal(saved["roi_heads.mfs_observer.mean_score"], seen["mfs"].observer.mean_score)
        metrics = evaluate_checkpoint(cfg, out["checkpoint"])  # a model without MFS loads it
        assert 0.0 <= metrics["bbox"]["AP"] <= 1.0
