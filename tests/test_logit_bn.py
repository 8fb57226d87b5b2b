"""LogN's released recipe: BatchNorm on the RoI classifier's logits (``model.logit_bn``), LogN
statistics from its running statistics (``taildet calibrate --stats running``), the
background-argmax diagnostic, and the new config keys and presets."""

from __future__ import annotations

import json
import os

import pytest
import torch

from taildet.calibration import (
    LogitNormalizer,
    PositiveLogitSample,
    background_argmax_report,
    background_argmax_share,
    collect_running_statistics,
    format_background_argmax_share,
    training_sampling_mode,
)
from taildet.config import apply_overrides, config_from_dict, load_config
from taildet.engine import calibrate_checkpoint, last_checkpoint, load_checkpoint, save_checkpoint, train
from taildet.engine.checkpoint import load_model_weights
from taildet.errors import ConfigError
from taildet.models import build_faster_rcnn
from taildet.models.classifiers import LogitBatchNorm, NormalizedLinear

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(classifier="cosine", momentum=0.1, **kw):
    torch.manual_seed(0)
    return build_faster_rcnn(C, backbone="tiny", min_size=96, max_size=96, representation_size=32,
                             box_batch_size_per_image=32, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                             rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_detections_per_img=20,
                             classifier=classifier, logit_bn=True, logit_bn_momentum=momentum, **kw)


def _batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        xy = torch.randint(0, 50, (2, 2), generator=g).float()
        wh = torch.randint(16, 40, (2, 2), generator=g).float()
        images.append(torch.rand(3, 96, 96, generator=g))
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=95)], 1),
                        "labels": torch.tensor([i % C, (i + 1) % C])})
    return images, targets


class _Boxes(torch.utils.data.Dataset):
    """``n`` fixed 96 px images with 2 boxes each."""

    class_names = [f"class_{i}" for i in range(C)]
    num_classes = C

    def __init__(self, n=6):
        self.items = [(im, t) for s in range(n // 2) for im, t in zip(*_batch(seed=10 + s))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_training_output_is_standardised_per_column_and_eval_output_is_raw(classifier):
    model = _model(classifier)
    pred = model.roi_heads.box_predictor
    assert isinstance(pred.logit_bn, LogitBatchNorm) and pred.logit_bn.num_features == C + 1  # background too
    assert pred.logit_bn.affine is False and pred.logit_bn.eps == 1e-5
    assert not list(pred.logit_bn.parameters())
    x = torch.randn(64, 32) * 3 + 1
    pred.train()
    z, _ = pred(x)
    raw = pred.cls_score(x)
    var = raw.var(0, unbiased=False)
    assert torch.allclose(z.mean(0), torch.zeros(C + 1), atol=1e-5)
    # unit variance up to BatchNorm's eps: var / (var + eps)
    assert torch.allclose(z.var(0, unbiased=False), var / (var + 1e-5), atol=1e-5)
    assert torch.allclose(z.var(0, unbiased=False), torch.ones(C + 1), atol=2e-3)
    pred.eval()
    assert torch.equal(pred(x)[0], raw)
    # the whole detector: the loss sees standardised logits of the sampled RoIs ...
    # (an untrained linear classifier's logits are tiny, var ~ eps: compare with var / (var + eps))
    model.train()
    images, targets = _batch()
    seen = []
    hook = pred.cls_score.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    model(images, targets)
    hook.remove()
    zs, var = model.roi_heads.last_sampled["logits"], seen[0].var(0, unbiased=False)
    assert zs.shape == seen[0].shape
    assert torch.allclose(zs.mean(0), torch.zeros(C + 1), atol=1e-4)
    assert torch.allclose(zs.var(0, unbiased=False), var / (var + 1e-5), atol=1e-4)
    # ... and the LogN statistics pass (norm layers in eval mode) sees raw logits, stats untouched
    before = {k: v.clone() for k, v in pred.logit_bn.state_dict().items()}
    with training_sampling_mode(model):
        model(images, targets)
        zs = model.roi_heads.last_sampled["logits"]
        assert torch.equal(zs, pred.cls_score(model.roi_heads.box_head(
            model.roi_heads.box_roi_pool(model.backbone(model.transform(images)[0].tensors),
                                         model.roi_heads.last_sampled["proposals"],
                                         model.transform(images)[0].image_sizes))))
    for k, v in pred.logit_bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_running_statistics_follow_the_momentum_rule():
    m = 0.1
    pred = _model("linear", momentum=m).roi_heads.box_predictor
    pred.train()
    mean, var = torch.zeros(C + 1, dtype=torch.float64), torch.ones(C + 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(20 + step, 32, generator=g) * (1 + step)
        with torch.no_grad():
            raw = pred.cls_score(x).double()
        pred(x)
        mean = (1 - m) * mean + m * raw.mean(0)
        var = (1 - m) * var + m * raw.var(0, unbiased=True)  # BatchNorm: unbiased batch variance
    bn = pred.logit_bn
    assert torch.allclose(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-7)
    assert torch.allclose(bn.running_var.double(), var, rtol=1e-5, atol=1e-7)
    assert int(bn.num_batches_tracked) == 5
    # a single row is not batch-normalised and does not move the statistics
    before = bn.running_mean.clone()
    z, _ = pred(torch.randn(1, 32))
    assert torch.equal(bn.running_mean, before)
    # the reference's default momentum
    default = build_faster_rcnn(C, backbone="tiny", representation_size=32, logit_bn=True)
    assert default.roi_heads.box_predictor.logit_bn.momentum == 1e-4


def test_no_logit_bn_keeps_the_state_dict_keys():
    plain = build_faster_rcnn(C, backbone="tiny", representation_size=32)
    assert plain.roi_heads.box_predictor.logit_bn is None
    assert not any("logit_bn" in k for k in plain.state_dict())
    with pytest.raises(ConfigError, match="logit_bn_momentum"):
        build_faster_rcnn(C, backbone="tiny", representation_size=32, logit_bn_momentum=0.1)
    with pytest.raises(ConfigError, match="logit_bn_momentum"):
        build_faster_rcnn(C, backbone="tiny", representation_size=32, logit_bn=True, logit_bn_momentum=0.0)


def test_running_statistics_survive_save_and_load(tmp_path):
    model = _model()
    model.train()
    for s in range(3):
        model(*_batch(seed=s))
    sd = model.state_dict()
    assert {"roi_heads.box_predictor.logit_bn.running_mean", "roi_heads.box_predictor.logit_bn.running_var",
            "roi_heads.box_predictor.logit_bn.num_batches_tracked"} <= set(sd)
    assert not torch.equal(sd["roi_heads.box_predictor.logit_bn.running_mean"], torch.zeros(C + 1))
    path = save_checkpoint(str(tmp_path / "ck.pth"), model=sd, iteration=3)
    fresh = _model()
    load_model_weights(fresh, load_checkpoint(path)["model"], path)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(fresh.roi_heads.box_predictor.logit_bn, k),
                           getattr(model.roi_heads.box_predictor.logit_bn, k))


class _Killed(Exception):
    """Raised by the test to stop a training mid-run (a simulated kill before resuming)."""


def _engine_cfg(tmp_path, name):
    return config_from_dict({
        "model": {"arch": "faster_rcnn", "backbone": "tiny", "classifier": "cosine", "logit_bn": True,
                  "logit_bn_momentum": 0.2},
        "data": {"synthetic": {"seed": 0}, "batch_size": 2, "num_workers": 0},
        "train": {"iterations": 5, "lr": 0.01, "warmup_iters": 1, "log_period": 1, "checkpoint_period": 2,
                  "device": "cpu", "seed": 0},
        "eval": {"enabled": False}, "output_dir": str(tmp_path / name)})


def test_running_statistics_survive_resume(tmp_path):
    def run(name, **kw):
        torch.manual_seed(0)
        return train(_engine_cfg(tmp_path, name), progress=False, model=_model(momentum=0.2),
                     train_dataset=_Boxes(), **kw)

    full = run("a")

    def kill(it, state):
        if it == 2:
            raise _Killed()

    with pytest.raises(_Killed):
        run("b", hooks=[kill])
    assert last_checkpoint(str(tmp_path / "b")).endswith("checkpoint_0000002.pth")
    torch.manual_seed(99)
    resumed = train(_engine_cfg(tmp_path, "b"), resume=True, progress=False, model=_model(momentum=0.2),
                    train_dataset=_Boxes())
    a, b = load_checkpoint(full["checkpoint"])["model"], load_checkpoint(resumed["checkpoint"])["model"]
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        key = f"roi_heads.box_predictor.logit_bn.{k}"
        assert torch.equal(a[key], b[key]), key
    assert int(a["roi_heads.box_predictor.logit_bn.num_batches_tracked"]) == 5


# ----------------------------------------------------------------------------- running statistics


def _loader():
    return torch.utils.data.DataLoader(_Boxes(), batch_size=2, collate_fn=lambda b: tuple(zip(*b)))


def test_collect_running_statistics_continues_the_ema_and_leaves_the_model_alone():
    model = _model(momentum=1e-4)
    model.train()
    for s in range(2):
        model(*_batch(seed=s))
    bn = model.roi_heads.box_predictor.logit_bn
    start_mean, start_var = bn.running_mean.double().clone(), bn.running_var.double().clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    seen = []
    hook = model.roi_heads.box_predictor.cls_score.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    m = 0.05
    positives = PositiveLogitSample(C, max_rows=1000)
    norm = collect_running_statistics(model, _loader(), momentum=m, progress=False, positives=positives)
    hook.remove()
    mean, var = start_mean, start_var
    for z in seen:
        mean = (1 - m) * mean + m * z.double().mean(0)
        var = (1 - m) * var + m * z.double().var(0, unbiased=True)
    assert len(seen) == 3
    assert norm.momentum == m and norm.background and norm.beta == "min_fg"
    assert torch.allclose(norm.mean, mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(norm.running_var, var, rtol=1e-5, atol=1e-6)
    assert float(norm.count) == sum(z.shape[0] for z in seen)
    assert positives.rows > 0 and positives.logits.shape[1] == C + 1
    # the model is as before: parameters, buffers (the running statistics too), BN momentum, mode
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert bn.momentum == 1e-4 and not model.training
    # no batch: the checkpoint's statistics as they are
    norm0 = collect_running_statistics(model, _loader(), max_batches=0, progress=False, mode="no_beta")
    assert torch.equal(norm0.mean, start_mean) and torch.equal(norm0.running_var, start_var)
    assert norm0.mode == "no_beta" and norm0.momentum == 5e-5
    with pytest.raises(ConfigError, match="momentum"):
        collect_running_statistics(model, _loader(), momentum=0.1, ema_init="first", progress=False)
    with pytest.raises(ConfigError, match="logit_bn"):
        collect_running_statistics(build_faster_rcnn(C, backbone="tiny", representation_size=32), _loader(),
                                   progress=False)


def _tiny_opts(tmp_path):
    return [f"data.root={tmp_path / 'data'}", "data.synthetic.scale=0.05", "train.iterations=2",
            "train.warmup_iters=1", "data.batch_size=2", "train.device=cpu", "eval.max_dets=20",
            "eval.enabled=false", f"output_dir={tmp_path / 'run'}"]


def test_calibrate_from_running_statistics_equals_the_ema_by_hand(tmp_path, capsys):
    from taildet.cli import main

    cfg_path = os.path.join(REPO, "configs", "demo_faster_tiny_logn_normed.yaml")
    opts = _tiny_opts(tmp_path)
    cfg = apply_overrides(load_config(cfg_path), opts)
    ckpt = train(cfg, progress=False)["checkpoint"]
    sd = load_checkpoint(ckpt)["model"]
    mean = sd["roi_heads.box_predictor.logit_bn.running_mean"].double()
    var = sd["roi_heads.box_predictor.logit_bn.running_var"].double()
    seen = []

    def grab(module, args, out):
        if isinstance(module, NormalizedLinear):  # the RoI classifier: its raw logits
            seen.append(out.detach())

    m = 0.02
    handle = torch.nn.modules.module.register_module_forward_hook(grab)
    try:
        path = calibrate_checkpoint(cfg, ckpt, str(tmp_path / "running.json"), stats="running",
                                    running_momentum=m, max_batches=3, progress=False)
    finally:
        handle.remove()
    assert len(seen) == 3
    for z in seen:
        mean = (1 - m) * mean + m * z.double().mean(0)
        var = (1 - m) * var + m * z.double().var(0, unbiased=True)
    doc = json.load(open(path))
    st = doc["stages"]["roi_heads"]
    assert st["momentum"] == m and st["beta"] == "min_fg"
    assert torch.allclose(torch.tensor(st["mean"], dtype=torch.float64), mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.tensor(st["var"], dtype=torch.float64), var, rtol=1e-5, atol=1e-6)
    assert doc["extra"]["stats"] == "running" and doc["extra"]["running_momentum"] == m
    report = doc["extra"]["background_argmax_share"]
    assert report["positives_sampled"] > 0 and set(report["raw"]) == {"r", "c", "f", "all"}
    assert any(k.startswith("logn (mode all, beta min_fg)") for k in report)
    assert any(k.startswith("logn (mode all, beta none)") for k in report)
    norm = LogitNormalizer.load(path)
    assert norm.momentum == m and norm.beta_value() == pytest.approx(float(mean[:-1].min()), rel=1e-5)

    # the CLI: --stats running prints the diagnostic; misuse is a clear error (exit 2)
    cli_opts = ["--opts", *opts]
    capsys.readouterr()
    assert main(["calibrate", cfg_path, ckpt, "--stats", "running", "--max-batches", "1",
                 "--out", str(tmp_path / "cli.json"), *cli_opts]) == 0
    out = capsys.readouterr().out
    assert "argmax is the background column" in out and "logit statistics:" in out
    assert main(["calibrate", cfg_path, ckpt, "--stats", "running", "--momentum", "0.1", *cli_opts]) == 2
    assert main(["calibrate", cfg_path, ckpt, "--running-momentum", "0.1", *cli_opts]) == 2
    assert "--running-momentum applies" in capsys.readouterr().err
    # a checkpoint without BatchNorm on its logits
    ce_path = os.path.join(REPO, "configs", "demo_faster_tiny_cos_ce.yaml")
    ce_opts = [o if not o.startswith("output_dir=") else f"output_dir={tmp_path / 'ce'}" for o in opts]
    ce_ckpt = train(apply_overrides(load_config(ce_path), ce_opts), progress=False)["checkpoint"]
    assert main(["calibrate", ce_path, ce_ckpt, "--stats", "running", "--opts", *ce_opts]) == 2
    assert "model.logit_bn" in capsys.readouterr().err
    # the default pass works on the logit_bn model too (raw logits, statistics untouched)
    assert main(["calibrate", cfg_path, ckpt, "--max-batches", "1", "--out", str(tmp_path / "pass.json"),
                 *cli_opts]) == 0
    assert json.load(open(tmp_path / "pass.json"))["extra"]["stats"] == "pass"


# ----------------------------------------------------------------------------- the diagnostic


def test_background_argmax_share_on_a_constructed_case():
    groups = ["r", "c", "f"]
    # columns: class 0, class 1, class 2, background
    logits = torch.tensor([
        [5.0, 0.0, 0.0, 1.0],   # r, fg wins
        [0.0, 0.0, 0.0, 9.0],   # r, bg wins
        [0.0, 0.0, 0.0, 9.0],   # c, bg wins
        [0.0, 0.0, 3.0, 1.0],   # f, fg wins
        [0.0, 0.0, 3.0, 2.0],   # f, fg wins
        [0.0, 0.0, 0.0, 9.0],   # background RoI: not counted
    ])
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    out = background_argmax_share(logits, labels, groups)
    assert out["r"] == {"share": 0.5, "positives": 2}
    assert out["c"] == {"share": 1.0, "positives": 1}
    assert out["f"] == {"share": 0.0, "positives": 2}
    assert out["all"] == {"share": 0.4, "positives": 5}
    # a transform that lifts the foreground flips the background rows
    lift = lambda z: torch.cat([z[:, :3] + 10, z[:, 3:]], 1)  # noqa: E731
    assert background_argmax_share(logits, labels, groups, lift)["all"]["share"] == 0.0
    # torchvision's convention: background column 0
    tv = torch.cat([logits[:, 3:], logits[:, :3]], 1)
    assert background_argmax_share(tv, labels, groups, background_index=0) == out
    # sigmoid head (K = C): the implicit background logit 0
    sig = torch.tensor([[-1.0, -2.0, -0.5], [0.5, -2.0, -3.0]])
    s = background_argmax_share(sig, torch.tensor([2, 0]), groups)
    assert s["f"]["share"] == 1.0 and s["r"]["share"] == 0.0 and s["c"] == {"share": None, "positives": 0}
    with pytest.raises(ValueError, match="groups"):
        background_argmax_share(logits, labels, ["r", "x", "f"])


def test_background_argmax_report_with_logn_beta():
    # a CE-like head: background logit large and positive, foreground means negative
    g = torch.Generator().manual_seed(0)
    n = 400
    labels = torch.randint(0, C, (n,), generator=g)
    z = 0.3 * torch.randn(n, C + 1, generator=g)
    z[:, :C] -= 6.0
    z[torch.arange(n), labels] += 4.0   # the right class is 4 higher than the others ...
    z[:, C] += 1.0                      # ... but below the background logit (raw: background always wins)
    # LogN: the right class lands near +1.4 without beta (above the background's 1), near -1 with
    # beta = min fg mean (about -4.7): the background wins again
    norm = LogitNormalizer(C)
    norm.update(z)
    sample = PositiveLogitSample(C, max_rows=300)
    sample.add(z, labels)
    sample.add(z, labels)
    assert sample.rows == 300 and sample.full
    report = background_argmax_report(sample, ["r", "c", "f"], norm, C)
    assert report["positives_sampled"] == 300
    assert report["raw"]["all"]["share"] == 1.0
    with_beta = report["logn (mode all, beta min_fg)"]["all"]["share"]
    no_beta = report["logn (mode all, beta none)"]["all"]["share"]
    assert with_beta > 0.95 and no_beta < 0.3
    text = format_background_argmax_share(report)
    assert "300 positive RoIs" in text and "beta none" in text and "100.0 %" in text


# ----------------------------------------------------------------------------- configs


def test_config_keys_are_validated():
    base = {"data": {"synthetic": {"seed": 0}}, "train": {"iterations": 1}}

    def cfg(model, **extra):
        return config_from_dict({**base, "model": model, **extra}, file="x.yaml")

    c = cfg({"logit_bn": True, "logit_bn_momentum": 5e-4})
    assert c.model.kwargs["logit_bn"] is True and c.model.kwargs["logit_bn_momentum"] == 5e-4
    with pytest.raises(ConfigError, match=r"x.yaml: model.logit_bn: expected true or false"):
        cfg({"logit_bn": "yes"})
    with pytest.raises(ConfigError, match=r"model.logit_bn_momentum: expected a number in \(0, 1\]"):
        cfg({"logit_bn": True, "logit_bn_momentum": 0})
    with pytest.raises(ConfigError, match=r"model.logit_bn_momentum: set model.logit_bn: true"):
        cfg({"logit_bn_momentum": 0.01})
    with pytest.raises(ConfigError, match=r"model.logit_bn: .*two-stage"):
        cfg({"arch": "retinanet", "logit_bn": True})
    with pytest.raises(ConfigError, match=r"train.mfs.enabled: .*logit_bn"):
        cfg({"logit_bn": True}, train={**base["train"], "mfs": {"enabled": True}})
    cfg({"logit_bn": False})  # explicit false is fine


def test_presets():
    cos = load_config(os.path.join(REPO, "configs", "demo_faster_tiny_cos_ce.yaml"))
    ce = load_config(os.path.join(REPO, "configs", "demo_faster_tiny_ce.yaml"))
    assert cos.model.kwargs["classifier"] == "cosine" and cos.model.kwargs["loss"] == "softmax_ce"
    assert {k: v for k, v in cos.model.kwargs.items() if k != "classifier"} == \
           {k: v for k, v in ce.model.kwargs.items() if k != "classifier"}
    assert cos.train == ce.train and cos.data == ce.data
    sig = load_config(os.path.join(REPO, "configs", "demo_faster_tiny_cos_sigmoid.yaml"))
    assert sig.model.kwargs == {**cos.model.kwargs, "loss": "sigmoid_bce"} and sig.data == ce.data
    eql = load_config(os.path.join(REPO, "configs", "demo_faster_tiny_eql.yaml"))
    assert eql.model.kwargs["classifier"] == "cosine" and eql.train == cos.train and eql.data == cos.data
    normed = load_config(os.path.join(REPO, "configs", "demo_faster_tiny_logn_normed.yaml"))
    mk = normed.model.kwargs
    assert mk["classifier"] == "cosine" and mk["logit_bn"] is True and mk["loss"] == "softmax_ce"
    assert mk["box_score_thresh"] == 0.0 and normed.eval.score_thresh == 0.0
    assert normed.train == ce.train
    lvis_cos = load_config(os.path.join(REPO, "configs", "lvis_mask_r50_cos_ce_2x.yaml"))
    lvis_ce = load_config(os.path.join(REPO, "configs", "lvis_mask_r50_ce_2x.yaml"))
    assert lvis_cos.model.kwargs == {**lvis_ce.model.kwargs, "classifier": "cosine"}
    lvis_sig = load_config(os.path.join(REPO, "configs", "lvis_mask_r50_cos_sigmoid_2x.yaml"))
    assert lvis_sig.model.kwargs == {**lvis_cos.model.kwargs, "loss": "sigmoid_bce"}
    for name, sampler in [("lvis_mask_rcnn_r50_fpn_random_logn_normed_mstrain_2x.yaml", "random"),
                          ("lvis_mask_rcnn_r50_fpn_sample1e-3_logn_normed_mstrain_2x.yaml", "rfs")]:
        lv = load_config(os.path.join(REPO, "configs", name))
        assert lv.model.arch == "mask_rcnn" and lv.data.sampler == sampler
        assert lv.model.kwargs["classifier"] == "cosine" and lv.model.kwargs["logit_bn"] is True
        assert lv.model.kwargs["logit_bn_momentum"] == 1e-4 and lv.eval.score_thresh == 0.0
        assert lv.data.min_sizes == [640, 672, 704, 736, 768, 800] and lv.train.epochs == 24
