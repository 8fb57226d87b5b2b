"""Post-hoc calibration methods, selected by name through the plain dict :data:`CALIBRATORS`.

A method is a :class:`Calibrator`: built from its options (a compare recipe's
``posthoc_kwargs``), it declares in ``inputs`` what its :meth:`~Calibrator.fit` needs, and
``fit(head, **inputs)`` returns the logit transform for a detector's classification head
(:class:`~taildet.models.heads.ClassificationHead`; install it with
:func:`~taildet.calibration.apply_logit_normalization`), or None for no change.

``inputs`` names (the caller gathers them; this layer runs no training or data pass):

* ``"statistics"`` -- a LogN statistics file of the checkpoint (the training-time logit
  statistics pass, :func:`taildet.engine.calibrate_checkpoint`, with :attr:`LogN.pass_options`);
* ``"train_set"`` -- the training dataset (per-class instance / image counts).

Adding a method: a subclass with ``inputs`` and ``fit``, and one entry in :data:`CALIBRATORS`.
"""

from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from taildet.calibration.logit_adjust import LogitAdjuster
from taildet.calibration.logit_norm import LogitNormalizer, load_normalizers
from taildet.calibration.heads import Head, select_stage
from taildet.errors import ConfigError
from taildet.fileio import atomic_write_text

__all__ = ["Calibrator", "LogN", "LogA", "NoCalibration", "CALIBRATORS", "build_calibrator"]


class Calibrator(abc.ABC):
    """Base of the post-hoc methods: ``fit(head, **inputs) -> logit transform | None`` (abstract:
    every method defines its own ``fit``)."""

    #: what :meth:`fit` takes besides the head (see the module docstring).
    inputs: tuple[str, ...] = ()
    #: True for the method that leaves the model as it is (the caller may skip it altogether).
    identity: bool = False

    def __init__(self, **options: Any):
        if options:
            raise ConfigError(f"{type(self).__name__}: unknown option(s) {sorted(options)}")
        #: options of the statistics pass (methods with ``"statistics"`` in ``inputs``).
        self.pass_options: dict[str, Any] = {}

    def write_statistics(self, pass_file: str | os.PathLike, out: str | os.PathLike) -> str:
        """The ``"statistics"`` input of this method from the file of a statistics pass, written to
        ``out`` (default: an unchanged copy); returns ``out``."""
        doc = json.loads(Path(pass_file).read_text())
        return str(atomic_write_text(json.dumps(doc, indent=1) + "\n", out))

    @abc.abstractmethod
    def fit(self, head: Head, **inputs: Any) -> nn.Module | None:
        """The logit transform ``[N, K] -> [N, K]`` for ``head`` (None: no change)."""


class NoCalibration(Calibrator):
    """No method: the checkpoint as it is."""

    identity = True

    def fit(self, head: Head, **inputs: Any) -> None:
        return None


class LogA(Calibrator):
    """Post-hoc logit adjustment with the training prior (:class:`LogitAdjuster`).

    Options: ``prior_from`` (``"image"`` or ``"instance"`` counts), ``tau``. Softmax heads
    (``C + 1`` outputs) keep their background column; sigmoid heads adjust every column.
    """

    inputs = ("train_set",)

    def __init__(self, prior_from: str = "image", tau: float = 1.0):
        super().__init__()
        self.prior_from = prior_from
        self.tau = float(tau)

    def fit(self, head: Head, *, train_set: Any) -> LogitAdjuster:
        """``train_set``: has per-class ``instance_counts`` / ``image_counts`` and ``class_names``."""
        return LogitAdjuster.from_dataset(train_set, prior_from=self.prior_from, tau=self.tau,
                                          background=head.background_index is not None)


class LogN(Calibrator):
    """LogN: per-class logit normalization from the training-time logit statistics.

    Options split in two: :attr:`pass_options` change the statistics pass (``stats``,
    ``running_momentum``, ``momentum``, ...), :attr:`transform_options` (``mode``, ``beta``) only
    how its result is applied, so rows differing only in those can share one pass.
    """

    inputs = ("statistics",)
    #: options that change only how saved statistics are applied (not the statistics pass).
    TRANSFORM_ONLY = ("mode", "beta")

    def __init__(self, **options: Any):
        super().__init__()
        self.pass_options = {k: v for k, v in options.items() if k not in self.TRANSFORM_ONLY}
        self.transform_options = {k: v for k, v in options.items() if k in self.TRANSFORM_ONLY}

    def write_statistics(self, pass_file: str | os.PathLike, out: str | os.PathLike) -> str:
        """Copy the statistics file of a pass to ``out`` with :attr:`transform_options` set in
        every stage; returns ``out``."""
        doc = json.loads(Path(pass_file).read_text())
        for entry in doc["stages"].values():
            entry.update(self.transform_options)
        return str(atomic_write_text(json.dumps(doc, indent=1) + "\n", out))

    def fit(self, head: Head, *, statistics: str | os.PathLike,
            class_names: list[str] | None = None) -> LogitNormalizer:
        """The normalizer of the head's stage in the statistics file (as
        :meth:`write_statistics` wrote it); its class count (and ``class_names``) are checked."""
        stages = load_normalizers(statistics, class_names=class_names, num_classes=head.num_classes)
        return select_stage(stages, head, statistics)


#: Post-hoc calibration methods by name (a compare recipe's ``posthoc``).
CALIBRATORS: dict[str, type[Calibrator]] = {"logn": LogN, "loga": LogA, "none": NoCalibration}


def build_calibrator(name: str, **options: Any) -> Calibrator:
    """``CALIBRATORS[name](**options)``; an unknown name or option is a ConfigError."""
    if name not in CALIBRATORS:
        raise ConfigError(f"unknown post-hoc method {name!r} (known: {', '.join(CALIBRATORS)})")
    try:
        return CALIBRATORS[name](**options)
    except TypeError as exc:
        raise ConfigError(f"post-hoc method {name!r}: {exc}") from None
