"""The trainer: one iteration-based loop shared with fine-tuning, and ``train(cfg)``.

``train(cfg)`` builds everything from a :class:`taildet.config.Config` (with
:mod:`taildet.engine.builders`; the run directory: :mod:`taildet.engine.rundir`) and calls
:func:`run_training`, the one loop (``finetune`` calls it too). The loop

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
import time
from collections.abc import Callable, Sequence

import torch

from taildet.data.loading import EpochBatches, SeededDataset, list_collate, sample_seed, to_device
from taildet.engine.builders import (build_datasets, build_model_from_cfg, build_optimizer, build_sampler,
                                     resolve_device, seed_all, setup_logging)
from taildet.engine.checkpoint import (LAST_CHECKPOINT_FILE, get_rng_state, last_checkpoint, load_checkpoint,
                                       load_model_weights, save_checkpoint, set_rng_state)
from taildet.engine.distributed import init_distributed, sync_loss_state
from taildet.engine.evaluate import post_eval
from taildet.engine.rundir import check_run_dir, check_val_gt, prepare_run_dir, run_inputs
from taildet.engine.schedule import build_scheduler
from taildet.engine.stage2 import init_from_checkpoint, setup_mfs
from taildet.errors import ConfigError, TrainingDivergedError
from taildet.fileio import atomic_write_text
from taildet.losses.base import ClassificationLoss
from taildet.utils.host_sync import deferred_checks
from taildet.utils.comm import (all_gather_object, all_true, barrier, broadcast_object, get_rank, get_world_size,
                                is_main_process, reduce_loss_dict, unwrap_model)

__all__ = ["TrainingDivergedError", "train", "run_training", "amp_setup", "frozen_norm_modules", "Hook"]

log = logging.getLogger("taildet.engine")

#: Callback signature: ``hook(iteration, state)`` after each iteration (and after its checkpoint).
Hook = Callable[[int, dict], None]


def _epoch_batches(sampler, epoch: int, batch_size: int) -> int:
    sampler.set_epoch(epoch)
    return len(sampler) // batch_size


# ----------------------------------------------------------------------------- the loop


def frozen_norm_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
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


def _all_finite(values: Sequence[torch.Tensor]) -> bool:
    """Whether every value is finite on every process (the same answer on all of them)."""
    return all_true(all(bool(torch.isfinite(v).all()) for v in values))


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
    """The training loop (shared by ``train`` and ``finetune``). Returns the final checkpoint path.

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
    frozen_norms = list(frozen_norm_modules(core) if frozen_norms is None else frozen_norms)
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
        seed_all(tcfg.seed * 1000 + rank + 1)  # per-rank training randomness (RPN/RoI sampling)
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
        from tqdm import tqdm  # optional: tqdm, imported on use (progress bars only)

        bar = tqdm(total=max_iter, initial=iteration, desc="train", unit="it", dynamic_ncols=True)
    metrics_fh = open(metrics_path, "a", encoding="utf-8") if main else None
    dataset = SeededDataset(train_set)
    window_t, window_data, window_n = 0.0, 0.0, 0
    try:
        _set_train_mode(ddp_model, frozen_norms)
        while iteration < max_iter:
            n_batches = _epoch_batches(sampler, epoch, batch_size)
            if epoch_iter >= n_batches:
                epoch, epoch_iter = epoch + 1, 0
                continue
            stop = min(n_batches, epoch_iter + (max_iter - iteration))
            batches = EpochBatches(list(iter(sampler)), batch_size, epoch_iter, stop, tcfg.seed, epoch, rank)
            gen = torch.Generator().manual_seed(sample_seed(tcfg.seed, epoch, rank, 2**32 - 1))
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=list_collate,
                                                 num_workers=num_workers, generator=gen,
                                                 pin_memory=device.type == "cuda")
            t_data = time.perf_counter()
            for images, targets in loader:
                t_start = time.perf_counter()
                images = [im.to(device, non_blocking=True) for im in images]
                targets = to_device(targets, device)
                # the losses queue their input checks; they are read with the losses' finiteness
                # in the step's one host read (no synchronisation inside a loss on GPU)
                with deferred_checks() as checks:
                    with torch.autocast(device_type=device.type, enabled=use_amp):
                        loss_dict = ddp_model(images, targets)
                    total = sum(loss_dict.values())
                    finite = all_true(checks.verify(finite=[total] + list(loss_dict.values())))
                if not finite:
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
    seed_all(cfg.train.seed)  # identical model init on every rank
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
        metrics = post_eval(cfg, model, val_dataset, val_json, run_dir, device, progress)
    return {"run_dir": run_dir, "checkpoint": ckpt, "metrics": metrics, **(stage2 or {})}
