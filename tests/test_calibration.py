"""LogN statistics and transform, online inverse variant, logit adjustment (no detector involved)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from taildet.calibration import (
    LogitAdjuster,
    LogitNormalizer,
    batch_moments,
    load_normalizers,
    merge_moments,
    save_normalizers,
)
from taildet.errors import DataError
from taildet.losses import SigmoidBCELoss, SoftmaxCrossEntropyLoss
from taildet.losses.online_logn import OnlineLogitNormalization, OnlineLogNLoss

C = 5


def _logits(n=300, k=C + 1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 3.0, k)
    shift = torch.linspace(-4.0, 2.0, k)
    return (torch.randn(n, k, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def _fitted(**kw):
    norm = LogitNormalizer(C, **kw)
    norm.update(_logits(k=norm.num_outputs))
    return norm


# -- exact statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [[300], [1, 299], [100, 100, 100], [7, 0, 50, 243], [150] * 2])
def test_exact_stats_equal_numpy_for_any_batch_split(splits):
    x = _logits()
    norm = LogitNormalizer(C)
    for part in torch.split(x, [s for s in splits if s > 0]):
        norm.update(part)
    norm.update(x[:0])  # empty batch: no-op
    ref = x.double().numpy()
    assert float(norm.count) == 300
    np.testing.assert_allclose(norm.mean.numpy(), ref.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(norm.variance.numpy(), ref.var(0), rtol=1e-12, atol=1e-12)  # population


def test_merge_moments_matches_concatenation_like_a_three_rank_sync():
    x = _logits(n=301)
    parts = [x[:40], x[40:41], x[41:]]
    ranks = []
    for p in parts:  # each "rank" accumulates its shard in several batches
        n = LogitNormalizer(C)
        for q in torch.split(p, 17):
            n.update(q)
        ranks.append(n)
    c, mu, m2 = merge_moments(
        torch.stack([r.count for r in ranks]), torch.stack([r.mean for r in ranks]), torch.stack([r.m2 for r in ranks])
    )
    ref = x.double().numpy()
    assert float(c) == 301
    np.testing.assert_allclose(mu.numpy(), ref.mean(0), atol=1e-12)
    np.testing.assert_allclose((m2 / c).numpy(), ref.var(0), rtol=1e-12)
    # a rank without data changes nothing
    c2, mu2, m22 = merge_moments(torch.tensor([float(c), 0.0]), torch.stack([mu, mu * 0 + 7]), torch.stack([m2, m2 * 0]))
    assert float(c2) == float(c) and torch.equal(mu2, mu) and torch.equal(m22, m2)
    # all empty
    c0, mu0, _ = merge_moments(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3))
    assert float(c0) == 0 and torch.equal(mu0, torch.zeros(3))


def test_batch_moments():
    x = _logits(n=10)
    n, mu, m2 = batch_moments(x)
    assert float(n) == 10
    np.testing.assert_allclose(m2.numpy(), ((x.double() - x.double().mean(0)) ** 2).sum(0).numpy(), rtol=1e-12)


def test_sync_is_a_noop_without_process_group():
    norm = _fitted()
    before = norm.state_dict()
    norm.sync()
    for k, v in norm.state_dict().items():
        assert torch.equal(v, before[k])


def test_ema_mode_equals_hand_computed_ema():
    m = 0.1
    batches = [_logits(n=20, seed=s) for s in range(4)]
    norm = LogitNormalizer(C, momentum=m)
    assert torch.equal(norm.mean, torch.zeros(C + 1)) and torch.equal(norm.variance, torch.ones(C + 1))
    mu, var = np.zeros(C + 1), np.ones(C + 1)
    for b in batches:
        norm.update(b)
        a = b.double().numpy()
        mu = (1 - m) * mu + m * a.mean(0)
        var = (1 - m) * var + m * a.var(0)
    np.testing.assert_allclose(norm.mean.numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(norm.variance.numpy(), var, rtol=1e-12)
    assert "running_var" in norm.state_dict() and "m2" not in norm.state_dict()
    first = LogitNormalizer(C, momentum=m, ema_init="first")
    first.update(batches[0])
    np.testing.assert_allclose(first.variance.numpy(), batches[0].double().numpy().var(0), rtol=1e-12)


def test_nan_and_bad_shapes_are_clear_errors():
    norm = LogitNormalizer(C)
    x = _logits(n=4)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf.*row 2, column 3"):
        norm.update(x)
    assert float(norm.count) == 0  # nothing accumulated
    x[2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        norm.update(x)
    with pytest.raises(ValueError, match=r"expected logits \[N, 6\]"):
        norm.update(torch.zeros(3, C))
    with pytest.raises(RuntimeError, match="no statistics"):
        norm(torch.zeros(3, C + 1))
    with pytest.raises(ValueError):
        LogitNormalizer(C, mode="mean")
    with pytest.raises(ValueError):
        LogitNormalizer(C, beta="max_fg")
    with pytest.raises(ValueError, match="background"):
        LogitNormalizer(C, background=False, beta="bg")


# -- transform -----------------------------------------------------------------------------------


def test_transform_formula_column_by_column_and_background_bit_identical():
    norm = _fitted()
    x = _logits(n=50, seed=3)
    x[0, C], x[1, C], x[2, C] = -0.0, float("nan"), float("-inf")
    y = norm(x)
    assert y.dtype == x.dtype
    assert torch.equal(y[:, C].view(torch.int32), x[:, C].view(torch.int32))  # background bit-identical
    x[:3, C] = 0.0
    mu, var = norm.mean.numpy(), norm.variance.numpy()
    beta = mu[:C].min()
    assert norm.beta_value() == pytest.approx(beta) and beta < 0
    xd = x.double().numpy()
    for c in range(C):
        expect = (xd[:, c] - mu[c] + beta) / math.sqrt(max(var[c], 1e-11))
        np.testing.assert_allclose(y[:, c].double().numpy(), expect, rtol=1e-5, atol=1e-5)
    # in float64 the formula holds to rounding
    y64 = norm(x.double())
    np.testing.assert_allclose(y64[:, :C].numpy(), (xd[:, :C] - mu[:C] + beta) / np.sqrt(var[:C]), rtol=1e-12)


def test_background_index_zero_and_nan_passthrough_in_background():
    norm = LogitNormalizer(C, background_index=0)
    norm.update(_logits())
    x = _logits(n=8, seed=5)
    x[0, 0] = float("-inf")
    y = norm(x)
    assert torch.equal(y[:, 0], x[:, 0])
    assert norm.beta_value() == pytest.approx(float(norm.mean[1:].min()))


def test_identity_with_zero_mean_unit_variance_and_no_beta():
    norm = LogitNormalizer(C, beta="none")
    norm.count.fill_(10.0)
    norm.m2.fill_(10.0)  # var = 1
    x = _logits(n=20)
    assert torch.equal(norm(x), x)
    cls = LogitNormalizer(C, background=False)  # classification form: var + eps, eps tiny
    cls.count.fill_(10.0)
    cls.m2.fill_(10.0)
    torch.testing.assert_close(cls(x[:, :C]), x[:, :C], rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["all", "mean_only", "std_only", "no_beta"])
@pytest.mark.parametrize("beta", ["min_fg", "mean_fg", "bg", "none", 0.75])
def test_ablation_modes_and_betas(mode, beta):
    norm = _fitted(mode=mode, beta=beta)
    x = _logits(n=30, seed=9).double()
    y = norm(x).numpy()
    mu, sd = norm.mean.numpy(), np.sqrt(norm.variance.numpy())
    b = {"min_fg": mu[:C].min(), "mean_fg": mu[:C].mean(), "bg": mu[C], "none": 0.0, 0.75: 0.75}[beta]
    z = x.numpy()[:, :C]
    expect = {
        "all": (z - mu[:C] + b) / sd[:C],
        "mean_only": z - mu[:C] + b,
        "std_only": z / sd[:C],
        "no_beta": (z - mu[:C]) / sd[:C],
    }[mode]
    np.testing.assert_allclose(y[:, :C], expect, rtol=1e-12, atol=1e-12)
    assert np.array_equal(y[:, C], x.numpy()[:, C])


def test_classification_form_without_background():
    norm = LogitNormalizer(C, background=False)
    assert norm.num_outputs == C and norm.beta == "none"
    x = _logits(k=C)
    norm.update(x)
    y = norm(x.double()).numpy()
    a = x.double().numpy()
    np.testing.assert_allclose(y, (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-11), rtol=1e-10)
    det = LogitNormalizer(C, background=False, beta="min_fg")  # sigmoid-detection variant
    det.update(x)
    y = det(x.double()).numpy()
    np.testing.assert_allclose(y, (a - a.mean(0) + a.mean(0).min()) / np.sqrt(a.var(0) + 1e-11), rtol=1e-10)


def test_cache_follows_updates_and_state_dict_loads():
    norm = _fitted()
    x = _logits(n=5, seed=2)
    y1 = norm(x)
    norm.update(_logits(n=50, seed=4) + 3.0)
    y2 = norm(x)
    assert not torch.allclose(y1, y2)
    other = LogitNormalizer(C)
    other.update(_logits(n=300, seed=7))  # same count as _fitted(), different statistics
    assert not torch.allclose(other(x), y1)  # fills the cache
    other.load_state_dict(_fitted().state_dict())
    torch.testing.assert_close(other(x), y1)


def test_eps_change_and_half_precision_near_constant_column():
    logits = _logits(k=C + 1)
    logits[:, 1] = 0.25  # a constant column: variance 0, 1 / sqrt(eps) ~ 3e5 > float16's max
    norm = LogitNormalizer(C)
    norm.update(logits)
    x = _logits(n=5, seed=3)
    first = norm(x)
    norm.eps = 1.0  # picked up although the statistics did not change
    again = norm(x)
    ref = LogitNormalizer(C, eps=1.0)
    ref.update(logits)
    torch.testing.assert_close(again, ref(x))
    assert not torch.allclose(first, again)
    norm.eps = 1e-11
    for dtype in (torch.float16, torch.bfloat16):
        y = norm(x.to(dtype))
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
        torch.testing.assert_close(y, norm(x.to(dtype).float()))


# -- files -----------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    names = [f"cls{i}" for i in range(C)]
    norm = LogitNormalizer(C, class_names=names, mode="mean_only", beta="mean_fg")
    norm.update(_logits())
    path = tmp_path / "stats.json"
    norm.save(path, extra={"checkpoint": "model.pth"})
    doc = json.loads(path.read_text())
    assert doc["stages"]["roi_heads"]["beta"] == "mean_fg" and doc["class_names"] == names
    assert doc["extra"] == {"checkpoint": "model.pth"}
    back = LogitNormalizer.load(path, class_names=names)
    assert back.class_names == names and back.mode == "mean_only" and back.beta == "mean_fg"
    assert torch.equal(back.mean, norm.mean) and torch.equal(back.m2, norm.m2) and torch.equal(back.count, norm.count)
    x = _logits(n=9, seed=1)
    assert torch.equal(back(x), norm(x))
    ema = LogitNormalizer(C, momentum=0.5)
    ema.update(_logits())
    ema.save(tmp_path / "ema.json")
    back = LogitNormalizer.load(tmp_path / "ema.json", num_classes=C)
    assert back.momentum == 0.5 and torch.equal(back.variance, ema.variance)


def test_multi_stage_file(tmp_path):
    stages = {f"roi_heads.{i}": _fitted() for i in range(3)}
    stages["roi_heads.2"].update(_logits(n=10, seed=8))
    save_normalizers(tmp_path / "cascade.json", stages)
    back = load_normalizers(tmp_path / "cascade.json", num_classes=C)
    assert sorted(back) == sorted(stages)
    for k in stages:
        assert torch.equal(back[k].mean, stages[k].mean) and back[k].stage == k
    with pytest.raises(DataError, match="stages"):
        LogitNormalizer.load(tmp_path / "cascade.json")
    assert torch.equal(LogitNormalizer.load(tmp_path / "cascade.json", stage="roi_heads.2").mean, stages["roi_heads.2"].mean)


def test_load_mismatch_errors_name_file_and_class(tmp_path):
    names = ["apple", "bear", "cat", "dog", "egg"]
    norm = LogitNormalizer(C, class_names=names)
    norm.update(_logits())
    path = tmp_path / "s.json"
    norm.save(path)
    with pytest.raises(DataError, match=r"s\.json.*class 2.*'cat' in the file, 'cow' in the model"):
        LogitNormalizer.load(path, class_names=["apple", "bear", "cow", "dog", "egg"])
    with pytest.raises(DataError, match=r"s\.json.*5 classes, the model has 6.*label 5 \('fig'\) exists only in the model"):
        LogitNormalizer.load(path, class_names=names + ["fig"])
    with pytest.raises(DataError, match=r"s\.json.*5 classes, the model has 4"):
        LogitNormalizer.load(path, num_classes=4)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json.*invalid JSON"):
        LogitNormalizer.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="not a taildet statistics file"):
        LogitNormalizer.load(tmp_path / "other.json")


# -- online inverse variant ------------------------------------------------------------------------


def test_online_inverse_formula_and_identity_at_test_time():
    m = 0.2
    online = OnlineLogitNormalization(C, momentum=m)
    x = _logits(n=40, seed=1)
    y = online(x)  # first step: mu = m * mean, var = (1 - m) + m * var_b
    a = x.double().numpy()
    mu = m * a.mean(0)
    var = (1 - m) + m * a.var(0)
    beta = mu[:C].min()
    expect = a[:, :C] * np.sqrt(var[:C]) + mu[:C] - beta
    np.testing.assert_allclose(y[:, :C].double().numpy(), expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[:, C], x[:, C])
    assert int(online.num_updates) == 1
    online.eval()
    assert online(x) is x
    assert int(online.num_updates) == 1
    fresh = OnlineLogitNormalization(C, momentum=m)
    torch.testing.assert_close(fresh.denormalize(x), x)  # starts as the identity


def test_online_logn_loss_wraps_base_loss():
    base = SoftmaxCrossEntropyLoss(C)
    loss = OnlineLogNLoss(SoftmaxCrossEntropyLoss(C), momentum=0.1)
    assert loss.kind == "two_stage" and loss.num_outputs() == C + 1 and loss.has_background
    x = _logits(n=32, seed=2).requires_grad_(True)
    labels = torch.arange(32) % (C + 1)
    loss.update(x.detach(), labels, None)  # steps the statistics once
    out = loss(x, labels)
    assert int(loss.online.num_updates) == 1  # the loss did not step again
    ref = base(loss.online.denormalize(x.detach()), labels)
    torch.testing.assert_close(out.detach(), ref)
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    loss(x, labels)  # next iteration without update(): the forward steps
    assert int(loss.online.num_updates) == 2
    loss.eval()
    torch.testing.assert_close(loss.scores(x.detach()), base.scores(x.detach()))
    torch.testing.assert_close(loss(x, labels), base(x, labels))
    assert {"online.running_mean", "online.running_var", "online.num_updates"} <= set(loss.state_dict())
    sig = OnlineLogNLoss(SigmoidBCELoss(C))
    assert sig.online.background is False and sig.num_outputs() == C
    b = torch.zeros(C)
    sig.init_bias(b)
    assert torch.allclose(b, torch.full((C,), math.log(0.01 / 0.99)))


def test_online_logn_one_stage_statistics_skip_ignored_anchors():
    """One-stage heads mark ignored anchors -1: they are not in the loss, nor in the statistics."""
    from taildet.losses.focal import SigmoidFocalLoss

    loss = OnlineLogNLoss(SigmoidFocalLoss(C), momentum=1.0)
    x = _logits(n=40, seed=4)[:, :C]
    labels = torch.arange(40) % (C + 1)
    labels[::3] = -1
    shifted = x.clone()
    shifted[labels < 0] += 100.0  # ignored anchors' logits must not matter
    loss(shifted.requires_grad_(True), labels)
    kept = x[labels >= 0].double()
    torch.testing.assert_close(loss.online.running_mean.double(), kept.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.online.running_var.double(), kept.var(0, unbiased=False), rtol=1e-5, atol=1e-6)


# -- logit adjustment --------------------------------------------------------------------------------


def test_logit_adjuster_formula_background_unchanged():
    counts = np.array([100, 10, 1, 50, 7])
    adj = LogitAdjuster.from_counts(counts, tau=0.7)
    pi = counts / counts.sum()
    x = _logits(n=12, seed=6).double()
    y = adj(x).numpy()
    np.testing.assert_allclose(y[:, :C], x.numpy()[:, :C] - 0.7 * np.log(pi), rtol=1e-12)
    assert torch.equal(adj(x)[:, C], x[:, C])
    assert torch.equal(adj(x.float())[:, C], x.float()[:, C])
    tv = LogitAdjuster.from_counts(counts, background_index=0)
    y = tv(x).numpy()
    assert np.array_equal(y[:, 0], x.numpy()[:, 0])
    np.testing.assert_allclose(y[:, 1:], x.numpy()[:, 1:] - np.log(pi), rtol=1e-12)
    sig = LogitAdjuster(pi, background=False)
    np.testing.assert_allclose(sig(x[:, :C]).numpy(), x.numpy()[:, :C] - np.log(pi), rtol=1e-12)


def test_logit_adjuster_zero_counts_and_datasets():
    with pytest.raises(DataError, match=r"class 1 \('b'\).*count is 0"):
        LogitAdjuster.from_counts([3, 0, 2], class_names=["a", "b", "c"])
    adj = LogitAdjuster.from_counts([3, 0, 2], smoothing=1.0)
    np.testing.assert_allclose(adj.prior.numpy(), np.array([4, 1, 3]) / 8)
    with pytest.raises(ValueError, match="positive"):
        LogitAdjuster([0.5, 0.0, 0.5])

    class DS:
        path = "train.json"
        class_names = ["a", "b", "c"]
        image_counts = np.array([5, 2, 1])
        instance_counts = np.array([50, 0, 1])

    img = LogitAdjuster.from_dataset(DS(), prior_from="image")
    np.testing.assert_allclose(img.prior.numpy(), np.array([5, 2, 1]) / 8)
    with pytest.raises(DataError, match=r"train\.json \(instance_counts\).*'b'"):
        LogitAdjuster.from_dataset(DS(), prior_from="instance")
    inst = LogitAdjuster.from_dataset(DS(), prior_from="instance", smoothing=0.5)
    np.testing.assert_allclose(inst.prior.numpy(), np.array([50.5, 0.5, 1.5]) / 52.5)


def test_a_calibrator_without_fit_cannot_be_built():
    """Calibrator is abstract: a method that forgets ``fit`` fails at construction, not at use."""
    from taildet.calibration.calibrators import CALIBRATORS, Calibrator

    class NoFit(Calibrator):
        inputs = ()

    with pytest.raises(TypeError, match="fit"):
        NoFit()
    for name, cls in CALIBRATORS.items():       # every registered method defines it
        assert "fit" not in getattr(cls, "__abstractmethods__", set()), name
