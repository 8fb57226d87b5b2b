"""Training-forward passes without gradients over chosen images: the MFS memory pre-fill and the
mean-score observation pass (methods.md section 2).

Before fine-tuning (and after a resume, since the memory is not checkpointed), :func:`prefill_memory`
runs a class-balanced pass (``M / 16 = 5`` images per class, per process; a class with fewer
images repeats them) through the training forward without gradients: it fills the memory and
updates the mean score.

Analysis (the paper's Fig. 4): :func:`observe_mean_score` runs the mean-score update rule as a
pure observer over the training set for any softmax two-stage model (e.g. the CE stage 1); plot
the result with :func:`taildet.analysis.plots.plot_mean_score_vs_instances`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from taildet.data.loading import SeededDataset, list_collate, sample_seed, to_device
from taildet.data.samplers import labels_to_arrays
from taildet.losses.mean_score import MeanScoreTracker
from taildet.sampling.mfs import last_sampled_logits
from taildet.utils.comm import get_rank, get_world_size

__all__ = ["prefill_image_indices", "prefill_memory", "observe_mean_score"]

log = logging.getLogger("taildet.sampling")


def _class_members(labels_per_image: Sequence[Any], num_classes: int) -> list[list[int]]:
    """For every class, the indices of the images containing it (ascending)."""
    arrays, _ = labels_to_arrays(labels_per_image, num_classes)
    members: list[list[int]] = [[] for _ in range(num_classes)]
    for i, a in enumerate(arrays):
        for c in set(a.tolist()):
            members[c].append(i)
    return members


def prefill_image_indices(labels_per_image: Sequence[Any], num_classes: int, images_per_class: int,
                          seed: int = 0, rank: int = 0) -> list[int]:
    """Class-balanced image pick of one process: ``images_per_class`` (``k``) images per class.

    For every class, a seeded permutation of the images containing it (the same on every process);
    process ``rank`` takes positions ``rank * k .. rank * k + k - 1`` of it, cyclically. So every
    process gets ``k`` images of every class, distinct across processes while the class has enough
    images (the memory is per process, as the reference's distributed balanced sampler), and a
    class with fewer than ``k`` images repeats them (as the reference tops up): each repeat is a
    forward with fresh jittered boxes. An image picked for several classes runs once per the
    largest number of times any one class picked it, in first-pick order.
    """
    return _pick(_class_members(labels_per_image, num_classes), images_per_class, seed, rank)


def _pick(members: list[list[int]], images_per_class: int, seed: int, rank: int) -> list[int]:
    """:func:`prefill_image_indices` from the per-class image lists."""
    k = int(images_per_class)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 16]))
    times: dict[int, int] = {}
    for imgs in members:
        if not imgs:
            continue
        perm = rng.permutation(len(imgs))
        picks = [imgs[perm[(int(rank) * k + j) % len(imgs)]] for j in range(k)]
        for i in dict.fromkeys(picks):
            times[i] = max(times.get(i, 0), picks.count(i))
    return [i for i, t in times.items() for _ in range(t)]


class _TrainForwardNoGrad:
    """Training-mode forward without gradients and with every BatchNorm in eval mode."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        return self

    def __exit__(self, *exc):
        torch.set_grad_enabled(self.grad)
        self.model.train(self.was_training)
        return False


def _batches(dataset, indices: list[int], batch_size: int, seed: int, device: torch.device, num_workers: int):
    keys = [(int(i), sample_seed(seed, 0, 0, p)) for p, i in enumerate(indices)]
    batches = [keys[b: b + batch_size] for b in range(0, len(keys), batch_size)]
    loader = torch.utils.data.DataLoader(SeededDataset(dataset), batch_sampler=batches, collate_fn=list_collate,
                                         num_workers=num_workers)
    for images, targets in loader:
        yield [im.to(device) for im in images], to_device(targets, device)


def prefill_memory(model: torch.nn.Module, dataset, *, images_per_class: int | None = None, batch_size: int = 2,
                   device: torch.device | str | None = None, seed: int = 0, num_workers: int = 0,
                   progress: bool = True) -> dict:
    """Class-balanced pre-fill of ``model.roi_heads.mfs`` (before fine-tuning and after a resume).

    ``images_per_class`` (default ``ceil(M / 16)``, 5 for M = 80) images per class
    (:func:`prefill_image_indices`) go through the training forward without gradients (every
    BatchNorm in eval mode): each batch enqueues its GTs' jittered-box features, samples the
    memory and updates the mean score, as a training iteration does; the losses are discarded and
    no parameter changes. The global RNG state is left as it was. Under DDP every process fills
    its own memory with its own ``images_per_class`` images per class (distinct across processes
    where the class has enough), lists padded to equal length so every process runs the same
    number of forwards. Returns ``{"images", "entries", "seconds"}``.
    """
    mfs = getattr(model.roi_heads, "mfs", None)
    if mfs is None:
        raise ValueError("prefill_memory: attach MFS first (model.roi_heads.mfs)")
    if images_per_class is None:
        images_per_class = max(1, math.ceil(mfs.capacity / 16))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    world, rank = get_world_size(), get_rank()
    members = _class_members(dataset.labels_per_image, mfs.num_classes)
    indices = _pick(members, images_per_class, seed, rank)
    if world > 1 and indices:
        # every process runs as many forwards as the longest list (the mean-score update is a
        # collective): the shorter ones repeat their own images
        longest = max(len(_pick(members, images_per_class, seed, r)) for r in range(world))
        indices = (indices * math.ceil(longest / len(indices)))[:longest]
    t0 = time.perf_counter()
    before = len(mfs.memory)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm  # optional: tqdm, imported on use (progress bars only)

        bar = tqdm(total=len(indices), desc="MFS pre-fill", unit="img", dynamic_ncols=True)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), _TrainForwardNoGrad(model):
            for images, targets in _batches(dataset, indices, max(1, int(batch_size)), seed, device, num_workers):
                model(images, targets)
                if bar is not None:
                    bar.update(len(images))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    filled = int((mfs.memory.count > 0).sum())
    log.info("MFS pre-fill: %d images (%d per class), %d entries, %d of %d classes in memory, %.1f s",
             len(indices), images_per_class, len(mfs.memory), filled, mfs.num_classes, seconds)
    return {"images": len(indices), "entries": len(mfs.memory) - before, "seconds": seconds}



def observe_mean_score(model: torch.nn.Module, dataset, *, device: torch.device | str | None = None,
                       batch_size: int = 2, max_images: int | None = None, alpha: float = 0.9,
                       bg_score: float = 0.01, seed: int = 0, num_workers: int = 0,
                       progress: bool = True) -> Tensor:
    """Mean classification score ``[C + 1]`` of any softmax two-stage model over the training set.

    Runs the mean-score update rule (methods.md section 2) as a pure observer: each batch goes through
    the training forward without gradients (BatchNorm in eval mode, MFS detached, no parameter
    or loss-state change other than what the loss's own ``update`` does) and an
    :class:`~taildet.losses.mean_score.MeanScoreTracker` observer takes the sampled RoIs' logits,
    labels and GT ids from the RoI head (:func:`~taildet.sampling.mfs.last_sampled_logits`). Images in dataset order (the first
    ``max_images``). So a CE model and a LOCE model can be compared on one plot.
    """
    rh = model.roi_heads
    device = torch.device(device) if device is not None else next(model.parameters()).device
    head = model.cls_head
    observer = MeanScoreTracker(head.num_classes, alpha=alpha, bg_score=bg_score).to(device)
    n = len(dataset) if max_images is None else min(int(max_images), len(dataset))
    saved_mfs, saved_loss_state = getattr(rh, "mfs", None), {k: v.clone() for k, v in head.loss.state_dict().items()}
    rh.mfs = None
    bar = None
    if progress:
        from tqdm import tqdm  # optional: tqdm, imported on use (progress bars only)

        bar = tqdm(total=n, desc="mean score", unit="img", dynamic_ncols=True)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), _TrainForwardNoGrad(model):
            for images, targets in _batches(dataset, list(range(n)), max(1, int(batch_size)), seed, device,
                                            num_workers):
                model(images, targets)
                observer.update(*last_sampled_logits(model))
                if bar is not None:
                    bar.update(len(images))
    finally:
        rh.mfs = saved_mfs
        head.loss.load_state_dict(saved_loss_state)
        if bar is not None:
            bar.close()
    return observer.mean_score.detach().cpu()
