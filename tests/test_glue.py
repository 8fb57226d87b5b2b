"""Glue: values handed from one component to the next arrive and change the outcome.

Each test here guards one hand-off (engine -> model -> loss -> calibration -> evaluation) that a
plausible one-line bug could break while every unit test of the two sides still passes: the
value is checked where it is used, and the test shows that it changes what comes out.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from taildet.config import apply_overrides, load_config
from taildet.models import build_faster_rcnn
from helpers import SMALL, two_image_batch

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[1]
C = 5
#: non-uniform EBL mean scores [C + 1] (background last): the update order shows in the loss
S0 = [0.6, 0.02, 0.3, 0.001, 0.15, 0.01]


# ----------------------------------------------------------------------------- model -> loss: EBL


def _spy_loss_calls(loss):
    """Record ``mean_score`` each time the loss value is computed."""
    seen = []
    forward = loss.forward

    def spy(*args, **kwargs):
        seen.append(loss.mean_score.clone())
        return forward(*args, **kwargs)

    loss.forward = spy
    return seen


def test_ebl_mean_score_update_comes_before_the_loss_of_the_same_iteration():
    """methods.md section 2: the update of s happens before the loss of the same iteration. From a
    non-uniform s the loss of the iteration is CE(z + log s_new, y), not CE(z + log s_old, y)."""
    torch.manual_seed(0)
    model = build_faster_rcnn(C, loss="ebl", **SMALL)
    loss = model.cls_head.loss
    loss.mean_score.copy_(torch.tensor(S0))
    seen = _spy_loss_calls(loss)
    images, targets = two_image_batch()
    model.train()
    value = model(images, targets)["loss_classifier"].detach()
    s_new = loss.mean_score.clone()
    assert (s_new[[0, 1, 3, 4]] - torch.tensor(S0)[[0, 1, 3, 4]]).abs().min() > 1e-3  # GT classes moved
    assert len(seen) == 1 and torch.equal(seen[0], s_new)  # the loss saw the updated s
    # and its value is the EBL of this iteration's logits with the updated s, not the old one
    sampled = model.roi_heads.last_sampled
    logits, labels = sampled["logits"], sampled["labels"]
    assert float(value) == pytest.approx(float(loss(logits, labels)), rel=1e-6, abs=1e-7)
    loss.mean_score.copy_(torch.tensor(S0))
    old = float(loss(logits, labels))
    assert abs(old - float(value)) > 1e-3 * abs(old)


def test_ebl_with_mfs_updates_mean_score_from_memory_before_the_loss():
    """The MFS path (memory samples drawn, then the mean-score update, then the loss) in the same order."""
    from taildet.engine.finetune import freeze_parameters
    from taildet.sampling import MemoryAugmentedSampling, attach_mfs

    torch.manual_seed(0)
    model = build_faster_rcnn(C, loss="equilibrium", **SMALL)
    freeze_parameters(model, [r"^backbone\.", r"^roi_heads\.box_head\."])
    attach_mfs(model, MemoryAugmentedSampling.from_model(model, capacity=16, seed=0))
    loss = model.cls_head.loss
    loss.mean_score.copy_(torch.tensor(S0))
    seen = _spy_loss_calls(loss)
    images, targets = two_image_batch()
    model.train()
    model(images, targets)
    assert model.roi_heads.mfs.last_batch is not None and model.roi_heads.mfs.last_batch.labels.numel() > 0
    s_new = loss.mean_score.clone()
    assert (s_new[[0, 1, 3, 4]] - torch.tensor(S0)[[0, 1, 3, 4]]).abs().min() > 1e-3
    assert len(seen) == 1 and torch.equal(seen[0], s_new)


# ----------------------------------------------------------------------------- CLI -> calibration -> evaluation


#: ``--opts`` of the tiny runs: the embedded dataset at 5 % scale, CPU
TINY = ["data.synthetic.scale=0.05", "data.batch_size=2", "train.device=cpu", "eval.max_dets=100"]
#: smaller two-stage heads (the presets' options of the R-CNNs)
TINY_RCNN = ["model.box_batch_size_per_image=32", "model.representation_size=64"]


def _opts(root: Path, preset: str = "demo_faster_tiny_ce.yaml", extra=()) -> list[str]:
    """Overrides of a tiny run of ``preset`` under ``root`` (as ``taildet ... --opts`` takes them)."""
    rcnn = TINY_RCNN if "faster" in preset or "mask" in preset else []
    return [f"data.root={root / 'data'}", *TINY, *rcnn, *extra]


def _tiny_cfg(root: Path, name: str, preset: str = "demo_faster_tiny_ce.yaml", extra=()):
    cfg = load_config(REPO / "configs" / preset)
    return apply_overrides(cfg, [f"output_dir={root / name}", *_opts(root, preset, extra)])


def _untrained_checkpoint(cfg, path: Path) -> Path:
    """The model of ``cfg`` as initialised (seeded), saved as a checkpoint; no training needed:
    an untrained softmax head scores every class about 1 / (C + 1), so every class has detections."""
    from taildet.engine.checkpoint import save_checkpoint
    from taildet.engine.builders import build_datasets, build_model_from_cfg, seed_all as _seed_all

    train_set, _, _ = build_datasets(cfg)
    _seed_all(0)
    model = build_model_from_cfg(cfg, train_set.num_classes, train_dataset=train_set)
    save_checkpoint(path, model=model.state_dict(), config=cfg.to_dict())
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    cfg = _tiny_cfg(root, "run")
    ckpt = _untrained_checkpoint(cfg, root / "run" / "model_final.pth")
    return root, cfg, ckpt


def _boost_one_class_file(path: Path, class_names: list[str], k: int, shift: float = 30.0) -> Path:
    """LogN statistics with mean 0, variance 1 and beta 0 (the identity) except class ``k``'s mean
    ``-shift``: the calibrated logit of class ``k`` is ``z_k + shift``, every other one unchanged."""
    from taildet.calibration import LogitNormalizer

    c = len(class_names)
    norm = LogitNormalizer(c, background=True, class_names=class_names, beta=0.0)
    norm.count.fill_(10.0)
    norm.mean[k] = -shift
    norm.m2.fill_(10.0)  # var = m2 / count = 1
    norm.save(path)
    return path


def test_cli_eval_calibration_file_changes_the_detections(tiny_ckpt):
    """``taildet eval --calibration FILE`` applies FILE: a +30 shift on one class's logit makes
    every detection that class (scores ~1), where the raw model spreads them over all classes."""
    from taildet.cli import main
    from taildet.data.lvis import load_lvis

    root, cfg, ckpt = tiny_ckpt
    val = load_lvis(root / "data" / "annotations" / "val.json")
    k = 7
    stats = _boost_one_class_file(root / "boost.json", list(val.class_names), k)
    preset = str(REPO / "configs" / "demo_faster_tiny_ce.yaml")
    raw_dir, cal_dir = root / "eval_raw", root / "eval_cal"
    opts = ["--opts", *_opts(root)]
    assert main(["eval", preset, str(ckpt), *opts, "--output-dir", str(raw_dir)]) == 0
    assert main(["eval", preset, str(ckpt), "--calibration", str(stats), *opts,
                 "--output-dir", str(cal_dir)]) == 0
    raw = json.loads((raw_dir / "results_bbox.json").read_text())
    cal = json.loads((cal_dir / "results_bbox.json").read_text())
    target = val.cat_ids[k]
    assert raw and cal
    raw_share = sum(r["category_id"] == target for r in raw) / len(raw)
    assert raw_share < 0.2  # the raw model: all classes
    assert {r["category_id"] for r in cal} == {target}  # calibrated: only the boosted class
    assert min(r["score"] for r in cal) > 0.9 > max(r["score"] for r in raw)
    # the evaluation scored the calibrated results (LVIS counts a class's detections only on images
    # where the class is annotated or verified absent: far fewer for one class than for all)
    m_raw = json.loads((raw_dir / "metrics.json").read_text())["bbox"]
    m_cal = json.loads((cal_dir / "metrics.json").read_text())["bbox"]
    assert m_raw["num_results"] == len(raw) and m_cal["num_results"] == len(cal)


def _logn_of(norm, z: torch.Tensor, beta: float) -> torch.Tensor:
    """The formula without a background column: ``(z - mu + beta) / sqrt(var + eps)``."""
    mu, var = norm.mean.to(z.dtype), norm.variance.to(z.dtype)
    return (z - mu + beta) / torch.sqrt(var + norm.eps)


@pytest.mark.parametrize("preset, loss, stage", [
    ("demo_faster_tiny_ce.yaml", "sigmoid_bce", "roi_heads"),       # sigmoid RoI head
    ("demo_retinanet_tiny_focal.yaml", "sigmoid_focal", "head"),    # one-stage head
])
def test_calibrate_default_beta_of_sigmoid_heads_is_min_fg(tiny_ckpt, tmp_path, preset, loss, stage):
    """Heads without a background column get beta = min foreground mean by default (the module
    docstring of taildet.calibration.logit_norm: without it every class's average logit would
    become score 0.5); ``--beta`` and ``--mode`` given to ``taildet calibrate`` reach the file."""
    from taildet.calibration import LogitNormalizer
    from taildet.cli import main

    root, _, _ = tiny_ckpt
    cfg = _tiny_cfg(root, f"run_{loss}", preset, [f"model.loss={loss}"])
    ckpt = _untrained_checkpoint(cfg, tmp_path / "model.pth")
    opts = ["--opts", *_opts(root, preset, [f"model.loss={loss}"])]
    path = tmp_path / "stats.json"
    assert main(["calibrate", str(REPO / "configs" / preset), str(ckpt), "--out", str(path),
                 "--max-batches", "2", *opts]) == 0
    doc = json.loads(path.read_text())
    assert doc["stages"][stage]["beta"] == "min_fg" and doc["stages"][stage]["background"] is False
    norm = LogitNormalizer.load(path)
    assert norm.num_outputs == norm.num_classes == 48
    z = torch.randn(7, 48, dtype=torch.float64)
    min_mu = float(norm.mean.min())
    assert min_mu < -1.0  # a sigmoid head's bias prior: the shift matters
    torch.testing.assert_close(norm(z), _logn_of(norm, z, min_mu), rtol=1e-6, atol=1e-6)
    # explicit choices given on the command line arrive in the file and in the transform
    for args, beta, mode in ((["--beta", "none"], "none", "all"), (["--beta", "0.5"], 0.5, "all"),
                             (["--mode", "std_only"], "min_fg", "std_only")):
        assert main(["calibrate", str(REPO / "configs" / preset), str(ckpt), "--out", str(path),
                     "--max-batches", "1", *args, *opts]) == 0
        entry = json.loads(path.read_text())["stages"][stage]
        assert (entry["beta"], entry["mode"]) == (beta, mode)
    norm = LogitNormalizer.load(path)
    torch.testing.assert_close(norm(z), z / torch.sqrt(norm.variance + norm.eps), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- engine -> loss: AMP scale


def _train_capture(cfg, **kw):
    """``train(cfg)`` without evaluation; returns (result, the trained model)."""
    from taildet.engine import train

    seen = {}
    out = train(cfg, progress=False, evaluate=False, hooks=[lambda it, state: seen.update(model=state["model"])],
                **kw)
    return out, seen["model"]


def test_trainer_passes_the_grad_scaler_scale_to_efl(tiny_ckpt, monkeypatch):
    """Under AMP the backward sees gradients multiplied by GradScaler's scale; EFL accumulates the
    TRUE gradient only if the trainer hands it the scale (set_grad_scale) before each backward.
    CPU autocast (bfloat16) with a CPU GradScaler at scale 2^12 runs the trainer's AMP branch:
    EFL's gradient statistics must match the fp32 run's (up to bfloat16 rounding), not be 4096x."""
    from taildet.losses import EqualizedFocalLoss

    engine_train = importlib.import_module("taildet.engine.train")  # the module (taildet.engine.train is the function)

    root, _, _ = tiny_ckpt
    opts = ["train.iterations=2", "train.warmup_iters=1", "data.sampler=random", "train.checkpoint_period=100"]
    stats = {}
    scalers = []

    def cpu_amp(tcfg, device):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
        return True, scalers[-1]

    for amp in (False, True):
        if amp:
            monkeypatch.setattr(engine_train, "amp_setup", cpu_amp)
        cfg = _tiny_cfg(root, f"efl_amp{int(amp)}", "demo_retinanet_tiny_efl.yaml", opts)
        _, model = _train_capture(cfg)
        loss = model.cls_head.loss
        assert isinstance(loss, EqualizedFocalLoss)
        stats[amp] = (loss.pos_grad.clone(), loss.neg_grad.clone(), float(loss.grad_scale))
    (pos0, neg0, scale0), (pos1, neg1, scale1) = stats[False], stats[True]
    assert scale0 == 1.0 and scale1 == float(scalers[0].get_scale()) == 2.0 ** 12
    assert float(pos0.sum()) > 0 and float(neg0.sum()) > 0
    torch.testing.assert_close(pos1.sum(), pos0.sum(), rtol=0.1, atol=0.0)
    torch.testing.assert_close(neg1.sum(), neg0.sum(), rtol=0.1, atol=0.0)


# ----------------------------------------------------------------------------- config -> engine -> sampler / model


@pytest.fixture
def no_training(monkeypatch):
    """``run_training`` replaced by a recorder: what train / finetune hand to the loop, no training."""
    engine_train = importlib.import_module("taildet.engine.train")
    seen = {}

    def record(model, train_set, tcfg, run_dir, **kw):
        seen.update(model=model, train_set=train_set, tcfg=tcfg, run_dir=run_dir, **kw)
        return os.path.join(run_dir, "model_final.pth")

    monkeypatch.setattr(engine_train, "run_training", record)
    return seen


def test_rfs_threshold_auto_from_the_config_repeats_images(tiny_ckpt, no_training):
    """``data.rfs_threshold: auto`` (the RFS demo preset) reaches the sampler as t = 100 / N: images
    of classes seen in fewer than ~100 images repeat. LVIS's t = 0.001 would repeat nothing on the
    embedded set (every class is in more than 0.1 % of its images)."""
    from taildet.data.samplers import RepeatFactorSampler
    from taildet.engine import train

    root, _, _ = tiny_ckpt
    cfg = _tiny_cfg(root, "rfs", "demo_faster_tiny_ce_rfs.yaml")
    assert cfg.data.rfs_threshold == "auto"
    train(cfg, progress=False, evaluate=False)
    sampler, n = no_training["sampler"], len(no_training["train_set"])
    assert isinstance(sampler, RepeatFactorSampler)
    assert sampler.threshold == pytest.approx(100.0 / n)
    counts = np.asarray(no_training["train_set"].image_counts, dtype=np.float64)
    f = counts[counts > 0] / n
    np.testing.assert_allclose(sampler.category_repeat_factors[counts > 0], np.maximum(1.0, np.sqrt((100.0 / n) / f)))
    assert sampler.expected_num_samples > 1.5 * n  # images do repeat
    # the rarest class's images repeat most
    rarest = int(np.argmin(np.where(counts > 0, counts, np.inf)))
    assert sampler.category_repeat_factors[rarest] == sampler.category_repeat_factors.max() > 1.0
    # the explicit LVIS value: no image repeats here
    train(apply_overrides(cfg, ["data.rfs_threshold=0.001"]), progress=False, evaluate=False)
    assert no_training["sampler"].threshold == 0.001
    assert no_training["sampler"].expected_num_samples == n


def _finetune(root: Path, ckpt: Path, preset: str, extra=()):
    from taildet.engine.finetune import finetune

    cfg = _tiny_cfg(root, Path(preset).stem, preset, extra)
    finetune(cfg, str(ckpt), progress=False, evaluate=False)
    return cfg


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_finetune_crt_hands_freeze_sampler_loss_and_schedule_to_the_loop(tiny_ckpt, no_training):
    """cRT preset: only the classifier trains, re-initialised; class-balanced sampling; the
    stage-2 train: schedule (not the stage-1 base's) reaches the loop; everything else keeps stage 1."""
    from taildet.data.samplers import ClassBalancedSampler
    from taildet.engine import load_checkpoint
    from taildet.losses import SoftmaxCrossEntropyLoss

    root, _, ckpt = tiny_ckpt
    cfg = _finetune(root, ckpt, "demo_faster_tiny_crt_ft.yaml")
    model, tcfg = no_training["model"], no_training["tcfg"]
    assert _trainable(model) == {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias"}
    assert isinstance(no_training["sampler"], ClassBalancedSampler)
    assert isinstance(model.cls_head.loss, SoftmaxCrossEntropyLoss)
    assert (tcfg.iterations, tcfg.lr, tcfg.warmup_iters, tcfg.schedule, list(tcfg.steps)) == \
        (400, 0.01, 50, "step", [0.5, 0.833])
    base = load_config(REPO / "configs" / "demo_faster_tiny_ce.yaml")
    assert (base.train.iterations, base.train.lr) == (1500, 0.02)  # stage 1's, not used here
    assert cfg.model.init_from == str(ckpt) or cfg.model.init_from.endswith("model_final.pth")
    stage1 = load_checkpoint(ckpt)["model"]
    state = model.state_dict()
    w = state["roi_heads.box_predictor.cls_score.weight"]
    assert not torch.equal(w, stage1["roi_heads.box_predictor.cls_score.weight"])  # reset
    assert float(w.std()) == pytest.approx(0.01, rel=0.1)
    for key in ("roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_head.fc6.weight"):
        assert torch.equal(state[key], stage1[key]), key


def test_finetune_balanced_sigmoid_gets_the_training_set_frequencies_and_rfs(tiny_ckpt, no_training):
    """Balanced Sigmoid preset: the loss gets f_c = image count / N of the training set, the
    classifier is rebuilt with C outputs and the prior bias, and data.sampler rfs gets the
    auto threshold."""
    from taildet.data.samplers import RepeatFactorSampler
    from taildet.losses import BalancedSigmoidLoss

    root, _, ckpt = tiny_ckpt
    _finetune(root, ckpt, "demo_faster_tiny_bsigmoid_ft.yaml")
    model, train_set = no_training["model"], no_training["train_set"]
    loss = model.cls_head.loss
    assert isinstance(loss, BalancedSigmoidLoss)
    n = len(train_set)
    expected = torch.tensor(train_set.image_counts, dtype=torch.float64) / n
    torch.testing.assert_close(loss.image_frequency.double(), expected.clamp(min=loss.image_frequency.min().item()))
    cls = model.roi_heads.box_predictor.cls_score
    assert cls.out_features == train_set.num_classes
    torch.testing.assert_close(cls.bias, torch.full_like(cls.bias, -np.log((1 - 0.001) / 0.001)))
    sampler = no_training["sampler"]
    assert isinstance(sampler, RepeatFactorSampler) and sampler.threshold == pytest.approx(100.0 / n)
    assert no_training["tcfg"].iterations == 1200 and no_training["tcfg"].lr == 0.02


def test_finetune_loce_hands_loss_kwargs_and_mfs_options_to_the_model(tiny_ckpt, no_training):
    """LOCE preset with changed model.loss_kwargs and train.mfs options: each value arrives
    in the Equilibrium Loss and the memory sampler; LOCE's freeze list holds; the memory is pre-filled."""
    from taildet.losses import EquilibriumLoss

    root, _, ckpt = tiny_ckpt
    _finetune(root, ckpt, "demo_faster_tiny_loce_ft.yaml", [
        "model.loss_kwargs={alpha: 0.8, bg_score: 0.02, init_score: 0.05}", "train.mfs.capacity=24",
        "train.mfs.classes_per_iter=3", "train.mfs.samples_per_class=2", "train.mfs.boxes_per_gt=8",
        "train.mfs.jitter=0.1", "train.mfs.dtype=float32", "train.mfs.prefill_images_per_class=1"])
    model = no_training["model"]
    loss = model.cls_head.loss
    assert isinstance(loss, EquilibriumLoss)
    assert (loss.alpha, loss.bg_score) == (0.8, 0.02)
    assert float(loss.mean_score[-1]) == pytest.approx(0.02)  # the pre-fill's update reset s_C to bg_score
    mfs = model.roi_heads.mfs
    assert (mfs.capacity, mfs.sampler.k, mfs.sampler.m, mfs.boxes_per_gt, mfs.jitter) == (24, 3, 2, 8, 0.1)
    assert mfs.memory.dtype == torch.float32 and mfs.sampler.prior == "mean_score"
    assert 0 < int(mfs.memory.count.sum()) and int(mfs.memory.count.max()) <= 24  # pre-filled
    trainable = _trainable(model)
    assert trainable and not any(n.startswith(("backbone.", "roi_heads.box_head.")) for n in trainable)
    assert "roi_heads.box_predictor.cls_score.weight" in trainable and "rpn.head.conv.0.0.weight" in trainable


def _check_seesaw(model, train_set):
    loss = model.cls_head.loss
    assert (type(loss).__name__, loss.p, loss.q, loss.eps) == ("SeesawLoss", 0.6, 1.5, 0.02)


def _check_eql(model, train_set):
    loss = model.cls_head.loss
    assert (type(loss).__name__, loss.lambda_) == ("EQLLoss", 0.05)
    n = len(train_set)
    torch.testing.assert_close(loss.image_frequency.double(),
                               torch.tensor(train_set.image_counts, dtype=torch.float64) / n)


def _check_eqlv2(model, train_set):
    loss = model.cls_head.loss
    assert (type(loss).__name__, loss.gamma, loss.mu, loss.alpha) == ("EQLv2Loss", 10.0, 0.7, 3.0)


def _check_online_logn(model, train_set):
    loss = model.cls_head.loss
    assert type(loss).__name__ == "OnlineLogNLoss" and type(loss.base).__name__ == "SigmoidBCELoss"
    assert (loss.online.momentum, loss.online.beta) == (0.05, "mean_fg")
    assert model.roi_heads.box_predictor.cls_score.out_features == train_set.num_classes  # sigmoid: C


def _check_atss_prior(model, train_set):
    bias = model.head.cls_logits.bias
    torch.testing.assert_close(bias, torch.full_like(bias, -float(np.log((1 - 0.02) / 0.02))))


def _check_rcnn_options(model, train_set):
    rh = model.roi_heads
    assert rh.fg_bg_sampler.batch_size_per_image == 48 and rh.fg_bg_sampler.positive_fraction == 0.5
    assert rh.box_predictor.cls_score.in_features == 40 and model.cls_head.detections_per_img == 77
    assert model.rpn._pre_nms_top_n["training"] == 123 and model.rpn._post_nms_top_n["training"] == 61


@pytest.mark.parametrize("preset, extra, check", [
    ("demo_faster_tiny_seesaw.yaml", ["model.loss_kwargs={p: 0.6, q: 1.5, eps: 0.02}"], _check_seesaw),
    ("demo_faster_tiny_eql.yaml", ["model.loss_kwargs={lambda_: 0.05}"], _check_eql),
    ("demo_faster_tiny_eqlv2.yaml", ["model.loss_kwargs={gamma: 10.0, mu: 0.7, alpha: 3.0}"], _check_eqlv2),
    ("demo_faster_tiny_online_logn.yaml", ["model.loss_kwargs={base: sigmoid_bce, momentum: 0.05, beta: mean_fg}"],
     _check_online_logn),
    ("demo_atss_tiny_focal.yaml", ["model.loss_kwargs={prior: 0.02}"], _check_atss_prior),
    ("demo_faster_tiny_ce.yaml", ["model.box_batch_size_per_image=48", "model.box_positive_fraction=0.5",
                                  "model.representation_size=40", "model.box_detections_per_img=77",
                                  "model.rpn_pre_nms_top_n_train=123", "model.rpn_post_nms_top_n_train=61"],
     _check_rcnn_options),
], ids=["seesaw", "eql", "eqlv2", "online_logn", "atss_prior", "rcnn_options"])
def test_model_config_keys_and_loss_kwargs_reach_the_model(tiny_ckpt, no_training, preset, extra, check):
    """``model:`` keys and ``model.loss_kwargs`` given in a config (non-default values) arrive in
    the model ``train`` builds; losses built from training-set statistics get this training set's."""
    from taildet.engine import train

    root, _, _ = tiny_ckpt
    train(_tiny_cfg(root, "opts", preset, extra), progress=False, evaluate=False)
    check(no_training["model"], no_training["train_set"])


# ----------------------------------------------------------------------------- calibration -> compare rows


def _scores(path: Path) -> list[tuple]:
    return [(r["image_id"], r["category_id"], round(r["score"], 6)) for r in json.loads(path.read_text())]


def test_compare_posthoc_rows_evaluate_the_calibrated_model(tiny_ckpt):
    """The compare table's LogN / LogA rows are the stage-1 checkpoint WITH the post-hoc method:
    their detections differ from the raw model's; the LogN row's equal ``taildet eval
    --calibration`` with its statistics file; a row's ``posthoc_kwargs`` (mode) reach that file."""
    from taildet.cli import main
    from taildet.compare import RECIPES, _run_posthoc
    from taildet.engine import evaluate_checkpoint

    root, cfg, ckpt = tiny_ckpt
    preset = REPO / "configs" / "demo_faster_tiny_ce.yaml"
    opts = _opts(root) + [f"output_dir={root / 'run'}"]
    evaluate_checkpoint(cfg, str(ckpt), progress=False, out_dir=str(root / "cmp_raw"))
    raw = _scores(root / "cmp_raw" / "results_bbox.json")
    rows = {}
    for name in ("faster_ce+logn", "faster_ce+logn_nobeta", "faster_ce+loga"):
        metrics = _run_posthoc(name, RECIPES[name], preset, opts, str(ckpt), root / "cmp" / name)
        assert 0.0 <= metrics["APpool"] <= 1.0, name  # the row's pooled AP (cross-class ranking)
        rows[name] = _scores(root / "cmp" / name / "results_bbox.json")
        assert rows[name] != raw, name
    assert rows["faster_ce+logn"] != rows["faster_ce+logn_nobeta"]
    modes = {n: json.loads((root / "cmp" / n / "logit_stats.json").read_text())["stages"]["roi_heads"]["mode"]
             for n in ("faster_ce+logn", "faster_ce+logn_nobeta")}
    assert modes == {"faster_ce+logn": "all", "faster_ce+logn_nobeta": "no_beta"}
    stats = root / "cmp" / "faster_ce+logn" / "logit_stats.json"
    assert main(["eval", str(preset), str(ckpt), "--calibration", str(stats), "--opts", *_opts(root),
                 "--output-dir", str(root / "cmp_cli")]) == 0
    assert _scores(root / "cmp_cli" / "results_bbox.json") == rows["faster_ce+logn"]


def test_eval_config_reaches_inference_and_evaluation(tiny_ckpt):
    """``eval.max_dets``, ``eval.score_thresh``, ``eval.fixed`` and ``eval.fixed_dets_per_img`` of the
    config decide what inference keeps and how it is scored (the untrained model proposes far
    more than 100 detections per image)."""
    from collections import Counter

    from taildet.engine import evaluate_checkpoint

    root, _, ckpt = tiny_ckpt

    def run(name, extra):
        cfg = _tiny_cfg(root, "run", extra=extra)
        m = evaluate_checkpoint(cfg, str(ckpt), progress=False, out_dir=str(root / name))["bbox"]
        res = json.loads((root / name / "results_bbox.json").read_text())
        return m, res, max(Counter(r["image_id"] for r in res).values())

    m, res, most = run("ev_cap", ["eval.max_dets=37"])
    assert most == 37 and m["fixed"] is False and m["max_dets"] == 300
    thresh = round(float(np.median([r["score"] for r in res])), 6)
    m, res2, _ = run("ev_thresh", ["eval.max_dets=37", f"eval.score_thresh={thresh}"])
    assert res2 and min(r["score"] for r in res2) >= thresh and len(res2) < len(res)
    m, res, most = run("ev_fixed", ["eval.fixed=true", "eval.fixed_dets_per_img=450"])
    assert m["fixed"] is True and m["max_dets"] is None
    assert 300 < most <= 450  # neither eval.max_dets (100) nor the detector's 300 cap it


# ----------------------------------------------------------------------------- config -> the training loop


def test_train_config_reaches_the_optimizer_and_the_gradient_clip(tiny_ckpt, monkeypatch):
    """``train.lr / momentum / weight_decay / weight_decay_norm`` build the optimizer the loop steps,
    and ``train.grad_clip`` bounds the first update: with a clip of 1e-6 (no momentum history, no
    weight decay) no parameter moves by more than lr * 1e-6, where unclipped ones move by far more."""
    from taildet.engine import train
    from taildet.engine.builders import build_model_from_cfg

    engine_train = importlib.import_module("taildet.engine.train")
    root, _, _ = tiny_ckpt
    built = []

    def spy(model, tcfg):
        built.append(build_optimizer(model, tcfg))
        return built[-1]

    build_optimizer = engine_train.build_optimizer
    monkeypatch.setattr(engine_train, "build_optimizer", spy)
    base = ["train.iterations=1", "train.warmup_iters=0", "train.lr=0.05", "train.checkpoint_period=100",
            "data.sampler=random"]
    cfg = _tiny_cfg(root, "opt", extra=base + ["train.momentum=0.7", "train.weight_decay=0.003",
                                                "train.weight_decay_norm=0.0"])
    train(cfg, progress=False, evaluate=False)
    groups = built[-1].param_groups
    assert [(g["initial_lr"], g["momentum"], g["weight_decay"]) for g in groups] == [(0.05, 0.7, 0.003),
                                                                                      (0.05, 0.7, 0.0)]

    moved = {}
    for clip in ("null", "1.0e-6"):
        cfg = _tiny_cfg(root, f"clip{clip}", extra=base + ["train.weight_decay=0.0", f"train.grad_clip={clip}"])
        torch.manual_seed(0)
        ds = engine_train.build_datasets(cfg)[0]
        model = build_model_from_cfg(cfg, ds.num_classes, train_dataset=ds)
        before = [p.detach().clone() for p in model.parameters()]
        train(cfg, progress=False, evaluate=False, model=model, train_dataset=ds)
        moved[clip] = float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before))))
    assert moved["1.0e-6"] <= 0.05 * 1e-6 * 1.01
    assert moved["null"] > 1e-3


def test_data_config_reaches_the_transforms(tiny_ckpt):
    """``data.flip_prob``, ``data.min_sizes`` and ``data.max_size`` decide what the training and
    validation images and boxes look like (the embedded images are 96 px squares)."""
    engine_train = importlib.import_module("taildet.engine.train")
    root, _, _ = tiny_ckpt

    def first(extra):
        train_set, val_set, _ = engine_train.build_datasets(_tiny_cfg(root, "data", extra=extra))
        torch.manual_seed(0)
        return train_set[0], val_set[0]

    (img0, t0), _ = first(["data.flip_prob=0.0"])
    (img1, t1), _ = first(["data.flip_prob=1.0"])
    w = img0.shape[-1]
    assert w == 96 and torch.equal(img1, img0.flip(-1))
    torch.testing.assert_close(t1["boxes"], torch.stack([w - t0["boxes"][:, 2], t0["boxes"][:, 1],
                                                         w - t0["boxes"][:, 0], t0["boxes"][:, 3]], 1))
    (img2, t2), (vimg2, _) = first(["data.flip_prob=0.0", "data.min_sizes=[48]", "data.max_size=64"])
    assert tuple(img2.shape[-2:]) == (48, 48) and tuple(vimg2.shape[-2:]) == (48, 48)
    torch.testing.assert_close(t2["boxes"], t0["boxes"] / 2)
