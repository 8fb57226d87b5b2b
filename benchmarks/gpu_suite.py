"""Issue 18's GPU suite: training-step cost of every long-tail method at LVIS width, one table.

Every model is built through taildet's config path (``load_config`` + ``apply_overrides`` +
``build_model_from_cfg``; stage 2 by ``init_from_checkpoint`` / ``setup_mfs``); the rows of a group
differ in one thing only -- the classification loss (or MFS on, or the one-stage loss):

* ``mask_rcnn`` (``configs/lvis_mask_r50_ce_2x.yaml``): plain torchvision Mask R-CNN with the same
  parts and weights (taildet CE's reference), taildet CE, and each long-tail loss with the name
  and ``loss_kwargs`` of its LVIS config (the classifier stays linear);
* ``mfs`` (``lvis_mask_r50_loce_ft.yaml`` with softmax CE: ``demo_faster_tiny_mfs_ft.yaml``'s
  setting): the decoupled stage 2 without and with MFS (memory pre-filled by ``setup_mfs``);
* ``atss`` (``lvis_atss_r50_efl_2x.yaml`` and the baselines in its header): focal, EFL, QFL, EQFL;
* ``logn``: per image, inference, the LogN statistics pass, the transform alone, inference with it.

Same seed, weights and inputs for every row of a group; steps interleaved (round-robin, start
rotated each round) after warm-up rounds; ratio = median of the per-round ratios to the reference.
A training step is the trainer's (:func:`training_step`). Random-init backbones with frozen BN
(the configs' pretrained file is not read); lr = the warm-up's first (``lr * warmup_factor``),
which a step's time does not depend on and a random-init model does not diverge with.

    python benchmarks/gpu_suite.py --device cuda --out docs/results/bench_gpu_suite.json
    python benchmarks/gpu_suite.py --cpu-smoke       # the same code paths, tiny, CPU (< 1 min)
    benchmarks/gpu_suite.sh                          # CUDA tests, then the GPU run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import json
import os
import statistics
import sys
import time
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from taildet.calibration import apply_logit_normalization, collect_logit_statistics
from taildet.config import apply_overrides, load_config
from taildet.engine.builders import build_model_from_cfg, build_optimizer, seed_all
from taildet.engine.stage2 import CLASSIFIER_PATTERNS, init_from_checkpoint, setup_mfs
from taildet.engine.train import amp_setup, frozen_norm_modules
from taildet.fileio import atomic_write_text
from taildet.losses.base import ClassificationLoss
from taildet.results_docs_gpu import format_gpu_suite_text
from taildet.utils.host_sync import deferred_checks
from taildet.utils.machine import machine_info

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from calibration import trained_like_head  # noqa: E402  (a trained detector's logit spread)
from train_step import sync  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("mask_rcnn", "mfs", "atss", "logn")
GROUP_CONFIGS = {"mask_rcnn": "lvis_mask_r50_ce_2x.yaml", "mfs": "lvis_mask_r50_loce_ft.yaml",
                 "atss": "lvis_atss_r50_efl_2x.yaml", "logn": "lvis_mask_r50_ce_2x.yaml"}


#: A row, judged against row ``reference`` (``goal``: the largest ratio). Its loss: ``loss_config``'s
#: ``model.loss`` / ``loss_kwargs``, else ``loss_name`` without kwargs, else the group config's; the
#: model must hold a ``loss_class``; ``state``: a loss buffer (path in it) the steps must change.
Row = namedtuple("Row", "key label group reference goal loss_config loss_name loss_class state goal_source",
                 defaults=(None, None, None, None, None, None, "issue 18"))


_CALIB = "benchmarks/calibration.py"
ROWS = [
    Row("torchvision", "torchvision Mask R-CNN", "mask_rcnn"),
    Row("ce", "taildet CE", "mask_rcnn", "torchvision", 1.03, loss_class="SoftmaxCrossEntropyLoss"),
    Row("bsoftmax", "Balanced Softmax", "mask_rcnn", "ce", 1.02, "lvis_mask_r50_bsoftmax_ft.yaml", None, "BalancedSoftmaxLoss"),
    Row("bsigmoid", "Balanced Sigmoid", "mask_rcnn", "ce", 1.02, "lvis_mask_r50_bsigmoid_ft.yaml", None, "BalancedSigmoidLoss"),
    Row("ebl", "EBL + update", "mask_rcnn", "ce", 1.05, "lvis_mask_r50_ebl_ft.yaml", None, "EquilibriumLoss",
        "tracker.mean_score"),
    Row("eql", "EQL", "mask_rcnn", "ce", 1.02, "lvis_mask_r50_eql_2x.yaml", None, "EQLLoss"),
    Row("eqlv2", "EQLv2", "mask_rcnn", "ce", 1.05, "lvis_mask_r50_eqlv2_2x.yaml", None, "EQLv2Loss", "pos_grad"),
    Row("seesaw", "Seesaw", "mask_rcnn", "ce", 1.02, "lvis_mask_r50_seesaw_2x.yaml", None, "SeesawLoss", "cum_samples"),
    Row("fed", "federated", "mask_rcnn", "ce", 1.02, "lvis_mask_r50_fed_2x.yaml", None, "FederatedLoss"),
    Row("ce_ft", "CE, stage 2 (LOCE freeze)", "mfs", loss_class="SoftmaxCrossEntropyLoss"),
    Row("mfs", "CE + MFS, stage 2", "mfs", "ce_ft", 1.10, loss_class="SoftmaxCrossEntropyLoss"),
    Row("focal", "ATSS focal", "atss", loss_name="sigmoid_focal", loss_class="SigmoidFocalLoss"),
    Row("efl", "ATSS EFL", "atss", "focal", 1.02, loss_class="EqualizedFocalLoss", state="pos_grad"),
    Row("qfl", "ATSS QFL", "atss", loss_name="quality_focal", loss_class="QualityFocalLoss"),
    Row("eqfl", "ATSS EQFL", "atss", "qfl", 1.02, None, "equalized_quality_focal", "EqualizedQualityFocalLoss", "pos_grad"),
    Row("infer", "inference", "logn"),
    Row("logn_stats", "LogN statistics pass", "logn", "infer", 1.30, goal_source=_CALIB),
    Row("logn_transform", "LogN transform alone", "logn", "infer", 0.01, goal_source=_CALIB),
    Row("logn_infer", "inference + LogN transform", "logn", "infer"),
]


#: Sizes and rounds of one run (``mode``: ``"gpu"`` or ``"cpu-smoke"``, not judged); the ints as
#: :data:`GPU_DEFAULTS` names them; ``device`` a ``torch.device``; ``progress`` a tqdm bar or not.
Settings = namedtuple("Settings", "mode device progress classes images size rois gts batches warmup rounds "
                                  "prefill_per_image")
GPU_DEFAULTS = dict(classes=1203, images=2, size=800, rois=512, gts=8, batches=2, warmup=5, rounds=20, prefill_per_image=40)
SMOKE_DEFAULTS = dict(classes=20, images=2, size=64, rois=32, gts=3, batches=2, warmup=1, rounds=2, prefill_per_image=4)


def group_config(s: Settings, group: str, *extra: str):
    """A group's config (:data:`GROUP_CONFIGS`) at the sizes of ``s``, nothing read from disk but
    the YAML: random init (frozen BN on the GPU; the smoke run's tiny backbone with the RPN / head
    sizes of ``demo_faster_tiny_ce.yaml`` / ``demo_atss_tiny_focal.yaml``), in-memory data."""
    o = ["model.backbone_weights=null", "model.init_from=null", "data.num_workers=0", f"model.min_size={s.size}"]
    if s.mode == "gpu":
        o.append("model.norm=frozen_bn")
    else:
        o += ["model.backbone=tiny", "model.norm=bn", f"model.max_size={s.size}"] + (
            ["model.backbone_kwargs={}", "model.anchor_scales=[2, 4]"] if group == "atss" else
            ["model.representation_size=256"] + [f"model.rpn_{k}_nms_top_n_{m}={n}" for k, n in
                                                 (("pre", 600), ("post", 300)) for m in ("train", "test")])
    if group != "atss":
        o.append(f"model.box_batch_size_per_image={s.rois}")
    if group == "mfs":
        o += ["model.loss=softmax_ce", "model.loss_kwargs={}"]
    return apply_overrides(load_config(str(CONFIGS / GROUP_CONFIGS[group])), o + list(extra))


# ---------------------------------------------------------------------------------------- inputs


def long_tail_statistics(num_classes: int, num_images: int = 100_000) -> SimpleNamespace:
    """The losses' training-set statistics from a synthetic LVIS-like law (class 0 the most
    frequent, every class > 0): ``instance_counts`` ``[C]`` = max(1, round(2e5 / rank^1.5)),
    ``image_counts`` ``[C]`` = max(1, round(instances / 2.5)), ``image_frequency`` = images / ``num_images``."""
    rank = np.arange(1, num_classes + 1, dtype=np.float64)
    instances = np.maximum(np.round(2e5 / rank**1.5), 1.0)
    images = np.minimum(np.maximum(np.round(instances / 2.5), 1.0), num_images)
    return SimpleNamespace(instance_counts=instances, image_counts=images, image_frequency=images / num_images)


def _objects(labels: torch.Tensor, size: int, gen: torch.Generator) -> dict:
    """Boxes ``[n, 4]`` (10-40 % of the side) of one ``size`` px image for GTs of ``labels`` ``[n]``."""
    xy = torch.rand(labels.numel(), 2, generator=gen) * size * 0.6
    wh = torch.rand(labels.numel(), 2, generator=gen) * size * 0.3 + size * 0.1
    return {"boxes": torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1), "labels": labels}


def _with_masks(target: dict, size: int) -> dict:
    """``target`` plus rectangular instance masks ``[n, size, size]`` uint8 filling its boxes."""
    masks = torch.zeros(len(target["boxes"]), size, size, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(target["boxes"].round().long().tolist()):
        masks[i, y1:y2 + 1, x1:x2 + 1] = 1
    return {**target, "masks": masks}


def make_batches(s: Settings, stats: SimpleNamespace, seed: int = 0) -> list[tuple[list, list]]:
    """``s.batches`` batches (on ``s.device``) of ``s.images`` random ``[3, size, size]`` images with
    ``s.gts`` GTs each, labels drawn ~ instance counts (LVIS-like class ids)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.as_tensor(stats.instance_counts / stats.instance_counts.sum())

    def target() -> dict:
        t = _with_masks(_objects(torch.multinomial(p, s.gts, replacement=True, generator=gen), s.size, gen), s.size)
        return {k: v.to(s.device) for k, v in t.items()}
    return [([torch.rand(3, s.size, s.size, generator=gen).to(s.device) for _ in range(s.images)],
             [target() for _ in range(s.images)]) for _ in range(s.batches)]


class PrefillSet(torch.utils.data.Dataset):
    """The MFS pre-fill's training set: every class a GT of exactly one image, ``per_image``
    classes per image (``labels_per_image``, as :class:`taildet.data.LVISDataset` has); masks made on load."""

    def __init__(self, num_classes: int, size: int, per_image: int, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(num_classes, generator=gen)
        self.items = [_objects(order[i:i + per_image], size, gen) for i in range(0, num_classes, per_image)]
        self.size, self.seed = size, seed
        self.labels_per_image = [sorted(t["labels"].tolist()) for t in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        image = torch.rand(3, self.size, self.size, generator=torch.Generator().manual_seed(self.seed + i))
        return image, _with_masks({k: v.clone() for k, v in self.items[i].items()}, self.size)


# ---------------------------------------------------------------------------------------- models


def loss_modules(model: torch.nn.Module) -> list[ClassificationLoss]:
    """Every classification loss of ``model`` (those ``run_training`` gives ``before_backward``)."""
    return [m for m in model.modules() if isinstance(m, ClassificationLoss)]


def share_weights(dst: torch.nn.Module, src: torch.nn.Module) -> int:
    """Copy ``src``'s parameters and buffers into ``dst`` where name and shape agree, except loss
    state and the classifier bias (the loss's own ``init_bias``). Returns the tensors copied."""
    skip = tuple(n + "." for n, m in dst.named_modules() if isinstance(m, ClassificationLoss) and n)
    bias = [p.replace("\\.", ".").lstrip("^") + "bias" for p in CLASSIFIER_PATTERNS]
    own = dst.state_dict()
    keep = {k: v for k, v in src.state_dict().items()
            if k in own and own[k].shape == v.shape and not k.startswith(skip) and k not in bias}
    dst.load_state_dict(keep, strict=False)
    return len(keep)


def plain_maskrcnn_twin(model: torch.nn.Module, num_classes: int) -> MaskRCNN:
    """A stock torchvision ``MaskRCNN`` with ``model``'s parts, settings and weights (predictors
    with torchvision's background-first ``C + 1`` outputs, taildet's rows copied in)."""
    rh, rpn, tr, conv = model.roi_heads, model.rpn, model.transform, model.roi_heads.mask_predictor.conv5_mask
    tv = MaskRCNN(
        copy.deepcopy(model.backbone), num_classes=None, min_size=tr.min_size, max_size=tr.max_size,
        rpn_anchor_generator=copy.deepcopy(rpn.anchor_generator), rpn_head=copy.deepcopy(rpn.head),
        rpn_pre_nms_top_n_train=rpn._pre_nms_top_n["training"], rpn_pre_nms_top_n_test=rpn._pre_nms_top_n["testing"],
        rpn_post_nms_top_n_train=rpn._post_nms_top_n["training"],
        rpn_post_nms_top_n_test=rpn._post_nms_top_n["testing"], rpn_nms_thresh=rpn.nms_thresh,
        rpn_batch_size_per_image=rpn.fg_bg_sampler.batch_size_per_image,
        rpn_positive_fraction=rpn.fg_bg_sampler.positive_fraction,
        box_roi_pool=copy.deepcopy(rh.box_roi_pool), box_head=copy.deepcopy(rh.box_head),
        box_predictor=FastRCNNPredictor(rh.box_head.fc7.out_features, num_classes + 1),
        box_score_thresh=rh.score_thresh, box_nms_thresh=rh.nms_thresh,
        box_detections_per_img=model.cls_head.detections_per_img,
        box_batch_size_per_image=rh.fg_bg_sampler.batch_size_per_image,
        box_positive_fraction=rh.fg_bg_sampler.positive_fraction,
        mask_roi_pool=copy.deepcopy(rh.mask_roi_pool), mask_head=copy.deepcopy(rh.mask_head),
        mask_predictor=MaskRCNNPredictor(conv.in_channels, conv.out_channels, num_classes + 1))
    src, dst = rh.box_predictor, tv.roi_heads.box_predictor
    m_src, m_dst = rh.mask_predictor.mask_fcn_logits, tv.roi_heads.mask_predictor.mask_fcn_logits
    with torch.no_grad():  # taildet: background last, no background box / mask; torchvision: first
        dst.cls_score.weight.copy_(src.cls_score.weight.roll(1, 0))
        dst.cls_score.bias.copy_(src.cls_score.bias.roll(1, 0))
        for a, b, skip in ((dst.bbox_pred, src.bbox_pred, 4), (m_dst, m_src, 1)):
            a.weight.zero_()[skip:] = b.weight
            a.bias.zero_()[skip:] = b.bias
        tv.roi_heads.mask_predictor.conv5_mask.load_state_dict(conv.state_dict())
    return tv


def build_row_model(cfg, row: Row, s: Settings, stats, ref: torch.nn.Module | None) -> torch.nn.Module:
    """The row's taildet model from ``cfg`` with the row's loss, seeded, ``ref``'s weights, stage 2
    (``train.freeze``) applied, on ``s.device``."""
    loss = kwargs = None
    if row.loss_config is not None:
        src = load_config(str(CONFIGS / row.loss_config)).model.kwargs
        loss, kwargs = src["loss"], dict(src.get("loss_kwargs") or {})
    elif row.loss_name is not None:
        loss, kwargs = row.loss_name, {}
    seed_all(cfg.train.seed)
    model = build_model_from_cfg(cfg, s.classes, loss=loss, loss_kwargs=kwargs, train_dataset=stats)
    if ref is not None:
        share_weights(model, ref)
    init_from_checkpoint(cfg, model, None, False)  # train.freeze of a stage 2; nothing for stage 1
    return model.to(s.device)


#: One training row: model, optimizer, GradScaler as ``run_training`` builds them, the config's
#: ``grad_clip``, the loss modules, ``to_targets`` (suite targets, labels ``0..C-1`` -> the model's).
Trainee = namedtuple("Trainee", "model optimizer scaler use_amp grad_clip losses to_targets")


def make_trainee(model: torch.nn.Module, cfg, s: Settings, to_targets=None) -> Trainee:
    tcfg = dataclasses.replace(cfg.train, lr=cfg.train.lr * cfg.train.warmup_factor)
    use_amp, scaler = amp_setup(tcfg, s.device)
    model.train()
    for m in frozen_norm_modules(model):
        m.eval()
    return Trainee(model, build_optimizer(model, tcfg), scaler, use_amp, tcfg.grad_clip, loss_modules(model),
                   to_targets or (lambda t: t))


def training_step(t: Trainee, images: list, targets: list) -> None:
    """One iteration as the trainer runs it: deferred input checks, autocast forward, one host read
    (queued checks + finite total), ``zero_grad``, each loss's ``before_backward(scale)``, scaled
    backward, gradient clipping when the config asks (ATSS), ``scaler.step``, ``scaler.update``."""
    with deferred_checks() as checks:
        with torch.autocast(device_type=images[0].device.type, enabled=t.use_amp):
            loss_dict = t.model(images, t.to_targets(targets))
        total = sum(loss_dict.values())
        if not checks.verify(finite=[total]):
            raise FloatingPointError(f"non-finite loss: { {k: float(v) for k, v in loss_dict.items()} }")
        t.optimizer.zero_grad(set_to_none=True)
        grad_scale = t.scaler.get_scale() if t.use_amp else 1.0
        for loss in t.losses:
            loss.before_backward(grad_scale)
        t.scaler.scale(total).backward()
        if t.grad_clip is not None:
            t.scaler.unscale_(t.optimizer)
            norm = torch.nn.utils.clip_grad_norm_([p for p in t.model.parameters() if p.requires_grad], t.grad_clip)
            if not t.use_amp and not bool(torch.isfinite(norm)):
                raise FloatingPointError("non-finite gradient norm")
        t.scaler.step(t.optimizer)
        t.scaler.update()


# ---------------------------------------------------------------------------------------- timing


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds of ``fn()``, with the device synchronised before and after (CUDA)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleave(steps: dict[str, Callable[[int], float]], s: Settings, bar) -> dict[str, list[float]]:
    """``s.warmup + s.rounds`` rounds; in round ``r`` every row runs once (``steps[key](r)`` returns
    its seconds), starting with row ``r mod rows``. Returns the timed rounds' ms per row."""
    keys = list(steps)
    out: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(s.warmup + s.rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            ms = 1e3 * steps[k](r)
            if r >= s.warmup:
                out[k].append(ms)
            bar.update(1)
    return out


def details(model: torch.nn.Module, row: Row, before: torch.Tensor | None) -> dict:
    """Glue facts of a trained row: its loss's class, whether its state buffer moved, MFS memory."""
    head = getattr(model, "cls_head", None)
    out: dict = {"loss_class": None if head is None else type(head.loss).__name__, "expected_loss_class": row.loss_class}
    if before is not None:
        after = head.loss.get_buffer(row.state)
        out["state"] = {"buffer": row.state, "changed": not torch.equal(before.to(after.device), after)}
    mfs = getattr(getattr(model, "roi_heads", None), "mfs", None)
    if mfs is not None:
        out["mfs"] = {"entries": len(mfs.memory), "classes_filled": int((mfs.memory.count > 0).sum()),
                      "last_sampled": 0 if mfs.last_batch is None else int(mfs.last_batch.labels.numel())}
    return out


def run_training_group(group: str, s: Settings, stats, batches, bar, keep: dict | None) -> list[dict]:
    """Build the group's rows (the first built is the others' weight source) and time them."""
    rows = [r for r in ROWS if r.group == group]
    base, models, trainees = group_config(s, group), {}, {}
    strip = (lambda ts: [{"boxes": t["boxes"], "labels": t["labels"]} for t in ts]) if group == "atss" else None
    for row in (r for r in rows if r.key != "torchvision"):
        cfg = group_config(s, group, "train.mfs.enabled=false") if row.key == "ce_ft" else base
        model = models[row.key] = build_row_model(cfg, row, s, stats, next(iter(models.values()), None))
        if cfg.train.mfs.enabled:
            setup_mfs(cfg, model, PrefillSet(s.classes, s.size, s.prefill_per_image, seed=cfg.train.seed + 1),
                      s.device, None, cfg.train.seed, progress=False)
        trainees[row.key] = make_trainee(model, cfg, s, strip)
    if group == "mask_rcnn":
        models["torchvision"] = plain_maskrcnn_twin(models["ce"], s.classes).to(s.device)
        trainees["torchvision"] = make_trainee(models["torchvision"], base, s,
                                               lambda ts: [{**t, "labels": t["labels"] + 1} for t in ts])
    before = {r.key: None if r.state is None else models[r.key].cls_head.loss.get_buffer(r.state).clone()
              for r in rows}
    steps = {r.key: (lambda t: lambda i: timed(s.device, lambda: training_step(t, *batches[i % len(batches)])))(
        trainees[r.key]) for r in rows}
    times = interleave(steps, s, bar)
    if keep is not None:
        keep.update(models)
    return [dict(row=r, samples=times[r.key], unit="ms/step", details=details(models[r.key], r, before[r.key]))
            for r in rows]


def run_logn_group(s: Settings, batches, bar, keep: dict | None) -> list[dict]:
    """Per image, on the CE model (classifier re-initialised to a trained detector's logit spread;
    fp32, as ``taildet eval`` / ``calibrate`` run): inference; the LogN statistics pass; the
    transform alone on each batch's raw RoI logits; inference with the transform installed (end
    to end, so also what the new scores change downstream: detections per image recorded)."""
    model = build_row_model(group_config(s, "logn"), next(r for r in ROWS if r.key == "ce"), s, None, None)
    trained_like_head(model, s.classes)
    norm = collect_logit_statistics(model, batches[:1], device=s.device, progress=False)
    model.eval()
    dets = {}
    with torch.no_grad():
        for name, transform in (("logn_infer", norm), ("infer", None)):  # raw: the RoI logits before any
            apply_logit_normalization(model, transform)                  # transform, [R, C + 1] per batch
            out, raw = [], []
            for images, _ in batches:
                out += model(images)
                raw.append(model.roi_heads.last_logits)
            dets[name] = {"detections_per_image": sum(len(d["labels"]) for d in out) / len(out)}

    def infer(r: int, transform=None) -> float:
        apply_logit_normalization(model, transform)
        try:
            with torch.no_grad():
                return timed(s.device, lambda: model(batches[r % len(batches)][0])) / s.images
        finally:
            apply_logit_normalization(model, None)

    def logit_transform(r: int) -> float:
        with torch.no_grad():
            return timed(s.device, lambda: norm(raw[r % len(raw)])) / s.images

    def stats_pass(r: int) -> float:
        return timed(s.device, lambda: collect_logit_statistics(model, [batches[r % len(batches)]], device=s.device,
                                                                progress=False)) / s.images

    times = interleave({"infer": infer, "logn_stats": stats_pass, "logn_transform": logit_transform,
                        "logn_infer": lambda r: infer(r, norm)}, s, bar)
    if keep is not None:
        keep["logn"] = model
    info = {**dets, "logn_stats": {"statistics_rows": int(norm.count)},
            "logn_transform": {"logit_rows": int(raw[0].shape[0]), "logit_columns": int(raw[0].shape[1])}}
    return [dict(row=r, samples=times[r.key], unit="ms/image", details=info[r.key]) for r in ROWS if r.group == "logn"]


# ---------------------------------------------------------------------------------------- summary


def judge(results: list[dict], s: Settings) -> list[dict]:
    """JSON rows: samples, median, ratio to the reference (median of per-round ratios), goal,
    verdict (PASS / MISS on a GPU run; ``smoke: not judged`` otherwise; ``-`` without a goal)."""
    by_key = {r["row"].key: r for r in results}
    out = []
    for res in results:
        row, samples, ref = res["row"], res["samples"], by_key.get(res["row"].reference)
        ratio = None if ref is None else statistics.median(a / b for a, b in zip(samples, ref["samples"]))
        verdict = ("smoke: not judged" if s.mode != "gpu" else "-" if row.goal is None or ratio is None
                   else "PASS" if ratio <= row.goal else "MISS")
        out.append({"key": row.key, "group": row.group, "label": row.label, "unit": res["unit"],
                    "config": row.loss_config or GROUP_CONFIGS[row.group], "samples_ms": samples,
                    "median_ms": statistics.median(samples), "reference": row.reference,
                    "reference_label": None if ref is None else ref["row"].label, "ratio": ratio, "goal": row.goal,
                    "goal_source": row.goal_source if row.goal else None, "verdict": verdict, **res["details"]})
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (CI): same code, not judged")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else the CPU smoke run), cuda, cpu")
    p.add_argument("--out", default=None, help="write the JSON summary here (docs: docs/results/bench_gpu_suite.json)")
    p.add_argument("--groups", default=",".join(GROUPS), help=f"subset of {','.join(GROUPS)}")
    p.add_argument("--no-progress", action="store_true")
    for k in GPU_DEFAULTS:
        p.add_argument("--" + k.replace("_", "-"), type=int, help=f"default {GPU_DEFAULTS[k]} (smoke {SMOKE_DEFAULTS[k]})")
    return p.parse_args(argv)


def settings_from_args(a: argparse.Namespace) -> Settings:
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: --device cuda, but CUDA is not available")
    smoke = a.cpu_smoke or a.device == "cpu" or (a.device == "auto" and not torch.cuda.is_available())
    if smoke and not a.cpu_smoke:
        print("gpu_suite: no CUDA device: the CPU smoke run (--cpu-smoke)")
    sizes = {k: v if getattr(a, k) is None else getattr(a, k) for k, v in (SMOKE_DEFAULTS if smoke else GPU_DEFAULTS).items()}
    device = torch.device("cpu") if smoke else torch.device("cuda", torch.cuda.current_device())
    return Settings("cpu-smoke" if smoke else "gpu", device, not a.no_progress, **sizes)


def run(argv: list[str] | None = None, keep_models: bool = False) -> dict:
    """Run the suite (``argv`` as on the command line), print the table, write ``--out``. Returns
    the summary, plus ``"models"`` (row key -> model, on the device) with ``keep_models``."""
    from tqdm import tqdm  # optional: tqdm, imported on use (progress bar)

    a = parse_args(argv)
    s = settings_from_args(a)
    groups = [g for g in a.groups.split(",") if g]
    if set(groups) - set(GROUPS):
        raise SystemExit(f"gpu_suite: --groups: unknown {sorted(set(groups) - set(GROUPS))}")
    t0, stats = time.perf_counter(), long_tail_statistics(s.classes)
    batches = make_batches(s, stats)
    keep, results = ({} if keep_models else None), []
    total = sum(r.group in groups for r in ROWS) * (s.warmup + s.rounds)
    with tqdm(total=total, desc="gpu suite", unit="step", disable=not s.progress, dynamic_ncols=True) as bar:
        for g in groups:
            bar.set_postfix(group=g)
            results += (run_logn_group(s, batches, bar, keep) if g == "logn"
                        else run_training_group(g, s, stats, batches, bar, keep))
            gc.collect()
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
    rows, mask_cfg = judge(results, s), group_config(s, "mask_rcnn")
    judged = [r["verdict"] == "PASS" for r in rows if r["verdict"] in ("PASS", "MISS")]
    summary = {
        "kind": "gpu suite", "mode": s.mode, "title": "Issue 18: training-step cost of the long-tail methods",
        "command": " ".join(["python benchmarks/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(), "machine": machine_info(), "torch": torch.__version__,
        "device": {"type": s.device.type, "name": torch.cuda.get_device_name(s.device) if s.device.type == "cuda"
                   else f"CPU, {torch.get_num_threads()} threads"},
        "configs": {g: GROUP_CONFIGS[g] for g in groups},
        "sizes": {"backbone": mask_cfg.model.kwargs["backbone"], "classes": s.classes, "images": s.images,
                  "size": s.size, "rois_per_image": s.rois, "gts_per_image": s.gts, "input_batches": s.batches,
                  "amp": amp_setup(mask_cfg.train, s.device)[0]},
        "rounds": {"warmup": s.warmup, "timed": s.rounds},
        "goals_met": all(judged) if judged and s.mode == "gpu" else None,
        "wall_seconds": round(time.perf_counter() - t0, 1), "rows": rows,
    }
    print(format_gpu_suite_text(summary) + f"\n({summary['wall_seconds']} s)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(summary, indent=1) + "\n", a.out)
        print("wrote", a.out)
    return {**summary, "models": keep} if keep is not None else summary


if __name__ == "__main__":
    run()  # exit status 0: a benchmark reports; missed goals show as MISS in the table
