"""Memory-augmented Feature Sampling (MFS) of LOCE inside the RoI head, methods.md section 2.

The three parts of the paper live in their own files -- the box generator
(:mod:`taildet.sampling.jitter`), the class memory (:mod:`taildet.sampling.memory_bank`) and the
probabilistic sampler (:mod:`taildet.sampling.class_sampler`). :class:`MemoryAugmentedSampling`
holds them with the hyper-parameters (alpha 0.9, s_hat 0.01, M 80, k 8, m 4, 16 boxes per GT,
jitter 1/6). Attach it as ``model.roi_heads.mfs`` (:func:`attach_mfs`); the RoI head then calls,
in training only and in this order:

1. :meth:`MemoryAugmentedSampling.enqueue_targets` -- RoIAlign of the current GTs' jittered boxes on
   the (frozen) feature maps (``forward_box_features``, no grad), written to the memory;
2. :meth:`MemoryAugmentedSampling.sample` -- ``k x m`` memory entries (features moved to the model's
   device);
3. the box head runs on the sampled RoIs and the memory samples together, then
   :meth:`MemoryAugmentedSampling.update_mean_score` -- ``loss.update(..., extra_logits=memory
   logits, extra_labels=memory labels)`` (a loss without a mean score, e.g. plain CE, is updated as
   usual and a mean-score *observer* owned by this object tracks the mean score for the sampler);
4. the classification loss and the box-regression loss see the sampled RoIs followed by the memory
   samples (weight 1 each). The mask head never sees memory samples; nothing happens at test time.

MFS stores features once and reuses them for many iterations, so it assumes the parts that make
them -- backbone, FPN and the shared box FCs (``roi_heads.box_head``) -- are frozen:
:func:`check_frozen_features` raises :class:`ConfigError` otherwise (unless stale features are
explicitly allowed).

:func:`last_sampled_logits` is the one place that reads the RoI head's record of its last sampled
RoIs (used by the mean-score observation pass, :mod:`taildet.sampling.prefill`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from taildet.errors import ConfigError
from taildet.losses.mean_score import MeanScoreTracker
from taildet.sampling.background import background_executor
from taildet.sampling.class_sampler import ProbabilisticSampler
from taildet.sampling.jitter import make_batch_entries
from taildet.sampling.memory_bank import ClassMemory, human_bytes

__all__ = [
    "MemoryBatch",
    "MemoryAugmentedSampling",
    "FEATURE_PREFIXES",
    "check_frozen_features",
    "attach_mfs",
    "last_sampled_logits",
]

log = logging.getLogger("taildet.sampling")


class MemoryBatch(NamedTuple):
    """Memory samples of one iteration, on the model's device."""

    features: Tensor            # [S, ch, 7, 7] (memory dtype)
    labels: Tensor              # [S] int64, 0..C-1
    regression_targets: Tensor  # [S, 4] float32


def loss_tracker(loss: Any) -> MeanScoreTracker | None:
    """The :class:`MeanScoreTracker` a loss keeps as ``loss.tracker`` (EBL), or None."""
    tracker = getattr(loss, "tracker", None)
    return tracker if isinstance(tracker, MeanScoreTracker) else None


class MemoryAugmentedSampling:
    """MFS state and hyper-parameters; one method per iteration step (see the module docstring).

    Build it with :meth:`from_model` and attach it as ``model.roi_heads.mfs`` (or with
    :func:`attach_mfs`, which also checks that the feature extractor is frozen).

    Args:
        num_classes, feature_shape: ``C`` and the pooled RoI feature shape ``(ch, 7, 7)``.
        capacity (M 80), classes_per_iter (k 8), samples_per_class (m 4), boxes_per_gt (16),
        jitter (1/6): see the parts above.
        alpha (0.9), bg_score (s_hat 0.01): of the mean-score observer used when the loss has no
            mean score of its own (plain CE); with EBL the loss's ``mean_score`` is used.
        dtype, device: memory storage.
        prior: ``"mean_score"`` or ``"instance_counts"`` (then ``instance_counts`` ``[C]``).
        seed: seeds the box-jitter and sampler generators.
    """

    def __init__(self, num_classes: int, feature_shape: Sequence[int], *, capacity: int = 80,
                 classes_per_iter: int = 8, samples_per_class: int = 4, boxes_per_gt: int = 16,
                 jitter: float = 1.0 / 6.0, alpha: float = 0.9, bg_score: float = 0.01,
                 dtype: torch.dtype | str = torch.float16, device: torch.device | str = "cpu",
                 prior: str = "mean_score", instance_counts: Sequence[int] | np.ndarray | None = None,
                 seed: int = 0):
        if int(boxes_per_gt) < 1:
            raise ValueError(f"MemoryAugmentedSampling: boxes_per_gt must be >= 1, got {boxes_per_gt!r}")
        if not 0.0 <= float(jitter) < 0.5:
            raise ValueError(f"MemoryAugmentedSampling: jitter must be in [0, 0.5), got {jitter!r}")
        self.num_classes = int(num_classes)
        self.boxes_per_gt = int(boxes_per_gt)
        self.jitter = float(jitter)
        self.alpha = float(alpha)
        self.bg_score = float(bg_score)
        self.memory = ClassMemory(num_classes, capacity, feature_shape, dtype, device)
        self.sampler = ProbabilisticSampler(num_classes, classes_per_iter, samples_per_class, prior=prior,
                                            instance_counts=instance_counts, seed=int(seed) * 2 + 1)
        self.generator = torch.Generator().manual_seed(int(seed) * 2)
        self.observer: MeanScoreTracker | None = None  # the mean score when the loss keeps none
        self._score_host: Tensor | None = None
        self._score_event: Any = None
        self._score_version: tuple[int, int] | None = None
        self.last_batch: MemoryBatch | None = None
        #: CPU: start each iteration's enqueue in a background thread as soon as the RPN starts (it
        #: needs only the backbone features and the targets), so its RoIAlign overlaps the RPN.
        self.overlap = True
        self._pending: tuple[Any, Future] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pending"] = None
        return state

    @classmethod
    def from_model(cls, model: torch.nn.Module, **kwargs: Any) -> "MemoryAugmentedSampling":
        """For a taildet Faster/Mask R-CNN: ``C`` from the RoI heads, ``(ch, h, w)`` from the
        backbone's ``out_channels`` and the box RoIAlign's output size."""
        if model.cls_head.stage != "roi_heads":  # the memory holds RoI features
            raise ConfigError("train.mfs.enabled: MFS needs a taildet two-stage detector "
                              "(model.arch faster_rcnn or mask_rcnn)")
        size = model.roi_heads.box_roi_pool.output_size
        size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(size) == 1:
            size = (size[0], size[0])
        shape = (int(model.backbone.out_channels), *size)
        return cls(model.cls_head.num_classes, shape, **kwargs)

    @property
    def capacity(self) -> int:
        return self.memory.capacity

    def extra_repr(self) -> str:
        s = self.sampler
        return (f"C={self.num_classes}, M={self.capacity}, k={s.k}, m={s.m}, boxes_per_gt={self.boxes_per_gt}, "
                f"jitter={self.jitter:.4g}, prior={s.prior}, memory={human_bytes(self.memory.nbytes)} "
                f"{str(self.memory.dtype).replace('torch.', '')} on {self.memory.device}")

    def __repr__(self) -> str:
        return f"MemoryAugmentedSampling({self.extra_repr()})"

    # -- step 1 ---------------------------------------------------------------------------------

    @torch.no_grad()
    def enqueue_targets(self, roi_heads: Any, features: dict[str, Tensor], targets: list[dict[str, Tensor]],
                        image_shapes: list[tuple[int, int]]) -> int:
        """Jittered boxes of every GT (labels ``0..C-1``, boxes in the transformed image), their
        RoIAlign features (``roi_heads.forward_box_features``, detached) and regression targets
        (``roi_heads.box_coder``) -> memory. Returns the number of entries written."""
        boxes_list, labels, regs, valid = make_batch_entries(roi_heads.box_coder, targets, image_shapes,
                                                             self.generator, self.boxes_per_gt, self.jitter)
        if labels.numel() == 0:
            return 0
        plan = self.memory.plan(labels, valid)  # the one host sync, before RoIAlign is queued
        if plan is None:
            return 0
        src = plan[0]
        if src.numel() < labels.shape[0]:
            # pool only the entries that will be written (boxes without area, and a class's entries
            # beyond its M writes of this iteration, are skipped): RoIAlign is MFS's main cost
            counts = torch.tensor([b.shape[0] for b in boxes_list])
            per_image = torch.bincount(torch.repeat_interleave(torch.arange(len(boxes_list)), counts)[src],
                                       minlength=len(boxes_list)).tolist()
            src_d = src.to(regs.device)
            boxes_list = list(torch.cat(boxes_list)[src_d].split(per_image))
            regs = regs[src_d]
        pooled = roi_heads.forward_box_features(features, boxes_list, image_shapes).detach()
        return self.memory.write(plan, pooled, regs)

    def start_enqueue(self, roi_heads: Any, features: dict[str, Tensor], targets: list[dict[str, Tensor]],
                      image_shapes: list[tuple[int, int]]) -> None:
        """Run :meth:`enqueue_targets` in the background (see ``overlap``); the RoI head collects it
        with :meth:`enqueue_for_step` before it samples the memory."""
        self._wait_pending()
        self._pending = (features, background_executor().submit(self.enqueue_targets, roi_heads, features, targets,
                                                        image_shapes))

    def _wait_pending(self) -> tuple[Any, int] | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return pending[0], pending[1].result()

    def enqueue_for_step(self, roi_heads: Any, features: dict[str, Tensor], targets: list[dict[str, Tensor]],
                         image_shapes: list[tuple[int, int]]) -> int:
        """Step 1 of an iteration: the enqueue started for these ``features`` (waited for), or run
        now. Returns the number of entries written."""
        done = self._wait_pending()
        if done is not None and done[0] is features:
            return done[1]
        return self.enqueue_targets(roi_heads, features, targets, image_shapes)

    # -- step 2 ---------------------------------------------------------------------------------

    def mean_score(self, loss: Any) -> Tensor | None:
        """``[C + 1]`` mean score the sampler reads: the loss's (EBL) or the observer's."""
        tracker = loss_tracker(loss)
        if tracker is not None:
            return tracker.mean_score
        return None if self.observer is None else self.observer.mean_score

    @torch.no_grad()
    def sample(self, loss: Any, device: torch.device | str | None = None) -> MemoryBatch | None:
        """Draw this iteration's memory samples (None when every drawn queue is empty)."""
        s = None
        if self.sampler.prior == "mean_score":
            s = self.mean_score(loss)
            if s is None:
                s = torch.full((self.num_classes + 1,), self.bg_score, dtype=torch.float64)
            elif s.is_cuda and self._score_host is not None and self._score_version == (id(s), s._version):
                self._score_event.synchronize()   # copied after the last update: no stream sync
                s = self._score_host
        classes, slots = self.sampler.draw(self.memory, s)
        if classes.numel() == 0:
            self.last_batch = None
            return None
        feats, labels, targets = self.memory.gather(classes, slots)
        if device is not None:
            dev = torch.device(device)
            nb = dev.type == "cuda"
            feats, labels, targets = (feats.to(dev, non_blocking=nb), labels.to(dev, non_blocking=nb),
                                      targets.to(dev, non_blocking=nb))
        self.last_batch = MemoryBatch(feats, labels, targets)
        return self.last_batch

    # -- step 3 ---------------------------------------------------------------------------------

    @torch.no_grad()
    def update_mean_score(self, loss: Any, logits: Tensor, labels: Tensor, gt_index: Tensor,
                          memory_logits: Tensor | None, memory_labels: Tensor | None) -> None:
        """The mean-score update of this iteration, memory samples included (methods.md):
        ``loss.update(..., extra_logits=memory_logits, extra_labels=memory_labels)`` for EBL; for
        any other loss ``loss.update(logits, labels, gt_index)`` as without MFS, and the same
        observations go to this object's :class:`MeanScoreTracker` observer (created on first use) when the sampler
        reads mean scores."""
        tracker = loss_tracker(loss)
        if tracker is not None:
            loss.update(logits, labels, gt_index, extra_logits=memory_logits, extra_labels=memory_labels)
            self._copy_score_to_host(tracker.mean_score)
            return
        loss.update(logits, labels, gt_index)
        if self.sampler.prior != "mean_score":
            return
        if self.observer is None:
            if logits.shape[1] != self.num_classes + 1:
                raise ConfigError(
                    f"train.mfs.prior: 'mean_score' needs a softmax head with a background column "
                    f"({self.num_classes + 1} outputs), got {logits.shape[1]}; use prior: instance_counts")
            self.observer = MeanScoreTracker(self.num_classes, alpha=self.alpha, bg_score=self.bg_score)
        self.observer.to(logits.device)
        self.observer.update(logits, labels, gt_index, extra_logits=memory_logits, extra_labels=memory_labels)
        self._copy_score_to_host(self.observer.mean_score)

    def _copy_score_to_host(self, s: Tensor) -> None:
        """CUDA: start an asynchronous copy of the updated mean score to pinned host memory, so the
        next :meth:`sample` reads it without a stream synchronisation. The tensor's identity and
        version are recorded: any later in-place change (a checkpoint load) makes :meth:`sample`
        read the tensor itself instead."""
        if not s.is_cuda:
            return
        if self._score_host is None or self._score_host.shape != s.shape or self._score_host.dtype != s.dtype:
            self._score_host = torch.empty(s.shape, dtype=s.dtype, pin_memory=True)
            self._score_event = torch.cuda.Event()
        self._score_host.copy_(s.detach(), non_blocking=True)
        self._score_event.record()
        self._score_version = (id(s), s._version)





#: Parameter-name prefixes whose weights make the stored features: backbone (incl. FPN) and the
#: shared box FCs.
FEATURE_PREFIXES = ("backbone.", "roi_heads.box_head.")


def check_frozen_features(model: torch.nn.Module, allow_stale_features: bool = False) -> list[str]:
    """Names of trainable parameters of the backbone, FPN and shared box FCs; raises
    :class:`ConfigError` when there are any and ``allow_stale_features`` is False."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith(FEATURE_PREFIXES)]
    if trainable and not allow_stale_features:
        shown = ", ".join(trainable[:5]) + (f", ... ({len(trainable)} in all)" if len(trainable) > 5 else "")
        raise ConfigError(
            "train.mfs: memory-augmented feature sampling stores RoI features and reuses them for many "
            "iterations, so the backbone, FPN and shared box FCs (roi_heads.box_head) must be frozen; "
            f"trainable: {shown}. Freeze them with train.freeze (e.g. ['^backbone\\\\.', "
            "'^roi_heads\\\\.box_head\\\\.']) or set train.mfs.allow_stale_features: true")
    if trainable:
        log.warning("train.mfs: %d feature parameters are trainable; memory features go stale "
                    "(train.mfs.allow_stale_features)", len(trainable))
    return trainable


def attach_mfs(model: torch.nn.Module, mfs: MemoryAugmentedSampling, *, allow_stale_features: bool = False
               ) -> MemoryAugmentedSampling:
    """Check the feature extractor is frozen, then set ``model.roi_heads.mfs = mfs``.

    When the sampler reads mean scores and the loss keeps none (MFS with plain CE), the mean-score
    observer (a :class:`~taildet.losses.mean_score.MeanScoreTracker`) is
    created here and registered as ``model.roi_heads.mfs_observer``, so its ``mean_score`` is in
    the ``state_dict`` and checkpoints and a resume continues from it. Inference-time loaders drop
    that key for models without MFS (:func:`taildet.engine.checkpoint.load_model_weights`).
    """
    check_frozen_features(model, allow_stale_features)
    rh, loss = model.roi_heads, model.cls_head.loss
    if mfs.sampler.prior == "mean_score" and loss_tracker(loss) is None and mfs.observer is None:
        if loss.num_outputs() != mfs.num_classes + 1:
            raise ConfigError(
                f"train.mfs.prior: 'mean_score' needs a softmax head with a background column "
                f"({mfs.num_classes + 1} outputs), got {loss.num_outputs()}; use prior: instance_counts")
        mfs.observer = MeanScoreTracker(mfs.num_classes, alpha=mfs.alpha, bg_score=mfs.bg_score)
        rh.mfs_observer = mfs.observer  # a submodule: checkpointed with the model
    model.roi_heads.mfs = mfs
    rpn = getattr(model, "rpn", None)
    if rpn is not None and getattr(rpn, "_taildet_mfs_hook", None) is None:
        rpn._taildet_mfs_hook = rpn.register_forward_pre_hook(functools.partial(_start_enqueue_hook, model))
    return mfs


def _start_enqueue_hook(model: torch.nn.Module, rpn: torch.nn.Module, args: tuple) -> None:
    """RPN pre-hook: in training on CPU, start the MFS enqueue of this iteration in the background
    (the RPN gets ``(images, features, targets)``, everything the enqueue needs)."""
    rh = model.roi_heads
    mfs = getattr(rh, "mfs", None)
    if mfs is None or not mfs.overlap or not rh.training or len(args) < 3 or args[2] is None:
        return
    images, features, targets = args[0], args[1], args[2]
    if not features or next(iter(features.values())).device.type != "cpu":
        return
    mfs.start_enqueue(rh, features, targets, images.image_sizes)



def last_sampled_logits(model: torch.nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits, labels, gt_index)`` of the RoIs the RoI head sampled in its last training
    forward (the only read of the classification head's record, ``model.cls_head.record``)."""
    r = model.cls_head.record
    return r.logits, r.labels, r.gt_index
