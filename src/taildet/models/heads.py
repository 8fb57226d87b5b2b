"""The classification-head contract between a detector and a long-tail method.

Every taildet detector owns one :class:`ClassificationHead` as ``model.cls_head``, two-stage and
one-stage alike. It is the only object calibration, comparison, inference and memory-augmented
sampling touch:

* ``loss`` -- the :class:`~taildet.losses.base.ClassificationLoss` (a registered submodule, so its
  state is in the ``state_dict`` as ``cls_head.loss.*``);
* ``logit_transform`` -- optional module applied to raw logits at inference before
  ``loss.scores`` (LogN, logit adjustment), registered as ``cls_head.logit_transform.*``;
* ``record`` -- a :class:`SampledLogits`: the classification inputs of the last training forward;
* :meth:`scores` -- test-time scores of raw logits;
* ``detections_per_img`` -- the detector's per-image detection cap;
* ``stage`` -- the name of the LogN statistics stage (``"roi_heads"`` or ``"head"``);
* ``logit_bn`` -- the BatchNorm on the classifier's logits when the detector has one (LogN's
  released recipe), else None: a reference only, the layer belongs to the detector;
* per-step hooks the trainer calls on every loss (:meth:`before_backward`, :meth:`sync_state`).

The detector's RoI heads or dense head hold an unregistered reference to the same object and call
into it (loss, state update, record); they keep no copy of the loss or the transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from taildet.losses.base import ClassificationLoss, sync_states

__all__ = ["ClassificationHead", "SampledLogits", "LEGACY_PREFIXES", "remap_legacy_keys"]


@dataclass
class SampledLogits:
    """The classification inputs of one training step (all tensors detached).

    ``N`` rows (sampled RoIs, or every anchor of the batch image-major), ``K`` classifier outputs,
    ``C`` foreground classes.

    Attributes:
        logits: ``[N, K]`` raw logits as the loss saw them (before any ``logit_transform``; after
            the predictor's ``logit_bn`` while that is in training mode).
        labels: ``[N]`` int64: ``0..C-1`` foreground, ``C`` background, ``-1`` ignored (one-stage
            anchors between the IoU thresholds; the loss never sees them).
        gt_index: ``[N]`` int64 index of the assigned GT box, unique over the batch, ``-1`` for
            background (what ``loss.update`` receives), or None (one-stage heads).
        image_index: ``[N]`` int64 image of each row within the batch, or None.
        features: ``[N, ...]`` the features the classifier branch started from (two-stage: pooled
            RoI features ``[N, ch, 7, 7]``), or None when not recorded.
    """

    logits: Tensor
    labels: Tensor
    gt_index: Tensor | None = None
    image_index: Tensor | None = None
    features: Tensor | None = None

    def kept(self) -> "SampledLogits":
        """The rows the loss used (labels ``>= 0``): ignored anchors dropped."""
        keep = self.labels >= 0
        if bool(keep.all()):
            return self
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[keep]

        return SampledLogits(self.logits[keep], self.labels[keep], pick(self.gt_index), pick(self.image_index),
                             pick(self.features))


class ClassificationHead(nn.Module):
    """The classification loss, logit transform, record and hooks of one detector.

    Args:
        loss: the classification loss; its ``kind`` must be the detector's.
        stage: the LogN statistics stage of the detector (``"roi_heads"`` two-stage, ``"head"``
            one-stage).
        detections_per_img: the detector's per-image detection cap (after NMS).
        logit_transform: optional module mapping raw logits ``[N, K]`` to adjusted ``[N, K]`` at
            inference.
        record_features: also keep the classifier branch's input features in :attr:`record`.

    ``record_logits`` (default True): whether training forwards fill :attr:`record` at all.
    ``logit_bn``: see :meth:`set_logit_bn`.
    """

    def __init__(self, loss: ClassificationLoss, *, stage: str, detections_per_img: int,
                 logit_transform: nn.Module | None = None, record_features: bool = False):
        super().__init__()
        if not isinstance(loss, ClassificationLoss):
            raise TypeError(f"ClassificationHead needs a ClassificationLoss, got {type(loss).__name__}")
        self.loss = loss
        self.logit_transform = logit_transform
        self.stage = str(stage)
        self.detections_per_img = int(detections_per_img)
        self.record_logits = True
        self.record_features = bool(record_features)
        self.record: SampledLogits | None = None
        self.logit_bn: nn.Module | None = None

    def set_logit_bn(self, bn: nn.Module | None) -> None:
        """Refer to the detector's BatchNorm on the raw logits (in training mode it normalises the
        logits the loss sees; its running statistics are a LogN source). Unregistered: the layer
        stays in the detector's ``state_dict`` where the detector put it."""
        object.__setattr__(self, "logit_bn", bn)

    # -- shape of the classifier ----------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """``C``, the foreground classes."""
        return self.loss.num_classes

    @property
    def num_outputs(self) -> int:
        """``K``, the classifier width (``C + 1`` with background last, or ``C``)."""
        return self.loss.num_outputs()

    @property
    def background_index(self) -> int | None:
        """The background column of the logits (``C``), or None for heads without one."""
        return self.num_classes if self.num_outputs == self.num_classes + 1 else None

    @property
    def uses_quality(self) -> bool:
        """True when the loss takes ``quality=`` (localisation quality of positive anchors)."""
        return bool(self.loss.uses_quality)

    # -- inference -------------------------------------------------------------------------------

    def transform(self, logits: Tensor) -> Tensor:
        """``logit_transform(logits)`` (``[N, K]`` -> ``[N, K]``), or ``logits`` when none is set."""
        return logits if self.logit_transform is None else self.logit_transform(logits)

    def scores(self, logits: Tensor) -> Tensor:
        """Test-time foreground scores ``[N, C]`` of raw logits ``[N, K]``:
        ``loss.scores(logit_transform(logits))``."""
        return self.loss.scores(self.transform(logits))

    # -- training --------------------------------------------------------------------------------

    def forward(self, logits: Tensor, labels: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The training loss: ``loss(logits [N, K], labels [N], *args, **kwargs)``."""
        return self.loss(logits, labels, *args, **kwargs)

    def update(self, logits: Tensor, labels: Tensor, gt_index: Tensor | None = None) -> None:
        """The loss's state update before its call of the same step (``loss.update``)."""
        self.loss.update(logits, labels, gt_index)

    def observe(self, logits: Tensor, labels: Tensor, gt_index: Tensor | None = None,
                image_index: Tensor | None = None, features: Tensor | None = None) -> None:
        """Keep this step's classification inputs as :attr:`record` (detached; ``features`` only
        with ``record_features``). No-op when ``record_logits`` is False."""
        if not self.record_logits:
            return
        feats = features.detach() if features is not None and self.record_features else None
        self.record = SampledLogits(logits.detach(), labels, gt_index, image_index, feats)

    def clear(self) -> None:
        """Forget the last record."""
        self.record = None

    # -- per-step hooks --------------------------------------------------------------------------

    def before_backward(self, grad_scale: float) -> None:
        """Called by the trainer before each backward with the AMP GradScaler's scale (1.0
        without AMP): forwarded to ``loss.before_backward``."""
        self.loss.before_backward(float(grad_scale))

    def sync_state(self) -> int:
        """Reduce the loss state over DDP ranks (every ``sync_state`` inside ``loss``); returns how
        many were called. No-op in one process."""
        return sync_states(self.loss)

    def observe_memory(self, logits: Tensor, labels: Tensor) -> None:
        """Memory-sampled rows (MFS) the loss observes without training on them."""
        self.loss.observe_memory(logits, labels)

    def extra_repr(self) -> str:
        return f"stage={self.stage!r}, detections_per_img={self.detections_per_img}"


#: State-dict prefixes of the code before ``model.cls_head`` and their new place.
LEGACY_PREFIXES = (
    ("roi_heads.loss.", "cls_head.loss."),
    ("roi_heads.logit_transform.", "cls_head.logit_transform."),
    ("cls_loss.", "cls_head.loss."),
    ("logit_transform.", "cls_head.logit_transform."),
)


def remap_legacy_keys(state_dict: dict, prefix: str = "") -> int:
    """Rename, in place, the keys of ``state_dict`` under ``prefix`` saved before the head contract
    (``roi_heads.loss.*``, ``cls_loss.*``, ``[roi_heads.]logit_transform.*``) to ``cls_head.*``.
    Returns how many keys were renamed; keys already in the new form are left alone."""
    n = 0
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        for old, new in LEGACY_PREFIXES:
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                n += 1
                break
    return n


def register_legacy_key_hook(model: nn.Module) -> None:
    """Make ``model.load_state_dict`` accept state dicts with the legacy key names
    (:func:`remap_legacy_keys` runs before the model reads its own entries)."""
    model._register_load_state_dict_pre_hook(_legacy_hook)


def _legacy_hook(state_dict: dict, prefix: str, *args: Any) -> None:
    remap_legacy_keys(state_dict, prefix)
