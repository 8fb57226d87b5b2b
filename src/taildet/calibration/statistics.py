"""The LogN statistics pass and applying its result to a detector.

:func:`collect_logit_statistics` runs a trained detector over (a shard of) the training set in
**training-time sampling mode**, with no backward pass and no change to the model:

* ``model.train()`` so that the RPN uses its training proposal counts and the RoI heads match
  and sample 512 RoIs per image (at most 25 % positives, GT boxes added) exactly as in training;
  but every BatchNorm-like layer (``_NormBase``: BatchNorm, SyncBatchNorm, InstanceNorm with
  running stats) and every Dropout layer is put back in **eval mode**, so features are computed
  with the trained running statistics (as at test time) and the running statistics are not
  updated. The forward also computes the training losses (the heads need them); they are
  discarded.
* ``torch.no_grad()``; afterwards every buffer of the model (BatchNorm statistics, state of
  stateful losses whose ``update`` ran during the pass) is restored to its value before the pass
  and every module's train/eval flag is restored. Parameters are never touched (no backward, no
  optimizer).
* The training augmentation is whatever the data loader's dataset applies; the resize/scale
  jitter is the model's own transform in training mode.
* The data loader yields ``(images, targets)`` as lists (taildet's ``list_collate``); targets use
  the model's label convention (taildet: ``0..C-1``; plain torchvision: ``1..C``).

Which logits are accumulated:

Every taildet detector is read through its classification head ``model.cls_head``
(:class:`~taildet.models.heads.ClassificationHead`) only: its ``record`` of the last training
forward, its class count / background column, its ``stage`` and its ``logit_transform``.

* taildet two-stage (:class:`~taildet.models.two_stage.TailRoIHeads`):
  ``cls_head.record.logits`` -- all sampled RoIs, positives and negatives (spec
  section 1). The normalizer has a background column iff the loss does (softmax heads); sigmoid
  RoI heads (BCE, EQL) get ``background=False, beta="min_fg"`` (see below).
* taildet one-stage (RetinaNet / FCOS, sigmoid focal-type losses): ``cls_head.record`` --
  the logits of every **non-ignored** anchor (positives and negatives; RetinaNet's
  between-threshold anchors are left out because training never sees them). The ``C`` sigmoid
  columns are normalised with ``background=False, beta="min_fg"``: a sigmoid score is a two-way
  softmax against an implicit background logit 0, which LogN keeps fixed, so the foreground logit
  gets the detection formula ``(z - mu + beta) / sigma``. Plain centring (no beta) would push every
  class's mean logit -- dominated by easy negatives -- to 0, i.e. a score of 0.5 for most anchors.
  Note that over dense anchors the statistics are dominated by background locations, much more
  than the 75 % negatives of two-stage sampling.
* a plain torchvision ``FasterRCNN``/``MaskRCNN`` (:func:`calibrate_torchvision_model`), read
  through :class:`TorchvisionRoIHead`, an adapter with the same attributes: the box predictor's
  class logits of ``RoIHeads.select_training_samples``' RoIs, background column 0.

Distributed: call it on every rank with a data loader over that rank's shard (e.g. a
``DistributedSampler``); with ``sync=True`` the ranks' exact moments are merged
(:meth:`LogitNormalizer.sync`) so every rank returns the statistics of the whole set.

:func:`collect_running_statistics` is the other source of LogN statistics, for detectors trained
with BatchNorm on their logits (``model.logit_bn``, LogN's released recipe): it continues that
BatchNorm's running statistics, as the authors' 0-lr fine-tune does (see its docstring).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from taildet.calibration.install import apply_logit_normalization, remove_logit_normalization
from taildet.calibration.logit_norm import LogitNormalizer, load_normalizers
from taildet.errors import ConfigError
from taildet.calibration.heads import (Head, TorchvisionRoIHead, classification_head, classification_heads,
                                      select_stage)
from taildet.models.heads import ClassificationHead, SampledLogits
from taildet.utils.comm import is_main_process

__all__ = [
    "collect_logit_statistics",
    "apply_logit_normalization",
    "remove_logit_normalization",
    "calibrate_torchvision_model",
    "apply_calibration",
    "training_sampling_mode",
    "classification_head",
    "select_stage",
    "TorchvisionRoIHead",
    "collect_running_statistics",
    "find_logit_batchnorm",
    "RUNNING_MOMENTUM",
]

#: The momentum with which the authors' 0-lr fine-tune continues the logits' BatchNorm statistics.
RUNNING_MOMENTUM = 5e-5

log = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _sampled(model: nn.Module, head: Head, images: list[Tensor], targets: list[dict]) -> SampledLogits:
    """The training-time classification inputs of one batch: the rows the loss uses."""
    if isinstance(head, TorchvisionRoIHead):
        return head.sampled(images, targets)
    model(images, targets)
    assert head.record is not None, "the detector's training forward fills cls_head.record"
    return head.record.kept()


@contextlib.contextmanager
def training_sampling_mode(model: nn.Module, keep: Iterable[Tensor] = ()) -> Iterator[nn.Module]:
    """Context: ``model.train()`` with norm/dropout layers in eval mode, ``torch.no_grad()``; on
    exit the train/eval flags and every buffer (except the tensors in ``keep``) are restored."""
    keep_ids = {id(t) for t in keep}
    modes = {m: m.training for m in model.modules()}
    saved = [(b, b.detach().clone()) for _, b in model.named_buffers() if id(b) not in keep_ids]
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)):
            m.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _to_device(images: Sequence[Tensor], targets: Sequence[dict], device: torch.device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def _find_class_names(data_loader: Any) -> list[str] | None:
    obj = getattr(data_loader, "dataset", None)
    for _ in range(8):
        if obj is None:
            return None
        names = getattr(obj, "class_names", None)
        if names is not None:
            return [str(n) for n in names]
        obj = getattr(obj, "dataset", None)
    return None


def _new_normalizer(head: Head, class_names: list[str] | None, **kw: Any) -> LogitNormalizer:
    """A :class:`LogitNormalizer` shaped for ``head``: a background column where it has one
    (kept unchanged), else ``C`` sigmoid columns with ``beta="min_fg"`` by default."""
    k, c, bg = head.num_outputs, head.num_classes, head.background_index
    if bg == 0:  # torchvision: background first
        norm = LogitNormalizer(c, background=True, class_names=class_names, background_index=0, **kw)
    elif bg is not None:
        norm = LogitNormalizer(c, background=True, class_names=class_names, **kw)
    elif k == c:
        kw.setdefault("beta", "min_fg")
        norm = LogitNormalizer(c, background=False, class_names=class_names, **kw)
    else:
        raise ConfigError(f"LogN supports heads with C or C + 1 outputs; {type(head.loss).__name__} has {k} for C = {c}")
    norm.stage = head.stage
    return norm


def _progress_bar(data_loader: Any, max_batches: int | None, progress: bool, desc: str):
    """A tqdm bar over the batches a pass will take (on rank 0 only, when ``progress`` and there
    is at least one batch), or None."""
    total = None
    with contextlib.suppress(TypeError):  # an iterable loader has no length: a bar without a total
        total = len(data_loader)  # type: ignore[arg-type]
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    rank0 = is_main_process()
    if not (progress and rank0) or total == 0:
        return None
    from tqdm import tqdm  # optional: tqdm, imported on use

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True)


def _accumulate_stages(model: nn.Module, heads: Mapping[str, Head], norms: Mapping[str, LogitNormalizer],
                       data_loader: Iterable, device: torch.device, max_batches: int | None, progress: bool,
                       positives: Any) -> int:
    """The statistics pass shared by :func:`collect_logit_statistics` (one head) and
    :func:`taildet.calibration.stages.collect_stage_statistics` (every stage): each batch's
    training-time sampled logits of ``heads[k]`` go into ``norms[k]``; ``positives`` gets the last
    head's. One head is read through :func:`_sampled`; several through one training forward that
    fills every head's ``record``. Returns the number of batches."""
    last = list(heads)[-1]
    bar = _progress_bar(data_loader, max_batches, progress, "LogN statistics")
    restores = [_record_only_logits(h) for h in heads.values()]
    batches = 0
    try:
        with training_sampling_mode(model, keep=[b for n in norms.values() for b in n.buffers()]):
            for batch in data_loader:
                if max_batches is not None and batches >= max_batches:
                    break
                images, targets = _to_device(list(batch[0]), list(batch[1]), device)
                if len(heads) == 1:
                    records = {last: _sampled(model, heads[last], images, targets)}
                else:
                    for h in heads.values():
                        h.clear()
                    model(images, targets)
                    records = {k: h.record.kept() for k, h in heads.items()}  # type: ignore[union-attr]
                for k, rec in records.items():
                    norms[k].update(rec.logits)
                if positives is not None and isinstance(heads[last], ClassificationHead):
                    positives.add(records[last].logits, records[last].labels)
                batches += 1
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for restore in restores:
            restore()
    return batches


def collect_logit_statistics(
    model: nn.Module,
    data_loader: Iterable,
    *,
    device: str | torch.device = "cpu",
    normalizer: LogitNormalizer | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    class_names: Sequence[str] | None = None,
    sync: bool = True,
    positives: Any = None,
    **normalizer_kwargs: Any,
) -> LogitNormalizer:
    """Accumulate LogN statistics of ``model``'s training-time sampled logits (see module doc).

    Args:
        model: a taildet detector (two- or one-stage) or a plain torchvision Faster/Mask R-CNN
            (optionally DDP-wrapped). It is moved to ``device``; its parameters, buffers and
            train/eval flags are as before on return.
        data_loader: yields ``(images, targets)`` lists -- the training set with its augmentation.
        normalizer: accumulate into this one (e.g. to continue a pass); default a new
            :class:`LogitNormalizer` of the right shape (``normalizer_kwargs``: ``momentum``,
            ``mode``, ``beta``, ... for it).
        max_batches: stop after this many batches (None = the whole loader).
        class_names: saved with the statistics; default the dataset's ``class_names`` if any.
        sync: merge the statistics over DDP ranks at the end (no-op in one process).
        positives: optional :class:`~taildet.calibration.diagnostics.PositiveLogitSample` that
            receives each batch's raw logits and labels (taildet detectors only), for
            :func:`~taildet.calibration.diagnostics.background_argmax_share`.
    Returns:
        the normalizer (on ``device``), with ``stage`` set to ``"roi_heads"`` or ``"head"``.
    """
    device = torch.device(device)
    model = _unwrap(model)
    head = classification_head(model)
    model.to(device)
    if class_names is None:
        class_names = _find_class_names(data_loader)
    if normalizer is None:
        normalizer = _new_normalizer(head, list(class_names) if class_names is not None else None,
                                     **normalizer_kwargs)
    elif normalizer_kwargs:
        raise ValueError(f"normalizer given: unexpected arguments {sorted(normalizer_kwargs)}")
    normalizer.to(device)

    before = float(normalizer.count)
    batches = _accumulate_stages(model, {head.stage: head}, {head.stage: normalizer}, data_loader, device,
                                 max_batches, progress, positives)
    rows = int(float(normalizer.count) - before)
    if sync:
        normalizer.sync()
    if float(normalizer.count) == 0:
        raise ValueError("collect_logit_statistics: the data loader gave no logits (empty loader?)")
    log.info("LogN statistics: %d batches, %d logit rows on this rank, %d in total",
             batches, rows, int(normalizer.count))
    return normalizer


def _record_only_logits(head: Head):
    """Make a taildet head record its logits but not its features (not needed here; saves
    memory) for a pass; returns the function that restores both flags."""
    if not isinstance(head, ClassificationHead):
        return lambda: None
    saved = head.record_logits, head.record_features
    head.record_logits, head.record_features = True, False

    def restore() -> None:
        head.record_logits, head.record_features = saved

    return restore


def find_logit_batchnorm(model: nn.Module) -> nn.Module | None:
    """The BatchNorm on a taildet R-CNN's class logits (``model.logit_bn``: ``cls_head.logit_bn``),
    or None."""
    bn = classification_head(model).logit_bn
    return bn if isinstance(bn, nn.modules.batchnorm._BatchNorm) else None


def collect_running_statistics(
    model: nn.Module,
    data_loader: Iterable,
    *,
    momentum: float = RUNNING_MOMENTUM,
    device: str | torch.device = "cpu",
    progress: bool = True,
    max_batches: int | None = None,
    class_names: Sequence[str] | None = None,
    sync: bool = True,
    positives: Any = None,
    **normalizer_kwargs: Any,
) -> LogitNormalizer:
    """LogN statistics from the running statistics of the BatchNorm on the logits, continued.

    For a taildet R-CNN trained with ``model.logit_bn`` (LogN's released recipe). The authors'
    "post-hoc" step is a one-epoch fine-tune at learning rate 0 whose only effect is to continue
    that BatchNorm's running statistics with momentum 5e-5 over the training data; their eval
    forward then applies LogN with those statistics (background column unchanged). This does the
    same without an optimizer: the pass of :func:`collect_logit_statistics` (training-time RoI
    sampling, other norm layers and dropout in eval mode, no gradient), except that the logits'
    BatchNorm is in **training mode with momentum** ``momentum``, so each batch (all sampled RoIs
    of the loader's batch) updates, starting from the checkpoint's values::

        running_mean <- (1 - m) running_mean + m mean_batch(z)
        running_var  <- (1 - m) running_var  + m var_batch(z)     (unbiased, divide by n - 1)

    where ``z`` are the raw logits of the sampled RoIs. The result becomes a
    :class:`LogitNormalizer` in EMA mode (``momentum`` recorded; ``mean`` = running mean,
    ``var`` = running variance, ``count`` = rows seen) with ``normalizer_kwargs`` (``mode``,
    ``beta``). The model is left as it was (its running statistics included). With
    ``max_batches=0`` the checkpoint's running statistics are used as they are.

    Distributed: each rank continues the statistics over its shard from the same start; with
    ``sync=True`` the ranks' means and variances are averaged (the reference keeps rank 0's).
    """
    device = torch.device(device)
    model = _unwrap(model)
    head = classification_head(model)
    bn = find_logit_batchnorm(model)
    if bn is None:
        raise ConfigError("LogN statistics from running statistics need a two-stage detector trained with "
                          "model.logit_bn: true (BatchNorm on the class logits); use the statistics pass otherwise")
    for key in ("momentum", "ema_init"):
        if key in normalizer_kwargs:
            raise ConfigError(f"running statistics: {key!r} does not apply (the continuation momentum is "
                              "the 'momentum' argument of collect_running_statistics)")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 < float(momentum) <= 1.0:
        raise ConfigError(f"running statistics: momentum must be in (0, 1], got {momentum!r}")
    momentum = float(momentum)
    model.to(device)
    if class_names is None:
        class_names = _find_class_names(data_loader)
    normalizer = _new_normalizer(head, list(class_names) if class_names is not None else None,
                                 momentum=momentum, **normalizer_kwargs)
    if normalizer.num_outputs != bn.num_features:
        raise ConfigError(f"the logits' BatchNorm has {bn.num_features} columns, the classifier {normalizer.num_outputs}")
    normalizer.to(device)

    bar = _progress_bar(data_loader, max_batches, progress, "LogN running statistics")

    raw: list[Tensor] = []

    def grab(module: nn.Module, args: Any) -> None:
        raw.append(args[0].detach())  # the raw logits, before the BatchNorm

    hook = bn.register_forward_pre_hook(grab)
    saved_momentum = bn.momentum
    restore = _record_only_logits(head)
    batches = rows = 0
    try:
        with training_sampling_mode(model, keep=list(normalizer.buffers())):
            bn.train()  # the one norm layer that updates (its buffers are restored on exit)
            bn.momentum = momentum
            for batch in data_loader:
                if max_batches is not None and batches >= max_batches:
                    break
                images, targets = _to_device(list(batch[0]), list(batch[1]), device)
                raw.clear()
                sampled = _sampled(model, head, images, targets)
                z = raw[-1] if raw else sampled.logits  # a 1-row call is returned raw
                if positives is not None:
                    positives.add(z, sampled.labels)
                if z.shape[0] > 1:  # a 1-row call is not batch-normalised (see TailBoxPredictor)
                    rows += z.shape[0]
                batches += 1
                if bar is not None:
                    bar.update(1)
            running_mean = bn.running_mean.detach().to(torch.float64).clone()
            running_var = bn.running_var.detach().to(torch.float64).clone()
    finally:
        hook.remove()
        bn.momentum = saved_momentum
        restore()
        if bar is not None:
            bar.close()
    with torch.no_grad():
        normalizer.mean.copy_(running_mean.to(normalizer.mean.device))
        normalizer.running_var.copy_(running_var.to(normalizer.mean.device))
        normalizer.count.fill_(float(max(rows, 1)))  # >= 1: the checkpoint's statistics count as data
    normalizer._cache = None
    if sync:
        normalizer._synced = False
        normalizer.sync()
    log.info("LogN running statistics: %d batches, %d logit rows on this rank (momentum %g)", batches, rows, momentum)
    return normalizer


# ---------------------------------------------------------------------------------------------
# applying


def calibrate_torchvision_model(
    model: nn.Module,
    data_loader: Iterable,
    *,
    device: str | torch.device = "cpu",
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    save_path: str | os.PathLike | None = None,
    **normalizer_kwargs: Any,
) -> nn.Module:
    """One call: LogN for your own torchvision ``FasterRCNN`` / ``MaskRCNN`` (not taildet's).

    Runs the statistics pass over ``data_loader`` (``(images, targets)`` lists in torchvision's
    convention: labels ``1..C``, 0 = background), then applies the normalizer (background column 0
    unchanged) with :func:`apply_logit_normalization` and returns the same model, now calibrated
    in eval mode. ``save_path``: also write the statistics file. ``normalizer_kwargs``:
    ``momentum``, ``mode``, ``beta``, ... of :class:`LogitNormalizer`.
    """
    model = _unwrap(model)
    if not isinstance(classification_head(model), TorchvisionRoIHead):
        raise ConfigError(
            f"calibrate_torchvision_model is for plain torchvision R-CNNs; for {type(model).__name__} use "
            "collect_logit_statistics + apply_logit_normalization"
        )
    norm = collect_logit_statistics(model, data_loader, device=device, progress=progress, max_batches=max_batches,
                                    class_names=class_names, **normalizer_kwargs)
    if save_path is not None:
        norm.save(save_path, extra={"model": type(model).__name__, "background_index": 0})
    return apply_logit_normalization(model, norm)


def apply_calibration(model: nn.Module, path: str | os.PathLike, class_names: Sequence[str] | None = None,
                      stage: str | None = None) -> nn.Module:
    """Load a statistics file for ``model`` (its class count, and ``class_names`` when given, are
    checked) and apply it. ``stage`` default: ``"roi_heads"`` for R-CNNs, ``"head"`` for one-stage
    models, or the file's only stage; a cascade takes every stage from its own entry."""
    heads = classification_heads(model)
    stages = load_normalizers(path, class_names=class_names, num_classes=next(iter(heads.values())).num_classes)
    if len(heads) > 1:  # a cascade: each stage its own statistics
        if stage is not None:
            raise ConfigError(f"a cascade applies every stage of {path}; stage={stage!r} picks one")
        return apply_logit_normalization(model, {k: select_stage(stages, h, path, k) for k, h in heads.items()})
    return apply_logit_normalization(model, select_stage(stages, next(iter(heads.values())), path, stage))
