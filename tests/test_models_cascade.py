"""Cascade R-CNN / Cascade Mask R-CNN: stages, training, the test-time average, LogN per stage."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import boxes as box_ops

from taildet.calibration import (LogitNormalizer, apply_calibration, apply_logit_normalization,
                                 classification_heads, collect_stage_statistics, load_normalizers, save_normalizers)
from taildet.calibration.heads import classification_head
from taildet.errors import ConfigError
from taildet.losses.eql import eqlv2_loss
from taildet.models import build_cascade_mask_rcnn, build_cascade_rcnn, build_model
from taildet.models.build import architecture_info
from taildet.models.cascade import TailCascadeMaskRCNN, TailCascadeRCNN
from taildet.models.cascade_heads import average_stage_logits
from helpers import SMALL

C = 5
STAGES = ["roi_heads.0", "roi_heads.1", "roi_heads.2"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(masks: bool = False):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[6.0, 8.0, 30.0, 34.0], [34.0, 14.0, 60.0, 50.0]]), "labels": torch.tensor([0, 3])},
        {"boxes": torch.tensor([[4.0, 4.0, 24.0, 44.0], [28.0, 26.0, 58.0, 60.0]]), "labels": torch.tensor([4, 1])},
    ]
    if masks:
        for t in targets:
            m = torch.zeros(len(t["boxes"]), 64, 64, dtype=torch.uint8)
            for j, (x1, y1, x2, y2) in enumerate(t["boxes"].long().tolist()):
                m[j, y1:y2, x1:x2] = 1
            t["masks"] = m
    return images, targets


def _model(masks: bool = False, **kw):
    torch.manual_seed(0)
    opts = {**SMALL, "min_size": 64, "max_size": 64, **kw}
    return (build_cascade_mask_rcnn if masks else build_cascade_rcnn)(C, **opts)


def _softmax_fg(z):
    return F.softmax(z, dim=1)[:, :C]


def _check_scores_come_from(out, fg_scores, image_index):
    """Every output (score, label) is ``fg_scores[r, label]`` of some RoI ``r`` of its image."""
    for i, det in enumerate(out):
        assert len(det["scores"]) > 0
        rows = fg_scores[image_index == i]
        for s, lab in zip(det["scores"], det["labels"]):
            assert (rows[:, lab] - s).abs().min() < 1e-6


def test_both_archs_build_with_the_reference_stage_settings():
    for arch, cls, masks in (("cascade_rcnn", TailCascadeRCNN, False), ("cascade_mask_rcnn", TailCascadeMaskRCNN, True)):
        info = architecture_info(arch)
        assert (info.stage, info.masks, info.stages) == ("roi_heads", masks, 3)
        torch.manual_seed(0)
        model = build_model(arch, C, **SMALL)
        assert isinstance(model, cls)
        rh = model.roi_heads
        assert rh.stage_loss_weights == (1.0, 0.5, 0.25)
        for st, iou, w in zip(rh.stages, (0.5, 0.6, 0.7), ((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15))):
            assert st.proposal_matcher.high_threshold == iou and st.proposal_matcher.low_threshold == iou
            assert tuple(st.box_coder.weights) == w
            assert st.box_predictor.bbox_pred.out_features == 4  # class-agnostic
            assert st.box_predictor.cls_score.out_features == C + 1
        # own box head, classifier, head and loss per stage; the mask head on the last stage only
        assert len({id(st.box_head) for st in rh.stages}) == 3
        assert len({id(st.cls_head.loss) for st in rh.stages}) == 3
        assert [st.has_mask() for st in rh.stages] == [False, False, masks]
        heads = classification_heads(model)
        assert list(heads) == STAGES and model.classification_heads() == heads
        assert [h is st.cls_head for h, st in zip(heads.values(), rh.stages)] == [True] * 3
        assert model.cls_head is heads["roi_heads.2"]
    with pytest.raises(ConfigError, match="3 classification stages"):
        classification_head(model)
    with pytest.raises(TypeError, match="class_agnostic_box_reg"):
        build_cascade_rcnn(C, class_agnostic_box_reg=False)
    with pytest.raises(ConfigError, match="one entry per stage"):
        build_cascade_rcnn(C, stage_iou_thresholds=(0.5, 0.6))
    with pytest.raises(ConfigError, match="lists of numbers"):
        build_cascade_rcnn(C, stage_loss_weights=("a", 1, 1))
    with pytest.raises(ConfigError, match=r"stage_iou_thresholds must be in \(0, 1\)"):
        build_cascade_rcnn(C, stage_iou_thresholds=(0.5, 0.6, 1.2))
    two = build_cascade_rcnn(C, **SMALL, stage_iou_thresholds=(0.4, 0.8), stage_box_weights=((1, 1, 1, 1),) * 2,
                             stage_loss_weights=(1.0, 2.0))
    assert [st.proposal_matcher.high_threshold for st in two.roi_heads.stages] == [0.4, 0.8]
    assert list(classification_heads(two)) == STAGES[:2]


def test_training_steps_reach_every_stage_and_refine_the_proposals():
    model = _model()
    images, targets = _data()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {f"s{t}.{k}" for t in range(3) for k in ("loss_classifier", "loss_box_reg")} | {
        "loss_objectness", "loss_rpn_box_reg"}
    rh = model.roi_heads
    # each stage's classification loss is its own head's loss on its record, times its weight
    for t, (st, w) in enumerate(zip(rh.stages, (1.0, 0.5, 0.25))):
        rec = st.cls_head.record
        assert rec.logits.shape[1] == C + 1
        torch.testing.assert_close(losses[f"s{t}.loss_classifier"].detach(), w * st.cls_head(rec.logits, rec.labels))
    # stage t + 1's proposals: stage t's sampled RoIs decoded with its deltas (clipped), or GT boxes
    for prev, nxt in zip(rh.stages[:-1], rh.stages[1:]):
        s = prev.last_sampled
        decoded = prev.box_coder.decode(s["box_deltas"], s["proposals"]).reshape(-1, 4)
        decoded = box_ops.clip_boxes_to_image(decoded, (64, 64))
        counts = [len(p) for p in s["proposals"]]
        for i, (props, dec) in enumerate(zip(nxt.last_sampled["proposals"], decoded.split(counts))):
            pool = torch.cat([dec, targets[i]["boxes"]])
            dist = (props[:, None] - pool[None]).abs().amax(dim=2).min(dim=1).values
            assert float(dist.max()) < 1e-4
            from_prev = (props[:, None] - dec[None]).abs().amax(dim=2).min(dim=1).values < 1e-4
            assert from_prev.sum() > 0
    # a few SGD steps: finite losses, every stage's classifier gets a gradient and moves
    before = [st.box_predictor.cls_score.weight.detach().clone() for st in rh.stages]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    for step in range(3):
        losses = model(images, targets)
        assert all(torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        sum(losses.values()).backward()
        if step == 0:
            for st in rh.stages:
                assert st.box_predictor.cls_score.weight.grad.abs().sum() > 0
                assert st.box_predictor.bbox_pred.weight.grad.abs().sum() > 0
        opt.step()
    for st, w0 in zip(rh.stages, before):
        assert not torch.equal(st.box_predictor.cls_score.weight, w0)
        assert torch.isfinite(st.box_predictor.cls_score.weight).all()


def _spy_scores(model):
    """Record the foreground scores ``[R, C]`` the last stage post-processes."""
    final = model.roi_heads.stages[-1]
    seen = []
    inner = final.postprocess_scores

    def spy(scores, *args):
        seen.append(scores.detach().clone())
        return inner(scores, *args)

    final.postprocess_scores = spy
    return seen


def _distinct_stage_biases(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for st in model.roi_heads.stages:
            st.box_predictor.cls_score.bias.copy_(3.0 * torch.randn(C + 1, generator=g))


def test_eval_scores_are_the_softmax_of_the_stages_mean_logits():
    model = _model()
    _distinct_stage_biases(model)
    seen = _spy_scores(model)
    images, _ = _data()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det in out:
        n = det["boxes"].shape[0]
        assert 0 < n <= 300 and det["labels"].shape == (n,) and det["scores"].shape == (n,)
        assert det["labels"].min() >= 0 and det["labels"].max() <= C - 1
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        assert det["boxes"].min() >= 0 and det["boxes"].max() <= 64
    rh = model.roi_heads
    z = [st.last_logits for st in rh.stages]
    assert all(torch.equal(a, b) for a, b in zip(z, rh.last_stage_logits))
    assert all(a.shape == z[0].shape for a in z)  # every stage scores the same RoIs, refined
    hand = _softmax_fg((z[0] + z[1] + z[2]) / 3)
    (scores,) = seen
    torch.testing.assert_close(scores, hand)
    torch.testing.assert_close(average_stage_logits(z), (z[0] + z[1] + z[2]) / 3)
    half = average_stage_logits([z[0].half(), z[1], z[2]])  # a float16 stage (autocast) with float32 ones
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, (z[0].half().float() + z[1] + z[2]) / 3)
    _check_scores_come_from(out, hand, rh.stages[-1].last_logit_image_index)
    # not the last stage's scores alone, nor the mean of the stages' probabilities (detectron2)
    for other in (_softmax_fg(z[2]), (_softmax_fg(z[0]) + _softmax_fg(z[1]) + _softmax_fg(z[2])) / 3):
        assert (other - hand).abs().max() > 1e-2


def test_mask_variant_trains_and_returns_masks_on_the_final_boxes():
    model = _model(masks=True)
    images, targets = _data(masks=True)
    model.train()
    losses = model(images, targets)
    assert "loss_mask" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.stages[-1].mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    m = out[0]["masks"]
    assert m.shape == (out[0]["boxes"].shape[0], 1, 64, 64) and 0.0 <= m.min() and m.max() <= 1.0


def test_stateful_loss_keeps_one_state_per_stage():
    model = _model(loss="eqlv2")
    images, targets = _data()
    model.train()
    model(images, targets)
    states = []
    for st in model.roi_heads.stages:
        loss, rec = st.cls_head.loss, st.cls_head.record
        pos_w = torch.ones(C + 1)
        neg_w = torch.sigmoid(torch.full((C + 1,), 12.0 * (100.0 - 0.8)))
        neg_w[C] = 1.0
        pos_w = 1.0 + 4.0 * (1.0 - neg_w)
        pos_w[C] = 1.0
        _, pos_inc, neg_inc = eqlv2_loss(rec.logits.double(), rec.labels, pos_w.double(), neg_w.double(), None)
        torch.testing.assert_close(loss.pos_grad, pos_inc.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss.neg_grad, neg_inc.float(), rtol=1e-5, atol=1e-6)
        states.append(loss.neg_grad.clone())
    assert not torch.equal(states[0], states[1]) and not torch.equal(states[1], states[2])
    sd = model.state_dict()
    for t in range(3):
        assert torch.equal(sd[f"cls_heads.{t}.loss.neg_grad"], states[t])


def test_checkpoint_round_trip(tmp_path):
    from taildet.engine.checkpoint import load_checkpoint, load_model_weights, save_checkpoint

    model = _model(loss="eqlv2")
    images, targets = _data()
    model.train()
    model(images, targets)
    path = save_checkpoint(tmp_path / "model.pth", model=model.state_dict())
    other = build_cascade_rcnn(C, **{**SMALL, "min_size": 64, "max_size": 64}, loss="eqlv2")
    load_model_weights(other, load_checkpoint(path)["model"], str(path))
    for a, b in zip(model.cls_heads, other.cls_heads):
        assert torch.equal(a.loss.pos_neg, b.loss.pos_neg)
    model.eval()
    other.eval()
    with torch.no_grad():
        out_a, out_b = model(images), other(images)
    for a, b in zip(out_a, out_b):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def _loader(images, targets):
    return [(images, targets)]


def test_statistics_pass_writes_one_entry_per_stage(tmp_path):
    model = _model()
    images, targets = _data()
    torch.manual_seed(1)
    norms = collect_stage_statistics(model, _loader(images, targets), progress=False)
    assert list(norms) == STAGES
    # by hand: the same forward in training-time sampling mode (same seed), each stage's record
    from taildet.calibration import training_sampling_mode

    torch.manual_seed(1)
    with training_sampling_mode(model):
        model(images, targets)
    for k, head in classification_heads(model).items():
        z = head.record.logits.double()
        torch.testing.assert_close(norms[k].mean, z.mean(0))
        torch.testing.assert_close(norms[k].variance, z.var(0, unbiased=False))
        assert int(norms[k].count) == z.shape[0]
    assert not torch.allclose(norms["roi_heads.0"].mean, norms["roi_heads.2"].mean)
    path = tmp_path / "stats.json"
    save_normalizers(path, norms)
    assert list(load_normalizers(path)) == STAGES
    with pytest.raises(ConfigError, match="classification stages"):
        from taildet.calibration import collect_logit_statistics

        collect_logit_statistics(model, _loader(images, targets), progress=False)


def _distinct_normalizers():
    out = {}
    g = torch.Generator().manual_seed(3)
    for t, k in enumerate(STAGES):
        n = LogitNormalizer(C)
        n.update(torch.randn(50, C + 1, generator=g) * (1.0 + t) + torch.arange(C + 1.0) * (t - 1))
        n.stage = k
        out[k] = n
    return out


def test_each_stage_is_normalised_with_its_own_statistics_before_the_average(tmp_path):
    model = _model()
    _distinct_stage_biases(model)
    images, _ = _data()
    norms = _distinct_normalizers()
    with pytest.raises(ConfigError, match="one logit transform per stage"):
        apply_logit_normalization(model, norms["roi_heads.0"])
    with pytest.raises(ConfigError, match="missing: roi_heads.2"):
        apply_logit_normalization(model, {k: norms[k] for k in STAGES[:2]})
    path = tmp_path / "stats.json"
    save_normalizers(path, norms)
    apply_calibration(model, path)
    for k, head in classification_heads(model).items():
        torch.testing.assert_close(head.logit_transform.mean, norms[k].mean)
    seen = _spy_scores(model)
    model.eval()
    with torch.no_grad():
        out = model(images)
    rh = model.roi_heads
    z = [st.last_logits for st in rh.stages]
    # by hand: stage t's logits through LogN with stage t's mean / std and beta, then the average
    def logn(n, zt):
        mu, sd = n.mean.float(), n.variance.float().clamp_min(1e-11).sqrt()
        beta = float(n.mean[:C].min())
        return torch.cat([(zt[:, :C] - mu[:C] + beta) / sd[:C], zt[:, C:]], dim=1)

    hand = _softmax_fg(sum(logn(norms[k], zt) for k, zt in zip(STAGES, z)) / 3)
    torch.testing.assert_close(seen[0], hand)
    _check_scores_come_from(out, hand, rh.stages[-1].last_logit_image_index)
    # with the statistics swapped between stages the scores differ
    swapped = _softmax_fg(sum(logn(norms[k], zt) for k, zt in zip(reversed(STAGES), z)) / 3)
    assert (swapped - hand).abs().max() > 1e-2
    apply_logit_normalization(model, None)
    assert all(h.logit_transform is None for h in classification_heads(model).values())


def test_running_statistics_continue_each_stage_batchnorm():
    """LogN's released recipe on a cascade: each stage's BatchNorm on its logits continues its own
    running statistics (EMA by hand from that stage's raw logits); the model is left as it was."""
    from taildet.calibration.stages import collect_stage_running_statistics

    model = _model(logit_bn=True)
    images, targets = _data()
    bns = [h.logit_bn for h in classification_heads(model).values()]
    assert len({id(bn) for bn in bns}) == 3
    with torch.no_grad():  # distinct starting statistics per stage
        for t, bn in enumerate(bns):
            bn.running_mean.fill_(0.5 * t)
            bn.running_var.fill_(1.0 + t)
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    seen = {k: [] for k in STAGES}
    hooks = [st.box_predictor.cls_score.register_forward_hook(
        lambda m, a, out, k=k: seen[k].append(out.detach())) for k, st in zip(STAGES, model.roi_heads.stages)]
    m = 0.1
    try:
        norms = collect_stage_running_statistics(model, [(images, targets)] * 2, momentum=m, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert list(norms) == STAGES
    for (k, z_list), (mean, var) in zip(seen.items(), before):
        assert len(z_list) == 2
        mean, var = mean.double(), var.double()
        for z in z_list:
            mean = (1 - m) * mean + m * z.double().mean(0)
            var = (1 - m) * var + m * z.double().var(0, unbiased=True)
        torch.testing.assert_close(norms[k].mean, mean, rtol=1e-5, atol=1e-6)  # the BatchNorm runs in float32
        torch.testing.assert_close(norms[k].running_var, var, rtol=1e-5, atol=1e-6)
        assert norms[k].momentum == m
    for bn, (mean, var) in zip(bns, before):  # the checkpoint's statistics are untouched
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert not torch.allclose(norms["roi_heads.0"].mean, norms["roi_heads.1"].mean)
    with pytest.raises(ConfigError, match="stage.*roi_heads.0, roi_heads.1, roi_heads.2 have none"):
        collect_stage_running_statistics(_model(), [(images, targets)], progress=False)


def test_config_accepts_the_cascade_and_refuses_decoupled_fine_tunes():
    from taildet.config import apply_overrides, load_config

    cfg = load_config(os.path.join(REPO, "configs", "demo_cascade_tiny_ce.yaml"))
    assert cfg.model.arch == "cascade_rcnn"
    lvis = load_config(os.path.join(REPO, "configs", "lvis_cascade_mask_r50_ce_2x.yaml"))
    assert lvis.model.arch == "cascade_mask_rcnn" and lvis.data.with_masks
    with pytest.raises(ConfigError, match="not supported on a cascade"):
        apply_overrides(cfg, ["model.init_from=x.pth", "model.reset_classifier=true"])
    with pytest.raises(ConfigError, match="train.mfs.enabled.*not supported on a cascade"):
        apply_overrides(cfg, ["train.mfs.enabled=true"])
    with pytest.raises(ConfigError, match="train.freeze.*not supported on a cascade"):
        apply_overrides(cfg, ["model.init_from=x.pth", "train.freeze=classifier_only"])
    # weights to start from, or frozen parts of a run from scratch, are not a decoupled fine-tune
    assert apply_overrides(cfg, ["model.init_from=x.pth"]).model.init_from == "x.pth"
    assert apply_overrides(cfg, ["train.freeze=['^backbone\\.']"]).train.freeze
    assert apply_overrides(cfg, ["model.stage_loss_weights=[1.0, 1.0, 1.0]"]).model.kwargs["stage_loss_weights"]
    released = load_config(os.path.join(REPO, "configs", "lvis_cascade_mask_rcnn_r50_fpn_random_logn_normed_mstrain_2x.yaml"))
    assert released.model.arch == "cascade_mask_rcnn" and released.model.kwargs["logit_bn"]
    assert released.model.kwargs["classifier"] == "cosine"


@pytest.mark.slow
def test_cascade_trains_calibrates_per_stage_and_evaluates(tmp_path):
    """Engine glue: train a few iterations on the embedded data, ``calibrate`` writes one entry per
    stage, evaluation with the file installs every stage's transform."""
    from taildet.config import apply_overrides, load_config
    from taildet.engine import calibrate_checkpoint, evaluate_checkpoint, train

    cfg = load_config(os.path.join(REPO, "configs", "demo_cascade_tiny_ce.yaml"))
    cfg = apply_overrides(cfg, [f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
                                "data.synthetic.scale=0.05", "train.iterations=3", "train.warmup_iters=1",
                                "data.batch_size=2", "train.device=cpu", "eval.max_dets=100"])
    out = train(cfg, progress=False)
    assert 0.0 <= out["metrics"]["bbox"]["AP"] <= 1.0
    ckpt = os.path.join(out["run_dir"], "model_final.pth")
    stats = calibrate_checkpoint(cfg, ckpt, str(tmp_path / "stats.json"), progress=False, max_batches=2)
    assert list(load_normalizers(stats)) == STAGES
    with pytest.raises(ConfigError, match="no BatchNorm on its class logits"):
        calibrate_checkpoint(cfg, ckpt, str(tmp_path / "running.json"), stats="running", progress=False)
    # LogN's released recipe on the cascade: BatchNorm on every stage's logits, running statistics per stage
    normed = apply_overrides(cfg, [f"output_dir={tmp_path / 'normed'}", "model.classifier=cosine", "model.logit_bn=true",
                                   "train.iterations=2"])
    ckpt_n = train(normed, progress=False, evaluate=False)["checkpoint"]
    running = calibrate_checkpoint(normed, ckpt_n, str(tmp_path / "running.json"), stats="running",
                                   running_momentum=0.1, max_batches=1, progress=False)
    assert [n.momentum for n in load_normalizers(running).values()] == [0.1] * 3
    assert list(load_normalizers(running)) == STAGES
    res = evaluate_checkpoint(cfg, ckpt, calibration=stats, out_dir=str(tmp_path / "eval"))
    assert 0.0 <= res["bbox"]["AP"] <= 1.0
    # the compare row cascade_ce+logn: the post-hoc method fitted on every stage from its own entry
    from taildet.compare.posthoc import posthoc_calibration
    from taildet.engine.builders import build_datasets, build_model_for_checkpoint

    calibrate = posthoc_calibration("logn", cfg, ckpt, tmp_path / "posthoc")
    train_set = build_datasets(cfg, need_train=True)[0]
    model = calibrate(build_model_for_checkpoint(cfg, train_set.num_classes, train_set))
    written = load_normalizers(tmp_path / "posthoc" / "logit_stats.json")
    assert list(written) == STAGES
    for k, head in classification_heads(model).items():
        torch.testing.assert_close(head.logit_transform.mean, written[k].mean)
    assert (tmp_path / "posthoc" / "logit_stats.png").exists()
