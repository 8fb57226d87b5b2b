"""Image samplers for long-tailed detection: random, repeat factor (RFS) and class-balanced.

Every sampler here is a :class:`torch.utils.data.Sampler` of dataset indices that is

* **seeded and resumable by epoch** -- the order of epoch ``e`` is a pure function of
  ``(seed, epoch)``. Call :meth:`set_epoch` before each epoch (as with torch's
  ``DistributedSampler``); a run resumed at epoch ``e`` that calls ``set_epoch(e)`` yields exactly
  the indices the interrupted run would have yielded. Random streams come from
  ``numpy.random.SeedSequence([seed, epoch, stream])``, so ``(seed=0, epoch=1)`` and
  ``(seed=1, epoch=0)`` do not collide (unlike ``seed + epoch``).
* **DDP-aware** -- ``num_replicas`` and ``rank`` default to the world size and rank of the
  initialised default process group, else 1 and 0. Each epoch the sampler builds one global index
  list (identical on every rank), pads it by repeating from its start to a multiple of
  ``num_replicas`` and gives rank ``k`` the positions ``k, k + R, k + 2R, ...`` -- the same
  layout as ``torch.utils.data.DistributedSampler(drop_last=False)``. The shards are disjoint
  positions of the padded list; together they cover the epoch's list once, plus at most
  ``R - 1`` padded entries. ``len(sampler)`` is the per-rank count.

Input is ``labels_per_image``: for each dataset index, the contiguous class labels (``0..C-1``)
present in that image, possibly empty -- the ``labels_per_image`` attribute of
``taildet.data.lvis.LVISDataset``. Each sampler also has ``from_dataset(ds, **kw)``.

Repeat factor sampling (Gupta et al., LVIS, 2019; methods.md section 5)::

    f_c = (# images containing c) / (# images)
    r_c = max(1, sqrt(t / f_c))
    r_I = max_{c in I} r_c        (r_I = 1 for images without annotations)

With LVIS's ``t = 0.001`` on a dataset of about 1,000 images every ``f_c >= 0.001``, so every
``r_c = 1`` and RFS does nothing. :meth:`RepeatFactorSampler.threshold_for_dataset` returns
``t = 100 / N``, which keeps LVIS's meaning ("classes seen in fewer than about 100 images are
repeated") on any dataset size; on LVIS v1 (about 100k images) it is the paper's 0.001.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Sampler

from taildet.errors import ConfigError, DataError
from taildet.utils.comm import get_rank, get_world_size

__all__ = [
    "SAMPLERS",
    "build_sampler",
    "TrainingSampler",
    "RandomSampler",
    "RepeatFactorSampler",
    "ClassBalancedSampler",
    "labels_to_arrays",
]

log = logging.getLogger(__name__)

_LABELS_NAME = "labels_per_image"

# Independent random streams per (seed, epoch).
_STREAM_ROUNDING = 0
_STREAM_SHUFFLE = 1
_STREAM_CLASS_DRAW = 2


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, stream]))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None:
        num_replicas = get_world_size()
    if rank is None:
        rank = get_rank()
    num_replicas = _check_int("num_replicas", num_replicas, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas - 1] = [0, {num_replicas - 1}], got {rank}")
    return num_replicas, rank


def labels_to_arrays(
    labels_per_image: Sequence[Any], num_classes: int | None = None
) -> tuple[list[np.ndarray], int]:
    """Validate ``labels_per_image`` and return (unique int64 label arrays, num_classes).

    Accepts lists, numpy arrays or tensors per image. ``num_classes`` defaults to the largest label
    plus one. Raises :class:`DataError` naming the image for non-integer or out-of-range labels,
    and for an empty dataset.
    """
    if labels_per_image is None:
        raise DataError(_LABELS_NAME, "", "labels_per_image is None; expected one label array per image")
    try:
        n = len(labels_per_image)
    except TypeError:
        raise DataError(
            _LABELS_NAME, "", f"expected a sequence of label arrays, got {type(labels_per_image).__name__}"
        ) from None
    if n == 0:
        raise DataError(_LABELS_NAME, "", "the dataset is empty (no images); a sampler needs at least one image")
    if num_classes is not None:
        num_classes = _check_int("num_classes", num_classes, 1)
    arrays: list[np.ndarray] = []
    for i, lab in enumerate(labels_per_image):
        if isinstance(lab, torch.Tensor):
            lab = lab.detach().cpu().numpy()
        arr = np.asarray(lab)
        if arr.size == 0:
            arrays.append(np.zeros(0, dtype=np.int64))
            continue
        if arr.ndim > 1:
            raise DataError(_LABELS_NAME, f"image {i}", f"labels must be a 1-D array, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise DataError(
                _LABELS_NAME, f"image {i}", f"labels must be integers (contiguous class labels), got dtype {arr.dtype}"
            )
        arr = np.unique(arr.astype(np.int64).reshape(-1))
        if arr[0] < 0:
            raise DataError(_LABELS_NAME, f"image {i}", f"label {int(arr[0])} is negative")
        if num_classes is not None and arr[-1] >= num_classes:
            raise DataError(
                _LABELS_NAME,
                f"image {i}",
                f"label {int(arr[-1])} is out of range for num_classes={num_classes} (labels must be 0..{num_classes - 1})",
            )
        arrays.append(arr)
    if num_classes is None:
        num_classes = max((int(a[-1]) + 1 for a in arrays if a.size), default=0)
    return arrays, num_classes


def _image_counts(arrays: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Number of images containing each class (labels are unique per image)."""
    if num_classes == 0:
        return np.zeros(0, dtype=np.int64)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes).astype(np.int64)


class _EpochShardedSampler(Sampler[int], abc.ABC):
    """Shared machinery: seed/epoch state, padding and per-rank sharding of a global index list."""

    def __init__(self, seed: int, num_replicas: int | None, rank: int | None):
        self.seed = _check_int("seed", seed, 0)
        self.num_replicas, self.rank = _resolve_replicas(num_replicas, rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next ``iter()`` yields (a pure function of seed, epoch)."""
        self.epoch = _check_int("epoch", epoch, 0)

    # Subclasses implement these two.
    @abc.abstractmethod
    def _global_size(self, epoch: int) -> int:
        """Length of the epoch's global index list, before padding."""

    @abc.abstractmethod
    def global_indices(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's global index list (int64, identical on every rank), before padding."""

    def _shard(self, indices: np.ndarray) -> np.ndarray:
        total = len(indices)
        if total == 0:
            return indices
        per_rank = math.ceil(total / self.num_replicas)
        padded_size = per_rank * self.num_replicas
        if padded_size > total:
            reps = math.ceil(padded_size / total)
            indices = np.tile(indices, reps)[:padded_size]
        return indices[self.rank : padded_size : self.num_replicas]

    def rank_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's indices for ``epoch`` (default: the current epoch)."""
        return self._shard(self.global_indices(epoch))

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices(self.epoch).tolist())

    def __len__(self) -> int:
        return math.ceil(self._global_size(self.epoch) / self.num_replicas)


class TrainingSampler(_EpochShardedSampler):
    """Each image once per epoch, shuffled (or in order) -- the plain "random sampling" baseline.

    Args:
        num_images: dataset size (> 0).
        shuffle: shuffle each epoch with a permutation drawn from (seed, epoch).
        seed: non-negative integer seed.
        num_replicas, rank: DDP layout; default from ``torch.distributed`` when initialised, else 1/0.
    """

    def __init__(
        self,
        num_images: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)):
            raise ValueError(f"num_images must be an integer, got {num_images!r}")
        if num_images <= 0:
            raise DataError("dataset", "", f"num_images must be > 0 (the dataset is empty), got {num_images}")
        super().__init__(seed, num_replicas, rank)
        self.num_images = int(num_images)
        self.shuffle = bool(shuffle)

    @classmethod
    def from_dataset(cls, ds: Any, **kw: Any) -> "TrainingSampler":
        return cls(len(ds), **kw)

    def _global_size(self, epoch: int) -> int:
        return self.num_images

    def global_indices(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else _check_int("epoch", epoch, 0)
        if self.shuffle:
            return _rng(self.seed, epoch, _STREAM_SHUFFLE).permutation(self.num_images).astype(np.int64)
        return np.arange(self.num_images, dtype=np.int64)


RandomSampler = TrainingSampler


class RepeatFactorSampler(_EpochShardedSampler):
    """Repeat factor sampling (RFS): image ``I`` appears ``r_I`` times per epoch in expectation.

    ``r_c = max(1, sqrt(threshold / f_c))`` with ``f_c`` the fraction of images containing class
    ``c``; ``r_I`` is the maximum over the classes in ``I`` and 1 for images without labels.

    Rounding of the (real) repeat factor to an integer number of copies per epoch:

    * ``"stochastic"`` (default): ``floor(r_I) + Bernoulli(frac(r_I))``, redrawn each epoch from
      ``(seed, epoch)``; the expected number of copies is exactly ``r_I``. The epoch length
      therefore varies from epoch to epoch: ``len(sampler)`` is the per-rank count **of the
      current epoch** (call :meth:`set_epoch` first), and ``expected_num_samples`` is
      ``sum(r_I)``.
    * ``"ceil"``: ``ceil(r_I)`` copies every epoch (deterministic, over-samples slightly; a
      factor within 1e-9 above an integer counts as that integer).

    Attributes:
        repeat_factors: ``np.float64`` array, ``r_I`` per image.
        category_repeat_factors: ``np.float64`` array, ``r_c`` per class (1 for classes in no image).
        image_counts: number of images containing each class.

    Args:
        labels_per_image: per dataset index, the contiguous labels present (possibly empty).
        num_classes: number of foreground classes; default largest label + 1.
        threshold: ``t`` > 0; LVIS uses 0.001. On small datasets use
            :meth:`threshold_for_dataset` (``100 / num_images``), see the module docstring.
        rounding: ``"stochastic"`` or ``"ceil"``.
        shuffle: shuffle the repeated list each epoch (else copies in index order).
        seed, num_replicas, rank: as for :class:`TrainingSampler`.
    """

    ROUNDINGS = ("stochastic", "ceil")

    def __init__(
        self,
        labels_per_image: Sequence[Any],
        num_classes: int | None = None,
        threshold: float = 0.001,
        rounding: str = "stochastic",
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        try:
            t = float(threshold)
        except (TypeError, ValueError):
            raise ValueError(f"threshold must be a positive number, got {threshold!r}") from None
        if not math.isfinite(t) or t <= 0:
            raise ValueError(f"threshold must be a positive finite number, got {threshold!r}")
        if rounding not in self.ROUNDINGS:
            raise ValueError(f"rounding must be one of {self.ROUNDINGS}, got {rounding!r}")
        super().__init__(seed, num_replicas, rank)
        arrays, self.num_classes = labels_to_arrays(labels_per_image, num_classes)
        self.num_images = len(arrays)
        self.threshold = t
        self.rounding = rounding
        self.shuffle = bool(shuffle)

        self.image_counts = _image_counts(arrays, self.num_classes)
        freq = self.image_counts / float(self.num_images)
        with np.errstate(divide="ignore"):
            r_c = np.where(freq > 0, np.sqrt(t / np.where(freq > 0, freq, 1.0)), 1.0)
        self.category_repeat_factors = np.maximum(1.0, r_c).astype(np.float64)
        self.repeat_factors = np.array(
            [self.category_repeat_factors[a].max() if a.size else 1.0 for a in arrays], dtype=np.float64
        )
        self._cached_epoch: int | None = None
        self._cached_repeats: np.ndarray | None = None

    @classmethod
    def from_dataset(cls, ds: Any, **kw: Any) -> "RepeatFactorSampler":
        """Build from a dataset exposing ``labels_per_image`` and ``num_classes``."""
        kw.setdefault("num_classes", ds.num_classes)
        return cls(ds.labels_per_image, **kw)

    @staticmethod
    def threshold_for_dataset(num_images: int, target_images: float = 100) -> float:
        """``t = target_images / num_images``: classes in fewer than ``target_images`` images repeat.

        LVIS's ``t = 0.001`` on ~100k images means "repeat classes seen in fewer than ~100
        images"; on a 1,000-image dataset ``t = 0.001`` repeats nothing. This keeps the meaning.
        The result may exceed 1 when ``num_images < target_images`` (then every class repeats).
        """
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images <= 0:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
        if not (isinstance(target_images, (int, float, np.integer, np.floating)) and target_images > 0):
            raise ValueError(f"target_images must be a positive number, got {target_images!r}")
        return float(target_images) / float(num_images)

    @property
    def expected_num_samples(self) -> float:
        """Expected global epoch size, ``sum(r_I)`` (exact size for ``rounding="ceil"``)."""
        if self.rounding == "ceil":
            return float(self._ceil_repeats().sum())
        return float(self.repeat_factors.sum())

    def repeats(self, epoch: int | None = None) -> np.ndarray:
        """Integer number of copies of each image in ``epoch`` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else _check_int("epoch", epoch, 0)
        if self.rounding == "ceil":
            return self._ceil_repeats()
        if self._cached_epoch == epoch and self._cached_repeats is not None:
            return self._cached_repeats.copy()
        base = np.floor(self.repeat_factors)
        frac = self.repeat_factors - base
        u = _rng(self.seed, epoch, _STREAM_ROUNDING).random(self.num_images)
        reps = (base + (u < frac)).astype(np.int64)
        self._cached_epoch, self._cached_repeats = epoch, reps
        return reps.copy()

    def _ceil_repeats(self) -> np.ndarray:
        # Tolerance so that a factor that is an integer up to rounding error (t = 0.27, f = 0.03
        # gives 3.0000000000000004 in floating point) is not bumped to the next integer.
        return np.ceil(self.repeat_factors - 1e-9).astype(np.int64)

    def _global_size(self, epoch: int) -> int:
        return int(self.repeats(epoch).sum())

    def global_indices(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else _check_int("epoch", epoch, 0)
        idx = np.repeat(np.arange(self.num_images, dtype=np.int64), self.repeats(epoch))
        if self.shuffle:
            idx = idx[_rng(self.seed, epoch, _STREAM_SHUFFLE).permutation(len(idx))]
        return idx


class ClassBalancedSampler(_EpochShardedSampler):
    """Class-balanced image sampling: pick a class uniformly, then an image containing it.

    Only classes present in at least one image take part; images without labels are never
    drawn. Draws are with replacement, ``num_samples`` per epoch (global, before sharding;
    default the number of images), from ``(seed, epoch)``.

    Attributes:
        image_probabilities: ``np.float64`` per image, the probability that one draw returns it:
            ``sum_{c in I} 1 / (K * n_c)`` with ``K`` the number of classes present and ``n_c``
            the number of images containing ``c``. Sums to 1.
        image_counts: ``n_c`` per class.
        present_classes: the ``K`` classes with at least one image.
    """

    def __init__(
        self,
        labels_per_image: Sequence[Any],
        num_classes: int | None = None,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        super().__init__(seed, num_replicas, rank)
        arrays, self.num_classes = labels_to_arrays(labels_per_image, num_classes)
        self.num_images = len(arrays)
        self.num_samples = self.num_images if num_samples is None else _check_int("num_samples", num_samples, 1)

        self.image_counts = _image_counts(arrays, self.num_classes)
        self.present_classes = np.nonzero(self.image_counts)[0].astype(np.int64)
        if self.present_classes.size == 0:
            raise DataError(
                _LABELS_NAME, "", "no image has any label; class-balanced sampling needs at least one labelled image"
            )
        # CSR layout: images of class c are _members[_offsets[c] : _offsets[c] + image_counts[c]].
        img_of = np.repeat(np.arange(self.num_images, dtype=np.int64), [a.size for a in arrays])
        cls_of = np.concatenate(arrays) if img_of.size else np.zeros(0, dtype=np.int64)
        order = np.argsort(cls_of, kind="stable")
        self._members = img_of[order]
        self._offsets = np.concatenate([[0], np.cumsum(self.image_counts)[:-1]]).astype(np.int64)

        k = float(self.present_classes.size)
        probs = np.zeros(self.num_images, dtype=np.float64)
        w = np.zeros(self.num_classes, dtype=np.float64)
        w[self.present_classes] = 1.0 / (k * self.image_counts[self.present_classes])
        np.add.at(probs, img_of, w[cls_of])
        self.image_probabilities = probs

    @classmethod
    def from_dataset(cls, ds: Any, **kw: Any) -> "ClassBalancedSampler":
        """Build from a dataset exposing ``labels_per_image`` and ``num_classes``."""
        kw.setdefault("num_classes", ds.num_classes)
        return cls(ds.labels_per_image, **kw)

    def _global_size(self, epoch: int) -> int:
        return self.num_samples

    def global_indices(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else _check_int("epoch", epoch, 0)
        rng = _rng(self.seed, epoch, _STREAM_CLASS_DRAW)
        classes = self.present_classes[rng.integers(0, self.present_classes.size, size=self.num_samples)]
        counts = self.image_counts[classes]
        pos = self._offsets[classes] + rng.integers(0, counts)
        return self._members[pos]


# ----------------------------------------------------------------------------- the registry


def _random(dataset: Any, *, seed: int, **_: Any) -> TrainingSampler:
    return TrainingSampler(len(dataset), shuffle=True, seed=seed)


def _rfs(dataset: Any, *, seed: int, rfs_threshold: float | str = 0.001, rfs_rounding: str = "stochastic",
         **_: Any) -> RepeatFactorSampler:
    t = rfs_threshold
    if t == "auto":
        # LVIS's t = 0.001 on ~100k images = "repeat classes seen in < ~100 images"; keep
        # that meaning on any dataset size (t = 0.001 does nothing on a 1k-image set).
        t = RepeatFactorSampler.threshold_for_dataset(len(dataset))
        log.info("data.rfs_threshold auto: t = 100 / %d images = %.4g", len(dataset), t)
    return RepeatFactorSampler.from_dataset(dataset, threshold=t, rounding=rfs_rounding, seed=seed)


def _class_balanced(dataset: Any, *, seed: int, **_: Any) -> ClassBalancedSampler:
    return ClassBalancedSampler.from_dataset(dataset, seed=seed)


#: ``data.sampler`` names: ``factory(dataset, *, seed, rfs_threshold, rfs_rounding)`` -> sampler
#: (a factory takes the keywords it uses and ignores the rest). The config validates
#: ``data.sampler`` against this dict.
SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "random": _random,
    "rfs": _rfs,
    "class_balanced": _class_balanced,
}


def build_sampler(dataset: Any, sampler: str, *, seed: int, rfs_threshold: float | str = 0.001,
                  rfs_rounding: str = "stochastic") -> Sampler:
    """The training sampler named by ``data.sampler`` (a key of :data:`SAMPLERS`; DDP sharding built in)."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"data.sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    return SAMPLERS[sampler](dataset, seed=seed, rfs_threshold=rfs_threshold, rfs_rounding=rfs_rounding)
