"""The interface every classification loss in taildet follows.

A loss is an ``nn.Module`` that owns everything a classification method needs:

* its classifier width ``K`` for ``C`` foreground classes (:meth:`num_outputs`),
* its training loss (``forward``),
* its test-time score function (:meth:`scores`, logits ``[N, K]`` -> foreground scores ``[N, C]``),
* its classifier bias initialisation (:meth:`init_bias`),
* and any state it keeps (EMA vectors, gradient accumulators) as registered buffers, so that
  ``state_dict``, checkpoints and DDP reductions work with nothing but the loss's own file.

Two kinds exist, differing in the label convention of ``forward``:

``TwoStageLoss`` (RoI classification): ``forward(logits [N, K], labels [N] int64, weight [N] | None)``
with foreground labels ``0..C-1`` and background ``C``. ``update(logits, labels, gt_index)`` is
called by the RoI head after sampling and before the loss (no-op unless the loss keeps state that
must update then, e.g. the Equilibrium Loss).

``OneStageLoss`` (dense anchors): ``forward(logits [N, C], labels [N] int64, normalizer, quality=None)``
with ``0..C-1`` for positive anchors, ``C`` for negatives and ``-1`` for ignored anchors.

Hooks (all declared here with a no-op default, so callers never probe for them):

* ``update(logits, labels, gt_index)`` -- state update before the loss of the same step;
* ``before_backward(grad_scale)`` -- the AMP GradScaler's scale, before each backward (losses that
  accumulate gradient statistics divide by it, e.g. EFL);
* ``sync_state()`` -- reduce this module's own state over DDP ranks after each optimizer step
  (:func:`sync_states` calls it on every submodule that has one);
* ``observe_memory(logits, labels)`` -- memory-sampled rows (MFS) seen as observations only;
* ``uses_quality`` -- True when ``forward`` takes ``quality=`` (one-stage quality losses).

Training statistics are declared as data: ``needs`` names the per-class statistics of the
training set (a subset of :data:`DATASET_STATISTICS`) the constructor takes as keyword arguments;
the engine fills the ones a config leaves out (:func:`taildet.losses.fill_dataset_statistics`).

Every loss reduces its per-row terms with :func:`reduce_loss` (``sum_i w_i l_i / normalizer``).

:class:`SigmoidClassificationLoss` is the common base of the losses of either kind whose
classifier has ``C`` sigmoid outputs and no background column (``K = C``).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from taildet.utils.comm import all_reduce_mean, get_world_size

#: The per-class training-set statistics a loss may declare in ``needs`` (each a ``[C]`` vector of
#: the training set: instances per class, images per class, images per class / images).
DATASET_STATISTICS = ("instance_counts", "image_counts", "image_frequency")


def reduce_loss(values: Tensor, normalizer: Tensor | float, weight: Tensor | None = None) -> Tensor:
    """The one reduction of taildet's losses: ``sum_i w_i * values_i / normalizer``.

    ``values``: the loss terms of ``N`` rows, ``[N]`` or ``[N, ...]`` (every term of row ``i`` is
    multiplied by ``w_i``). ``weight``: ``[N]`` per-row weights, or None for ``w_i = 1`` (a plain
    sum: no multiplication). ``normalizer``, what the weighted sum is divided by, is the loss's
    choice:

    * two-stage losses: the number of RoIs ``N``, not ``sum(w)`` -- an all-ones weight gives the
      plain mean and a zero weight drops a row without re-weighting the others;
    * the Equilibrium Loss with a weight: the rows with ``w_i > 0``, at least 1 (the mean over the
      RoIs that count);
    * one-stage losses: the positive anchors averaged over DDP ranks, at least 1
      (:func:`default_normalizer`).
    """
    if weight is None:
        total = values.sum()
    else:
        total = (values * (weight if values.dim() <= 1 else weight.view(-1, *([1] * (values.dim() - 1))))).sum()
    return total / normalizer


def mean_over_ranks(value: Tensor) -> Tensor:
    """``value`` averaged over DDP ranks (a new, detached tensor) when running distributed, else
    ``value`` itself (:func:`taildet.utils.comm.all_reduce_mean`)."""
    return all_reduce_mean(value) if get_world_size() > 1 else value


def default_normalizer(num_pos: Tensor, normalizer: float | Tensor | None, dtype: torch.dtype) -> Tensor | float:
    """``normalizer`` if given, else the positive count averaged over DDP ranks; at least 1."""
    if normalizer is None:
        return mean_over_ranks(num_pos.to(dtype)).clamp(min=1.0)
    if isinstance(normalizer, Tensor):
        return normalizer.detach().to(dtype).clamp(min=1.0)
    return max(float(normalizer), 1.0)


class ClassificationLoss(nn.Module):
    """Common base: width, scores and bias initialisation. Subclasses set ``kind``."""

    kind: str = "two_stage"
    #: True when the classifier has a background column (softmax heads, K = C+1 with bg last).
    has_background: bool = True
    #: True when ``forward`` takes ``quality=[N]`` (IoU of positive anchors; one-stage QFL/EQFL).
    uses_quality: bool = False
    #: The training-set statistics (names in :data:`DATASET_STATISTICS`) the constructor takes as
    #: keyword arguments of the same names; the engine fills those a config does not give.
    needs: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        unknown = [n for n in cls.needs if n not in DATASET_STATISTICS]
        if unknown:
            raise TypeError(f"{cls.__name__}.needs: {unknown} not in DATASET_STATISTICS {DATASET_STATISTICS}")

    def __init__(self, num_classes: int):
        super().__init__()
        if int(num_classes) <= 0:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)

    def num_outputs(self) -> int:
        """Classifier width K for this loss (default: C + 1, background last)."""
        return self.num_classes + 1

    def scores(self, logits: Tensor) -> Tensor:
        """Test-time foreground scores ``[N, C]`` from logits ``[N, K]`` (default: softmax, drop bg)."""
        return torch.softmax(logits, dim=-1)[:, : self.num_classes]

    def init_bias(self, bias: Tensor) -> None:
        """Initialise the classifier bias ``[K]`` in place (default: zeros)."""
        with torch.no_grad():
            bias.zero_()

    def update(self, logits: Tensor, labels: Tensor, gt_index: Tensor | None = None) -> None:
        """State update before the loss of the same iteration (no-op by default)."""

    def before_backward(self, grad_scale: float) -> None:
        """The factor by which the coming backward's gradients exceed the true ones (the AMP
        GradScaler's scale, 1.0 without AMP); called before each backward (no-op by default)."""

    def sync_state(self) -> None:
        """Reduce this module's own state over DDP ranks, after each optimizer step (no-op by
        default, and expected to be a no-op without a process group). Submodules are synced by
        :func:`sync_states`, not by their parent."""

    def observe_memory(self, logits: Tensor, labels: Tensor) -> None:
        """Rows ``[M, K]`` / ``[M]`` of memory-sampled features (MFS) that the state should see as
        observations, without the loss training on them (no-op by default)."""


@runtime_checkable
class SyncsState(Protocol):
    """A module whose state is reduced over DDP ranks by ``sync_state()``."""

    def sync_state(self) -> None: ...


def sync_states(module: nn.Module, skip: tuple[type, ...] = ()) -> int:
    """Call ``sync_state()`` on ``module`` and every submodule that has one, except instances of
    ``skip`` (modules whose ``sync_state`` walks their own submodules); returns how many."""
    n = 0
    for m in module.modules():
        if isinstance(m, SyncsState) and not isinstance(m, skip):
            m.sync_state()
            n += 1
    return n


def prior_bias(prior: float) -> float:
    """Bias that makes ``sigmoid(bias) == prior`` (focal-loss style initialisation)."""
    return -math.log((1.0 - prior) / prior)


def check_prior(prior: float, owner: str = "") -> float:
    """``float(prior)``; a ``ValueError`` (prefixed with ``owner: `` if given) unless in (0, 1)."""
    if not 0.0 < float(prior) < 1.0:
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}prior must be in (0, 1), got {prior!r}")
    return float(prior)


class SigmoidClassificationLoss(ClassificationLoss):
    """Base of the losses with ``C`` independent sigmoid outputs and no background column.

    ``K = C``; test-time scores are ``sigmoid(logits)``; the classifier bias starts at
    :func:`prior_bias` of ``self.prior`` (subclasses set ``self.prior``, the initial foreground
    probability). ``kind`` is left to the subclass. ``extra_repr`` lists ``num_classes`` and the
    attributes named in ``repr_fields`` (empty by default: no extra repr).
    """

    has_background = False
    prior: float
    #: attribute names shown by :meth:`extra_repr` after ``num_classes``; empty: no extra repr.
    repr_fields: tuple[str, ...] = ()

    def num_outputs(self) -> int:
        return self.num_classes

    def scores(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    def init_bias(self, bias: Tensor) -> None:
        with torch.no_grad():
            bias.fill_(prior_bias(self.prior))

    def extra_repr(self) -> str:
        if not self.repr_fields:
            return ""
        fields = ("num_classes",) + tuple(self.repr_fields)
        return ", ".join(f"{name}={getattr(self, name)}" for name in fields)
