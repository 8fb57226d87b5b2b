"""Training: data, model, optimiser, schedule and one iteration-based loop shared with fine-tuning.

``train(cfg)`` builds everything from a :class:`taildet.config.Config` and calls
:func:`run_training`, the one loop. A stage-2 config (``model.init_from``, ``train.freeze``,
``train.mfs``) starts from the stage-1 weights (:mod:`taildet.engine.stage2`). The loop

* counts iterations; epochs come from the sampler (``len(sampler) // batch_size`` batches per
  epoch, last partial batch dropped; ``sampler.set_epoch(e)`` before each epoch);
* is exactly resumable: data randomness (e.g. flips) is seeded per sample from
  ``(train.seed, epoch, rank, position)``, so it does not depend on worker count or on where the
  run was interrupted; the model-side RNG (RPN/RoI sampling) is saved and restored;
  the DataLoader gets its own generator so creating one consumes no global randomness;
* stops with :class:`TrainingDivergedError` on a non-finite loss (or gradient norm, or
  parameters before a save) without writing a checkpoint, so the last one stays good;
* writes, on rank 0 only: ``config.yaml``, ``metrics.jsonl`` (one JSON line every
  ``train.log_period`` iterations), ``checkpoint_<iter>.pth`` at each epoch end (or every
  ``train.checkpoint_period`` iterations) and ``model_final.pth``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from taildet.engine.checkpoint import (LAST_CHECKPOINT_FILE, get_rng_state, last_checkpoint, load_checkpoint,
                                       load_model_weights,
                                       save_checkpoint, set_rng_state)
from taildet.engine.distributed import (all_gather_object, barrier, broadcast_object, get_rank,
                                        get_world_size, init_distributed, is_main_process, main_process_check,
                                        reduce_loss_dict,
                                        sync_loss_state, unwrap_model)
from taildet.engine.inference import eval_caps, evaluate_results, inference, list_collate, resolve_device
from taildet.engine.schedule import build_scheduler
from taildet.engine.stage2 import init_from_checkpoint, setup_mfs
from taildet.errors import ConfigError, OutputError, TaildetError
from taildet.losses.base import ClassificationLoss
from taildet.fileio import atomic_write_text

__all__ = [
    "TrainingDivergedError",
    "train",
    "run_training",
    "build_datasets",
    "build_sampler",
    "build_model_from_cfg",
    "loss_needs_train_statistics",
    "build_optimizer",
    "setup_logging",
]

log = logging.getLogger("taildet.engine")

#: Callback signature: ``hook(iteration, state)`` after each iteration (and after its checkpoint).
Hook = Callable[[int, dict], None]


class TrainingDivergedError(TaildetError, RuntimeError):
    """Non-finite loss / gradients: names the iteration and the loss terms; checkpoints are kept."""

    def __init__(self, message: str, iteration: int, loss_terms: dict[str, float] | None = None,
                 checkpoint: str | None = None):
        super().__init__(message)
        self.iteration = iteration
        self.loss_terms = dict(loss_terms or {})
        self.checkpoint = checkpoint


def setup_logging() -> None:
    """Show taildet's INFO lines on stderr (rank 0) unless the application configured logging."""
    logger = logging.getLogger("taildet")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s taildet] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)


# ----------------------------------------------------------------------------- building blocks


def build_datasets(cfg, need_train: bool = True):
    """``(train_set | None, val_set | None, val_json | None)`` from ``cfg.data``.

    The annotation files are read and checked and every image file must exist (DataError listing
    the missing ones). ``need_train="annotations"``: the training set's annotations only (its
    statistics), its images are not needed.

    With ``data.synthetic`` the embedded dataset is generated (rank 0; others wait) or reused
    under ``data.root``. Val images are loaded without masks (inference needs none).
    """
    from taildet.data.lvis import load_lvis
    from taildet.data.transforms import build_transforms

    d = cfg.data
    if d.synthetic is not None:
        from taildet.data.synthetic import make_dataset

        info = None
        if is_main_process():
            info = make_dataset(d.root, seed=d.synthetic.seed, scale=d.synthetic.scale,
                                vocabulary=d.synthetic.vocabulary, progress=False)
        info = broadcast_object(info)
        train_json, val_json = info["train_json"], info["val_json"]
        train_root = val_root = info["image_dir"]
    else:
        train_json, val_json = d.train_json, d.val_json
        train_root = d.image_root
        val_root = d.val_image_root or d.image_root
    train_set = val_set = None
    if need_train:
        train_set = load_lvis(train_json, train_root,
                              transforms=build_transforms(True, d.min_sizes, d.max_size, d.flip_prob),
                              with_masks=d.with_masks, skip_invalid=d.skip_invalid)
        if need_train != "annotations":
            train_set.check_image_files()  # at start-up, not as a DataError mid-run
    if val_json:
        val_set = load_lvis(val_json, val_root, transforms=build_transforms(False, d.min_sizes, d.max_size, 0.0),
                            with_masks=False, skip_invalid=d.skip_invalid)
        val_set.check_image_files()
        if train_set is not None:
            from taildet.data.lvis import check_same_categories

            check_same_categories(train_set, val_set)  # a model's label j must mean one class in both
    elif not need_train:
        raise ConfigError("data.val_json: required for evaluation")
    return train_set, val_set, val_json


def build_sampler(dataset, sampler: str, *, seed: int, rfs_threshold: float | str = 0.001,
                  rfs_rounding: str = "stochastic"):
    """The training sampler named by ``data.sampler`` (DDP sharding built in)."""
    from taildet.data.samplers import ClassBalancedSampler, RepeatFactorSampler, TrainingSampler

    if sampler == "random":
        return TrainingSampler(len(dataset), shuffle=True, seed=seed)
    if sampler == "rfs":
        t = rfs_threshold
        if t == "auto":
            # LVIS's t = 0.001 on ~100k images = "repeat classes seen in < ~100 images"; keep
            # that meaning on any dataset size (t = 0.001 does nothing on a 1k-image set).
            t = RepeatFactorSampler.threshold_for_dataset(len(dataset))
            log.info("data.rfs_threshold auto: t = 100 / %d images = %.4g", len(dataset), t)
        return RepeatFactorSampler.from_dataset(dataset, threshold=t, rounding=rfs_rounding, seed=seed)
    if sampler == "class_balanced":
        return ClassBalancedSampler.from_dataset(dataset, seed=seed)
    raise ConfigError(f"data.sampler: expected random, rfs or class_balanced, got {sampler!r}")


def build_model_from_cfg(cfg, num_classes: int, *, loss: str | None = None, loss_kwargs: dict | None = None,
                         train_dataset=None):
    """``taildet.models.build_model(arch, num_classes, **model kwargs)`` (loss optionally replaced).

    Losses whose constructor takes training-set statistics (``instance_counts``,
    ``image_counts``, ``image_frequency``: Balanced Softmax/Sigmoid, EQL, ...) get them from
    ``train_dataset`` unless the config's ``loss_kwargs`` sets them. ``model.backbone_weights:
    synthetic-pretrained`` becomes the cached pretrained tiny backbone's path (built on first use;
    see :mod:`taildet.engine.pretrain`).
    """
    from taildet.engine.pretrain import resolve_backbone_weights
    from taildet.losses import dataset_statistics_needed, fill_dataset_statistics
    from taildet.models import build_model

    if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} does not match the dataset's "
                          f"{num_classes} classes")
    kwargs = resolve_backbone_weights(cfg, dict(cfg.model.kwargs))
    if loss is not None:
        kwargs["loss"] = loss
    if loss_kwargs is not None:
        kwargs["loss_kwargs"] = dict(loss_kwargs)
    loss_name = kwargs.get("loss")
    if isinstance(loss_name, str) and dataset_statistics_needed(loss_name):
        kwargs["loss_kwargs"] = fill_dataset_statistics(loss_name, kwargs.get("loss_kwargs"), train_dataset)
    return build_model(cfg.model.arch, num_classes=num_classes, **kwargs)


def loss_needs_train_statistics(cfg, loss: str | None = None) -> bool:
    """True when the configured loss takes training-set statistics (see build_model_from_cfg)."""
    from taildet.losses import dataset_statistics_needed

    name = loss or cfg.model.kwargs.get("loss")
    given = (cfg.model.kwargs.get("loss_kwargs") or {}) if name == cfg.model.kwargs.get("loss") else {}
    return isinstance(name, str) and any(k not in given for k in dataset_statistics_needed(name))


_NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def build_optimizer(model: torch.nn.Module, tcfg) -> torch.optim.SGD:
    """SGD with momentum over trainable parameters; ``weight_decay_norm`` for norm/bias params."""
    decay, no_decay = [], []
    seen: set[int] = set()
    wd_norm = tcfg.weight_decay if tcfg.weight_decay_norm is None else tcfg.weight_decay_norm
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, _NORM_TYPES) or name == "bias":
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": wd_norm})
    if not decay and not no_decay:
        raise ConfigError("no trainable parameters (check train.freeze)")
    return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum)


# ----------------------------------------------------------------------------- data plumbing


def _sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, position]).generate_state(1, np.uint64)[0] >> 1)


class _SeededDataset(torch.utils.data.Dataset):
    """Loads ``dataset[idx]`` for keys ``(idx, seed)`` with all RNGs seeded from ``seed`` (and the
    caller's RNG states left untouched), so augmentation depends only on the key."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        idx, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % (2**32))
                return self.dataset[idx]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _EpochBatches(torch.utils.data.Sampler):
    """Batches ``start..stop-1`` of one epoch of ``sampler``, as lists of ``(index, seed)``."""

    def __init__(self, indices: Sequence[int], batch_size: int, start: int, stop: int, seed: int,
                 epoch: int, rank: int):
        self.indices, self.batch_size = list(indices), batch_size
        self.start, self.stop, self.seed, self.epoch, self.rank = start, stop, seed, epoch, rank

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        bs = self.batch_size
        for b in range(self.start, self.stop):
            yield [(int(self.indices[p]), _sample_seed(self.seed, self.epoch, self.rank, p))
                   for p in range(b * bs, (b + 1) * bs)]


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
            for t in targets]


def _epoch_batches(sampler, epoch: int, batch_size: int) -> int:
    sampler.set_epoch(epoch)
    return len(sampler) // batch_size


# ----------------------------------------------------------------------------- the loop


def _frozen_norm_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """BatchNorm layers whose parameters are all frozen (kept in eval mode while training)."""
    out = []
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                out.append(m)
    return out


def _set_train_mode(model: torch.nn.Module, frozen_norms: list[torch.nn.Module]) -> None:
    model.train()
    for m in frozen_norms:
        m.eval()


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _all_finite(values: Sequence[torch.Tensor]) -> bool:
    flag = torch.tensor(float(all(bool(torch.isfinite(v).all()) for v in values)))
    if get_world_size() > 1:
        import torch.distributed as dist

        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = flag.to(dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _truncate_metrics(path: str, iteration: int) -> None:
    """Drop metric lines logged after ``iteration`` (they are redone by the resumed run)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                if json.loads(line).get("iteration", 0) <= iteration:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue
    atomic_write_text("".join(keep), path)


def amp_setup(tcfg, device: torch.device) -> tuple[bool, torch.amp.GradScaler]:
    """``train.amp``: whether the training loop runs under autocast (CUDA only) and its GradScaler
    (a disabled one without AMP). The loop tells every classification loss the scaler's scale
    before each backward (``before_backward``; losses that keep gradient statistics, EFL and EQFL,
    divide by it)."""
    use_amp = bool(tcfg.amp) and device.type == "cuda"
    if tcfg.amp and not use_amp:
        log.info("train.amp: ignored on %s (AMP is CUDA only)", device.type)
    return use_amp, torch.amp.GradScaler("cuda", enabled=use_amp)


def run_training(
    model: torch.nn.Module,
    train_set,
    tcfg,
    run_dir: str,
    *,
    sampler: torch.utils.data.Sampler,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
    config_dict: dict | None = None,
    hooks: Sequence[Hook] = (),
    frozen_norms: Sequence[torch.nn.Module] | None = None,
) -> str:
    """The training loop of :func:`train`. Returns the final checkpoint path.

    ``model`` must already be on ``device`` and seeded identically on every rank; ``tcfg`` is a
    :class:`taildet.config.TrainConfig`. With ``resume`` the newest checkpoint of ``run_dir`` is
    loaded (when there is one) and training continues exactly where it stopped.
    """
    rank, world = get_rank(), get_world_size()
    main = is_main_process()
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    final_path = os.path.join(run_dir, "model_final.pth")
    if main:
        os.makedirs(run_dir, exist_ok=True)
    if len(sampler) < batch_size:
        raise ConfigError(f"data.batch_size: {batch_size} is larger than the {len(sampler)} images "
                          f"one process gets per epoch")

    # Length of the run.
    if tcfg.iterations is not None:
        max_iter = int(tcfg.iterations)
    else:
        max_iter = sum(_epoch_batches(sampler, e, batch_size) for e in range(tcfg.epochs))
    core = unwrap_model(model)
    frozen_norms = list(_frozen_norm_modules(core) if frozen_norms is None else frozen_norms)
    optimizer = build_optimizer(core, tcfg)
    scheduler = build_scheduler(optimizer, max_iter=max_iter, warmup_iters=tcfg.warmup_iters,
                                warmup_factor=tcfg.warmup_factor, schedule=tcfg.schedule, steps=tcfg.steps,
                                gamma=tcfg.gamma)
    use_amp, scaler = amp_setup(tcfg, device)

    iteration, epoch, epoch_iter = 0, 0, 0
    ckpt_path = last_checkpoint(run_dir) if resume else None
    if resume and ckpt_path is None:
        log.info("resume: no checkpoint in %s, starting from scratch", run_dir)
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        load_model_weights(core, state["model"], ckpt_path, state.get("config"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and use_amp:
            scaler.load_state_dict(state["scaler"])
        iteration = int(state["iteration"])
        epoch = int(state.get("sampler_epoch", state.get("epoch", 0)))
        epoch_iter = int(state.get("epoch_iteration", 0))
        per_rank = state.get("rng_per_rank")
        set_rng_state(per_rank[rank] if per_rank and len(per_rank) == world else state["rng"])
        if main:
            _truncate_metrics(metrics_path, iteration)
        log.info("resumed from %s at iteration %d (epoch %d, batch %d)", ckpt_path, iteration, epoch, epoch_iter)
    else:
        _seed_all(tcfg.seed * 1000 + rank + 1)  # per-rank training randomness (RPN/RoI sampling)
        if main:
            for stale in (metrics_path, os.path.join(run_dir, LAST_CHECKPOINT_FILE)):
                if os.path.exists(stale):
                    os.remove(stale)
        ckpt_path = None
    barrier()

    ddp_model = model
    if world > 1 and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=tcfg.find_unused_parameters)

    def save(path: str) -> str:
        params = [p.detach() for p in core.parameters()]
        if not _all_finite(params):
            raise TrainingDivergedError(
                f"training diverged before iteration {iteration}: non-finite parameters; "
                f"not saving {os.path.basename(path)} (last good checkpoint: {last_good})",
                iteration, checkpoint=last_good)
        rng = get_rng_state()
        per_rank = all_gather_object(rng) if world > 1 else None
        if main:
            save_checkpoint(path, model=core.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if use_amp else None,
                            iteration=iteration, epoch=epoch, sampler_epoch=epoch, epoch_iteration=epoch_iter,
                            rng=rng, rng_per_rank=per_rank, config=config_dict, world_size=world)
        barrier()
        return path

    last_good = ckpt_path
    params = [p for p in core.parameters() if p.requires_grad]
    # every classification loss (the model's cls_head.loss, MFS's observer, ...) gets the hooks
    loss_modules = [m for m in core.modules() if isinstance(m, ClassificationLoss)]
    bar = None
    if progress and main and iteration < max_iter:
        from tqdm import tqdm

        bar = tqdm(total=max_iter, initial=iteration, desc="train", unit="it", dynamic_ncols=True)
    metrics_fh = open(metrics_path, "a", encoding="utf-8") if main else None
    dataset = _SeededDataset(train_set)
    window_t, window_data, window_n = 0.0, 0.0, 0
    try:
        _set_train_mode(ddp_model, frozen_norms)
        while iteration < max_iter:
            n_batches = _epoch_batches(sampler, epoch, batch_size)
            if epoch_iter >= n_batches:
                epoch, epoch_iter = epoch + 1, 0
                continue
            stop = min(n_batches, epoch_iter + (max_iter - iteration))
            batches = _EpochBatches(list(iter(sampler)), batch_size, epoch_iter, stop, tcfg.seed, epoch, rank)
            gen = torch.Generator().manual_seed(_sample_seed(tcfg.seed, epoch, rank, 2**32 - 1))
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=list_collate,
                                                 num_workers=num_workers, generator=gen,
                                                 pin_memory=device.type == "cuda")
            t_data = time.perf_counter()
            for images, targets in loader:
                t_start = time.perf_counter()
                images = [im.to(device, non_blocking=True) for im in images]
                targets = _to_device(targets, device)
                with torch.autocast(device_type=device.type, enabled=use_amp):
                    loss_dict = ddp_model(images, targets)
                total = sum(loss_dict.values())
                if not _all_finite([total] + list(loss_dict.values())):
                    terms = {k: float(v.detach()) for k, v in loss_dict.items()}
                    bad = ", ".join(f"{k}={v}" for k, v in terms.items() if not math.isfinite(v))
                    raise TrainingDivergedError(
                        f"training diverged at iteration {iteration + 1}: non-finite loss "
                        f"({bad or 'total=' + str(float(total))}; all terms: "
                        + ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                        + f"). Last good checkpoint, left intact: {last_good}. Try a lower train.lr, "
                        "a longer train.warmup_iters or train.grad_clip.", iteration + 1, terms, last_good)
                optimizer.zero_grad(set_to_none=True)
                # losses with gradient statistics accumulate the true (unscaled) gradient
                grad_scale = scaler.get_scale() if use_amp else 1.0
                for loss_module in loss_modules:
                    loss_module.before_backward(grad_scale)
                scaler.scale(total).backward()
                if tcfg.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
                    if not use_amp and not _all_finite([norm]):
                        raise TrainingDivergedError(
                            f"training diverged at iteration {iteration + 1}: non-finite gradient norm "
                            f"(loss terms: " + ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in loss_dict.items())
                            + f"). Last good checkpoint, left intact: {last_good}.",
                            iteration + 1, {k: float(v.detach()) for k, v in loss_dict.items()}, last_good)
                try:
                    scaler.step(optimizer)
                except RuntimeError as err:
                    if "overflow" not in str(err):
                        raise
                    # a step size that float32 cannot hold (lr, weight_decay or the schedule's
                    # gamma far too large): the same stop as a non-finite loss, not a traceback
                    group = optimizer.param_groups[0]
                    raise TrainingDivergedError(
                        f"training diverged at iteration {iteration + 1}: the optimizer step overflowed "
                        f"(lr {group['lr']:g}, weight_decay {group['weight_decay']:g}: {err}). Last good "
                        f"checkpoint, left intact: {last_good}. Lower train.lr, train.weight_decay or "
                        "train.gamma.", iteration + 1, {k: float(v.detach()) for k, v in loss_dict.items()},
                        last_good) from None
                scaler.update()
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                if world > 1:
                    sync_loss_state(ddp_model)
                iteration += 1
                epoch_iter += 1
                end_of_epoch = epoch_iter >= n_batches
                t_end = time.perf_counter()
                window_t += t_end - t_data
                window_data += t_start - t_data
                window_n += 1
                if iteration % tcfg.log_period == 0 or iteration == max_iter:
                    losses = reduce_loss_dict(loss_dict)
                    record = {"iteration": iteration, "epoch": epoch, "lr": lr,
                              "loss": sum(losses.values()), **losses,
                              "time_per_iter": window_t / window_n, "data_time": window_data / window_n}
                    if use_amp:
                        record["amp_scale"] = float(scaler.get_scale())
                    if metrics_fh is not None:
                        metrics_fh.write(json.dumps(record) + "\n")
                        metrics_fh.flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2g}")
                    window_t, window_data, window_n = 0.0, 0.0, 0
                if bar is not None:
                    bar.update(1)
                if end_of_epoch:
                    epoch, epoch_iter = epoch + 1, 0
                if iteration == max_iter:
                    last_good = save(final_path)
                elif (tcfg.checkpoint_period is not None and iteration % tcfg.checkpoint_period == 0) or (
                        tcfg.checkpoint_period is None and end_of_epoch):
                    last_good = save(os.path.join(run_dir, f"checkpoint_{iteration:07d}.pth"))
                for hook in hooks:
                    hook(iteration, {"epoch": epoch, "loss_dict": loss_dict, "model": core,
                                     "checkpoint": last_good, "max_iter": max_iter})
                t_data = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
        if metrics_fh is not None:
            metrics_fh.close()
    if not broadcast_object(os.path.isfile(final_path) if main else None):
        save(final_path)  # e.g. resumed from a checkpoint at the (shortened) end of the run
    return final_path


# ----------------------------------------------------------------------------- entry point


#: Config keys that may differ between a run and its resume (where output goes, logging, data
#: loading, paths, evaluation); any other difference makes ``--resume`` an error.
RESUME_MAY_CHANGE = re.compile(
    r"^(output_dir|eval\..*|train\.(log_period|checkpoint_period|device)|data\.num_workers|model\.init_from"
    r"|.*(root|_json|_weights))$")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_resume_config(saved: dict, cfg, run_dir: str) -> None:
    """ConfigError when ``cfg`` differs from the config ``run_dir`` was started with (its
    ``config.yaml``) in a key outside :data:`RESUME_MAY_CHANGE`: a resume continues the optimizer,
    schedule, sampler and RNG of the saved run, so e.g. a new lr would be silently ignored and a
    new schedule length would change the run mid-way."""
    import yaml

    from taildet.config import upgrade_saved_config

    # a run directory of an earlier version (finetune: section) compares in the current shape
    saved = yaml.safe_load(yaml.safe_dump(upgrade_saved_config(saved, stage2=cfg.model.init_from is not None)))
    old = _flatten(saved)
    new = _flatten(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))  # as config.yaml has it
    changed = sorted(k for k in set(old) | set(new)
                     if old.get(k) != new.get(k) and not RESUME_MAY_CHANGE.match(k))
    if changed:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:8])
        more = f"; ... ({len(changed)} in all)" if len(changed) > 8 else ""
        raise ConfigError(
            f"resume: {run_dir} was started with a different config ({shown}{more}). Resume with the "
            f"run's own config ({os.path.join(run_dir, 'config.yaml')}), or start a new run without "
            "--resume / in another output_dir")


#: Files a run writes into its directory (besides ``checkpoint_<iteration>.pth``).
RUN_FILES = ("config.yaml", "metrics.jsonl", "model_final.pth", LAST_CHECKPOINT_FILE, "results_bbox.json",
             "metrics.json")
_CHECKPOINT_NAME = re.compile(r"checkpoint_\d+\.pth$")


def _old_run_files(run_dir: str, config_text: str | None) -> list[str]:
    """The files of an earlier run in ``run_dir`` that a new run would overwrite or remove: its
    checkpoints, metrics, results and config (a ``config.yaml`` alone only when it differs from
    ``config_text``, the one the new run writes)."""
    if not os.path.isdir(run_dir):
        return []
    names = [n for n in os.listdir(run_dir) if n in RUN_FILES or _CHECKPOINT_NAME.match(n)]
    if names == ["config.yaml"] and config_text is not None:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8", errors="replace") as fh:
            if fh.read() == config_text:
                return []
    return sorted(names)


def _set_aside_old_run(run_dir: str, config_text: str | None = None) -> str | None:
    """Move an earlier run's files (checkpoints, config, metrics, results) out of the way of a new
    run in the same directory: nothing of it is overwritten, and a later ``--resume`` of the new
    run can never pick its checkpoints up. Returns the folder used."""
    old = _old_run_files(run_dir, config_text)
    if not old:
        return None
    aside = os.path.join(run_dir, "superseded-" + time.strftime("%Y%m%d-%H%M%S"))
    k = 1
    while os.path.exists(aside):
        aside = os.path.join(run_dir, "superseded-" + time.strftime("%Y%m%d-%H%M%S") + f"-{k}")
        k += 1
    os.makedirs(aside)
    for n in old:
        os.replace(os.path.join(run_dir, n), os.path.join(aside, n))
    return aside


def check_run_dir(cfg, resume: bool, inputs: dict[str, str | None] | None = None) -> str:
    """Everything about ``cfg.output_dir`` that can be checked without writing to it; returns its
    absolute path. Called before the data are read, so a bad output directory fails at once:

    * it can be created / written (not a file, no file among its parents, writable);
    * with ``resume``, the config matches the one the run was started with
      (:func:`check_resume_config`);
    * no file the run writes is one of its ``inputs`` (``{description: path}``: annotation
      files, a stage-1 checkpoint, ...). The config file itself may be the run's ``config.yaml``
      (re-running a run from its saved config): an earlier run's files are set aside, not lost.
    """
    import yaml

    from taildet.fileio import check_not_inputs, check_output_path

    run_dir = os.path.abspath(cfg.output_dir)
    main_process_check(check_output_path, run_dir, directory=True, what="run (output_dir)")
    saved_cfg = os.path.join(run_dir, "config.yaml")
    if resume and os.path.isfile(saved_cfg) and last_checkpoint(run_dir) is not None:
        with open(saved_cfg, encoding="utf-8") as fh:  # every rank: all raise alike
            check_resume_config(yaml.safe_load(fh) or {}, cfg, run_dir)
    outputs = {f"run file {n}": os.path.join(run_dir, n) for n in RUN_FILES if n != "config.yaml"}
    if os.path.isdir(run_dir):
        outputs.update({f"run file {n}": os.path.join(run_dir, n) for n in os.listdir(run_dir)
                        if _CHECKPOINT_NAME.match(n)})
    check_not_inputs(outputs, dict(inputs or {}))
    return run_dir


def run_inputs(cfg) -> dict[str, str | None]:
    """The files a run of ``cfg`` reads (for :func:`check_run_dir`)."""
    d = cfg.data
    init = {"--from checkpoint (model.init_from)": cfg.model.init_from} if cfg.model.init_from else {}
    if d.synthetic is not None:
        return init
    return {"data.train_json": d.train_json, "data.val_json": d.val_json, **init}


def prepare_run_dir(cfg, resume: bool) -> str:
    """Create ``cfg.output_dir`` and write ``config.yaml`` (rank 0). Call it only once the data,
    config and model have been checked (:func:`check_run_dir`, datasets, model): it is the first
    write to the run directory.

    Removes temporary files of interrupted writes. With ``resume``, the config must match the one
    the run was started with (:func:`check_resume_config`); without it, the files of an earlier
    run in the directory (checkpoints, config, metrics, results) are moved to
    ``superseded-<time>/`` (nothing is overwritten, and a later ``--resume`` of this run must not
    continue the old one).
    """
    import yaml

    from taildet.config import save_config
    from taildet.fileio import remove_stale_temp_files

    run_dir = check_run_dir(cfg, resume)
    if is_main_process():
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create the run directory {run_dir}: {err.strerror or err}") from None
        stale = remove_stale_temp_files(run_dir)
        if stale:
            log.info("removed %d temporary file(s) of interrupted writes from %s", len(stale), run_dir)
        if not resume:
            text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            aside = _set_aside_old_run(run_dir, text)
            if aside is not None:
                log.warning("%s held an earlier run: its files moved to %s (use --resume to continue a "
                            "run instead)", run_dir, aside)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    barrier()
    return run_dir


def check_val_gt(cfg, val_json) -> None:
    """The final evaluation's checks of the validation GT (:func:`taildet.evaluation.lvis_eval.check_gt`),
    at start-up (rank 0; the others wait for its verdict)."""
    from taildet.evaluation.lvis_eval import check_gt

    main_process_check(check_gt, val_json, cfg.iou_types())


def _post_eval(cfg, model, val_set, val_json, run_dir, device, progress) -> dict:
    core = unwrap_model(model)
    results = inference(core, val_set, cfg.eval.batch_size or cfg.data.batch_size, device,
                        score_thresh=cfg.eval.score_thresh, progress=progress,
                        num_workers=min(cfg.data.num_workers, 2), **eval_caps(cfg))
    metrics = None
    if is_main_process():
        metrics = evaluate_results(results, val_json, run_dir, cfg.iou_types(), fixed=cfg.eval.fixed)
    return broadcast_object(metrics)


def train(cfg, resume: bool = False, progress: bool = True, *, evaluate: bool | None = None,
          model: torch.nn.Module | None = None, train_dataset=None, val_dataset=None, val_json: str | None = None,
          hooks: Sequence[Hook] = ()) -> dict:
    """Train the detector of ``cfg``; returns ``{"run_dir", "checkpoint", "metrics"}``.

    Works in one process or under torchrun (DDP; ``data.batch_size`` per process). ``resume``
    continues from the newest checkpoint in ``cfg.output_dir``. After training the model is
    evaluated on the val set (``results_bbox.json``, ``metrics.json``) unless ``eval.enabled`` is
    false or ``evaluate=False``; ``metrics`` is then ``{iou_type: {...}}`` (else ``{}``).

    ``model``/``train_dataset``/``val_dataset``/``val_json`` replace what ``cfg`` would build
    (for tests and custom setups); ``hooks`` are called as ``hook(iteration, state)``.

    A stage 2 (``model.init_from``) starts from those weights (not re-read on a resume), with
    ``train.freeze`` frozen and ``train.mfs``; it also returns ``trainable_parameters`` and
    ``not_loaded`` (see :mod:`taildet.engine.stage2`).
    """
    init_distributed(cfg.train.device)
    setup_logging()
    device = resolve_device(cfg.train.device)
    # Nothing is written to the run directory before the output directory, the data and the
    # model have been checked: a run that fails on bad input leaves an earlier run intact.
    run_dir = check_run_dir(cfg, resume, run_inputs(cfg))
    if train_dataset is None:
        train_dataset, built_val, built_json = build_datasets(cfg)
        val_dataset = val_dataset if val_dataset is not None else built_val
        val_json = val_json or built_json
    _seed_all(cfg.train.seed)  # identical model init on every rank
    if model is None:
        model = build_model_from_cfg(cfg, train_dataset.num_classes, train_dataset=train_dataset)
    stage2 = init_from_checkpoint(cfg, model, run_dir, resume)  # None unless model.init_from/train.freeze/mfs
    sampler = build_sampler(train_dataset, cfg.data.sampler, seed=cfg.train.seed,
                            rfs_threshold=cfg.data.rfs_threshold, rfs_rounding=cfg.data.rfs_rounding)
    do_eval = cfg.eval.enabled if evaluate is None else evaluate
    if do_eval and val_dataset is not None and val_json:
        check_val_gt(cfg, val_json)
    run_dir = prepare_run_dir(cfg, resume)
    model.to(device)
    if cfg.train.mfs.enabled:
        setup_mfs(cfg, model, train_dataset, device, run_dir if resume else None, cfg.train.seed, progress)
    log.info("training %s on %d images (%s sampler), %d process(es) x batch %d, device %s",
             cfg.model.arch, len(train_dataset), cfg.data.sampler, get_world_size(), cfg.data.batch_size, device)
    ckpt = run_training(model, train_dataset, cfg.train, run_dir, sampler=sampler, batch_size=cfg.data.batch_size,
                        num_workers=cfg.data.num_workers, device=device, resume=resume, progress=progress,
                        config_dict=cfg.to_dict(), hooks=hooks)
    metrics: dict = {}
    if do_eval and val_dataset is not None and val_json:
        metrics = _post_eval(cfg, model, val_dataset, val_json, run_dir, device, progress)
    return {"run_dir": run_dir, "checkpoint": ckpt, "metrics": metrics, **(stage2 or {})}
