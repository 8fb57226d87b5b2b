"""LogN -- logit normalization of a trained detector's classification logits (spec section 1).

:class:`LogitNormalizer` holds per-column statistics of the raw logits ``[N, K]`` seen during a
statistics pass (:func:`taildet.calibration.collect_logit_statistics`) and applies the test-time
formula as an ``nn.Module``::

    background column (index C by default): z'_C = z_C                (bit-identical)
    foreground column c:                    z'_c = (z_c - mu_c + beta) / sqrt(max(var_c, 1e-11))
    beta = min_{k fg} mu_k

Statistics
----------
* Exact (default, ``momentum=None``): one pass of streaming mean / population variance (divide by
  ``n``, not ``n - 1``) with float64 accumulators -- buffers ``count`` (scalar), ``mean`` ``[K]``
  and ``m2`` ``[K]`` (sum of squared deviations). Each batch's moments are merged into the
  running ones with Chan et al.'s parallel formula (:func:`~taildet.calibration.moments.merge_moments`),
  so the result does not depend on how the rows were split into batches (up to float64 rounding). :meth:`sync`
  merges the ranks' moments with the same function under DDP.
* EMA (``momentum=m``, the authors' reference): BatchNorm-style running statistics,
  ``mean <- (1 - m) mean + m mean_batch``, ``var <- (1 - m) var + m var_batch`` with the batch's
  *population* variance (BatchNorm would use the unbiased one). Buffers ``count``, ``mean``,
  ``running_var``. Initialised as a fresh BatchNorm (mean 0, var 1), or from the first batch's
  statistics with ``ema_init="first"``. The reference continues the running stats from its base
  checkpoint with ``m = 5e-5``; from a fresh start such a small momentum needs a very long pass,
  hence the ``"first"`` option. :meth:`sync` averages mean and variance over ranks.

Ablations (paper Tab. 2 and Tab. 4)
-----------------------------------
``mode`` selects the parts of the formula (foreground columns; the background never changes):

===============  ==============================================
``"all"``        ``(z - mu + beta) / sigma``   (the method)
``"mean_only"``  ``z - mu + beta``             (centring, no scaling)
``"std_only"``   ``z / sigma``                 (scaling, no centring, no beta)
``"no_beta"``    ``(z - mu) / sigma``          (same as ``beta="none"``)
===============  ==============================================

``beta`` selects the shift: ``"min_fg"`` (min foreground mean, default), ``"mean_fg"`` (average
foreground mean), ``"bg"`` (the background column's mean; needs a background column),
``"none"`` (0) or a float constant. ``sigma = sqrt(max(var, eps))``, ``eps = 1e-11``.

Heads without a background column (``background=False``)
---------------------------------------------------------
Every one of the ``K = C`` columns is a foreground column. The default ``beta`` is then
``"none"`` and the variance floor is additive -- the classification form of the paper's eq. 1,
``(z - mu) / sqrt(var + eps)``. For *sigmoid detection heads* (RetinaNet/FCOS focal loss, BCE RoI
heads) taildet uses ``background=False, beta="min_fg"``: ``sigmoid(z) = softmax([z, 0])[0]``, i.e.
a sigmoid class is a two-way softmax against an implicit background logit fixed at 0. Keeping
that implicit background unchanged and normalising the foreground logit with the min-mean shift
is exactly the detection formula above; without beta, centring would move every class's average
logit to 0 (score 0.5) and flood the top-k with negatives.

Background position: ``background_index`` (default ``C``, taildet's convention, i.e. last);
torchvision's own detectors use ``0``.

Saved files (JSON) hold the statistics of one or more *stages* with the class list they belong
to -- see :func:`save_normalizers` and the file format in :mod:`taildet.calibration.stats_file`.
The online inverse variant (paper eq. 3), a training loss, is
:class:`taildet.losses.online_logn.OnlineLogNLoss`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from taildet.calibration.moments import batch_moments, merge_moments
from taildet.calibration.stats_file import FILE_FORMAT, read_statistics_file, write_statistics_file
from taildet.errors import DataError
from taildet.losses.online_logn import BETAS, EPS, check_beta
from taildet.utils.comm import all_gather_cat, all_reduce_sum_, get_world_size

__all__ = [
    "LogitNormalizer",
    "merge_moments",
    "batch_moments",
    "save_normalizers",
    "load_normalizers",
    "FILE_FORMAT",
    "MODES",
    "BETAS",
    "DEFAULT_STAGE",
]

#: Stage key of a single RoI head (Faster/Mask R-CNN); one-stage detectors use ``"head"``;
#: cascades would use one key per stage (``"roi_heads.0"``, ``"roi_heads.1"``, ...).
DEFAULT_STAGE = "roi_heads"
MODES = ("all", "mean_only", "std_only", "no_beta")


class LogitNormalizer(nn.Module):
    """Per-column logit statistics and the LogN test-time transform (see the module docstring).

    Args:
        num_classes: ``C`` foreground classes.
        background: True when the logits have a background column (``K = C + 1``), False for
            ``K = C`` (sigmoid heads / classification).
        momentum: None for exact statistics, else the EMA momentum in ``(0, 1]``.
        class_names: optional list of ``C`` names, saved with the statistics and checked on load.
        mode: ``"all" | "mean_only" | "std_only" | "no_beta"``.
        beta: ``"min_fg" | "mean_fg" | "bg" | "none"`` or a float; None = ``"min_fg"`` with a
            background column, ``"none"`` without.
        background_index: column of the background (default ``C``, last); ignored without one.
        ema_init: ``"batchnorm"`` (mean 0, var 1) or ``"first"`` (first batch's statistics).
        eps: variance floor (``max(var, eps)`` with a background column, ``var + eps`` without).

    ``update(logits)`` accumulates (no gradient; call it under ``torch.no_grad()`` in training
    code anyway); ``forward(logits)`` transforms; ``sync()`` merges ranks.
    """

    def __init__(
        self,
        num_classes: int,
        background: bool = True,
        momentum: float | None = None,
        class_names: Sequence[str] | None = None,
        mode: str = "all",
        beta: str | float | None = None,
        *,
        background_index: int | None = None,
        ema_init: str = "batchnorm",
        eps: float = EPS,
    ):
        super().__init__()
        if isinstance(num_classes, bool) or int(num_classes) <= 0 or int(num_classes) != num_classes:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.background = bool(background)
        if momentum is not None:
            momentum = float(momentum)
            if not 0.0 < momentum <= 1.0:
                raise ValueError(f"momentum must be in (0, 1] or None, got {momentum!r}")
        self.momentum = momentum
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if beta is None:
            beta = "min_fg" if self.background else "none"
        self.beta = check_beta(beta, self.background)
        if background_index is None:
            background_index = self.num_classes
        if self.background and not 0 <= int(background_index) <= self.num_classes:
            raise ValueError(f"background_index must be in 0..{self.num_classes}, got {background_index!r}")
        self.background_index = int(background_index) if self.background else None
        if ema_init not in ("batchnorm", "first"):
            raise ValueError(f'ema_init must be "batchnorm" or "first", got {ema_init!r}')
        self.ema_init = ema_init
        if not float(eps) > 0.0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.eps = float(eps)
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {self.num_classes} classes")
        #: stage key used by :meth:`save` (set by the statistics pass; None = ``"roi_heads"``).
        self.stage: str | None = None

        k = self.num_outputs
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(k, dtype=torch.float64))
        if self.momentum is None:
            self.register_buffer("m2", torch.zeros(k, dtype=torch.float64))
        else:
            self.register_buffer("running_var", torch.ones(k, dtype=torch.float64))
        self._synced = False
        self._cache: tuple | None = None

    # -- shape --------------------------------------------------------------------------------

    @property
    def num_outputs(self) -> int:
        """``K``: ``C + 1`` with a background column, ``C`` without."""
        return self.num_classes + (1 if self.background else 0)

    @property
    def fg_mask(self) -> Tensor:
        """Bool ``[K]``: True for foreground columns."""
        m = torch.ones(self.num_outputs, dtype=torch.bool, device=self.mean.device)
        if self.background_index is not None:
            m[self.background_index] = False
        return m

    def extra_repr(self) -> str:
        bg = f"background_index={self.background_index}" if self.background else "background=False"
        stats = "exact" if self.momentum is None else f"ema(momentum={self.momentum})"
        return f"num_classes={self.num_classes}, {bg}, {stats}, mode={self.mode!r}, beta={self.beta!r}"

    # -- statistics ---------------------------------------------------------------------------

    @property
    def variance(self) -> Tensor:
        """Population variance ``[K]`` (float64)."""
        if self.momentum is not None:
            return self.running_var
        if float(self.count) == 0.0:
            return torch.zeros_like(self.mean)
        return self.m2 / self.count

    @property
    def std(self) -> Tensor:
        """``sqrt(max(var, eps))`` (background) or ``sqrt(var + eps)`` (no background), ``[K]``."""
        var = self.variance
        return torch.sqrt(var.clamp(min=self.eps) if self.background else var + self.eps)

    def beta_value(self) -> float:
        """The scalar shift ``beta`` from the current statistics (0 for ``"none"`` / ``"no_beta"``)."""
        if self.mode in ("no_beta", "std_only"):
            return 0.0
        b = self.beta
        if isinstance(b, float):
            return b
        if b == "none":
            return 0.0
        fg = self.mean[self.fg_mask]
        if b == "min_fg":
            return float(fg.min())
        if b == "mean_fg":
            return float(fg.mean())
        return float(self.mean[self.background_index])  # "bg"

    def _check_logits(self, logits: Tensor, what: str) -> None:
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] != self.num_outputs:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"LogitNormalizer.{what}: expected logits [N, {self.num_outputs}] for {self.num_classes} classes"
                f"{' + background' if self.background else ''}, got {shape}"
            )

    @torch.no_grad()
    def update(self, logits: Tensor) -> None:
        """Accumulate the rows of raw logits ``[N, K]`` (detached; NaN/inf rows are an error)."""
        self._check_logits(logits, "update")
        if logits.shape[0] == 0:
            return
        if not bool(torch.isfinite(logits).all()):
            bad = (~torch.isfinite(logits)).any(dim=1).nonzero()[:, 0]
            col = (~torch.isfinite(logits[bad[0]])).nonzero()[0, 0]
            raise ValueError(
                f"LogitNormalizer.update: {len(bad)} of {logits.shape[0]} logit rows contain NaN/inf "
                f"(first: row {int(bad[0])}, column {int(col)}, value {float(logits[bad[0], col])}); "
                "the detector's classifier diverged or its inputs are broken"
            )
        n, mean_b, m2_b = batch_moments(logits.to(self.mean.device))
        if self.momentum is None:
            c, mu, m2 = merge_moments(
                torch.stack([self.count, n]), torch.stack([self.mean, mean_b]), torch.stack([self.m2, m2_b])
            )
            self.m2.copy_(m2)
        else:
            var_b = m2_b / n
            if float(self.count) == 0.0 and self.ema_init == "first":
                mu = mean_b
                self.running_var.copy_(var_b)
            else:
                m = self.momentum
                mu = (1.0 - m) * self.mean + m * mean_b
                self.running_var.mul_(1.0 - m).add_(m * var_b)
            c = self.count + n
        self.mean.copy_(mu)
        self.count.copy_(c)
        self._synced = False
        self._cache = None

    def reset(self) -> None:
        """Forget all statistics."""
        self.count.zero_()
        self.mean.zero_()
        if self.momentum is None:
            self.m2.zero_()
        else:
            self.running_var.fill_(1.0)
        self._cache = None
        self._synced = False

    @torch.no_grad()
    def sync(self) -> None:
        """Merge the statistics of all DDP ranks in place (no-op without a process group).

        Exact mode: every rank all-gathers ``(count, mean, m2)`` and merges them with
        :func:`merge_moments` (identical on every rank: the statistics of the union of the shards).
        EMA mode: mean and variance are averaged over ranks. A second call without an
        :meth:`update` in between does nothing (so the counts are not multiplied).
        """
        world = get_world_size()
        if world == 1 or self._synced:
            return
        if self.momentum is None:
            packed = torch.cat([self.count.reshape(1), self.mean, self.m2])
            allp = all_gather_cat(packed[None])  # [world, 1 + 2 K], rank order
            k = self.num_outputs
            c, mu, m2 = merge_moments(allp[:, 0], allp[:, 1 : 1 + k], allp[:, 1 + k :])
            self.count.copy_(c)
            self.mean.copy_(mu)
            self.m2.copy_(m2)
        else:
            packed = all_reduce_sum_(torch.cat([self.count.reshape(1), self.mean, self.running_var]))
            k = self.num_outputs
            self.count.copy_(packed[0])  # total rows seen over ranks
            self.mean.copy_(packed[1 : 1 + k] / world)
            self.running_var.copy_(packed[1 + k :] / world)
        self._synced = True
        self._cache = None

    # -- transform ----------------------------------------------------------------------------

    def _shift_scale(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        var_buf = self.m2 if self.momentum is None else self.running_var
        key = (
            dtype, device, self.mode, self.beta, self.eps,
            self.count.data_ptr(), self.count._version,
            self.mean.data_ptr(), self.mean._version,
            var_buf.data_ptr(), var_buf._version,
        )  # in-place changes (update, load_state_dict) bump _version; .to() gives new storage
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        if float(self.count) == 0.0:
            raise RuntimeError(
                "LogitNormalizer has no statistics yet: run taildet.calibration.collect_logit_statistics "
                "(or update()) or load a statistics file first"
            )
        fg = self.fg_mask
        beta = self.beta_value()
        shift = torch.zeros_like(self.mean)
        scale = torch.ones_like(self.mean)
        if self.mode in ("all", "mean_only", "no_beta"):
            shift = torch.where(fg, self.mean - beta, shift)
        if self.mode in ("all", "std_only", "no_beta"):
            scale = torch.where(fg, self.std, scale)
        # z' = z * (1 / sigma) + (-(mu - beta) / sigma): one fused multiply-add. The background
        # gets multiplier 1 and offset -0.0, the exact identity of IEEE addition (x + -0.0 == x
        # for every x, signed zeros and NaN included), so its column is unchanged bit for bit.
        inv = (1.0 / scale).to(device=device, dtype=dtype)
        offset = (-shift / scale).to(device=device, dtype=dtype)
        offset = torch.where(fg.to(device), offset, torch.full_like(offset, -0.0))
        inv = torch.where(fg.to(device), inv, torch.ones_like(inv))
        self._cache = (key, inv, offset)
        return inv, offset

    def forward(self, logits: Tensor) -> Tensor:
        """The LogN transform of raw logits ``[N, K]`` (same dtype/device).

        Computed as one fused ``z * (1 / sigma) + (beta - mu) / sigma`` with the per-column factors
        cast to the logits' dtype (equal to the formula up to float rounding, and about 40x
        cheaper on CPU than a subtraction plus a division). Background column unchanged bit for bit.
        Half-precision logits (AMP) are transformed in float32 and returned in float32: ``1 / sigma``
        of a near-constant column exceeds the float16 range.
        """
        self._check_logits(logits, "forward")
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        inv, offset = self._shift_scale(logits.dtype, logits.device)
        return torch.addcmul(offset, logits, inv)

    # -- files --------------------------------------------------------------------------------

    def state_for_file(self) -> dict[str, Any]:
        """This stage's entry of a statistics file (JSON-able; floats round-trip exactly)."""
        d: dict[str, Any] = {
            "num_classes": self.num_classes,
            "background": self.background,
            "background_index": self.background_index,
            "momentum": self.momentum,
            "ema_init": self.ema_init,
            "mode": self.mode,
            "beta": self.beta,
            "eps": self.eps,
            "count": float(self.count),
            "mean": [float(v) for v in self.mean.cpu().tolist()],
            "var": [float(v) for v in self.variance.cpu().tolist()],
        }
        if self.momentum is None:
            d["m2"] = [float(v) for v in self.m2.cpu().tolist()]
        return d

    @classmethod
    def from_file_state(
        cls, d: Mapping[str, Any], class_names: Sequence[str] | None = None, where: str = "statistics"
    ) -> "LogitNormalizer":
        """Rebuild a normalizer from one stage entry (see :meth:`state_for_file`)."""
        try:
            norm = cls(
                int(d["num_classes"]),
                background=bool(d["background"]),
                momentum=d.get("momentum"),
                class_names=class_names,
                mode=d.get("mode", "all"),
                beta=d.get("beta"),
                background_index=d.get("background_index"),
                ema_init=d.get("ema_init", "batchnorm"),
                eps=float(d.get("eps", EPS)),
            )
            k = norm.num_outputs
            mean = torch.tensor(d["mean"], dtype=torch.float64)
            var = torch.tensor(d["var"], dtype=torch.float64)
            count = float(d["count"])
            if mean.shape != (k,) or var.shape != (k,):
                raise ValueError(f"mean/var must have {k} values, got {tuple(mean.shape)} and {tuple(var.shape)}")
            if not (torch.isfinite(mean).all() and torch.isfinite(var).all()) or (var < 0).any() or count < 0:
                raise ValueError("statistics must be finite, with non-negative variances and count")
            norm.count.fill_(count)
            norm.mean.copy_(mean)
            if norm.momentum is None:
                m2 = d.get("m2")
                norm.m2.copy_(torch.tensor(m2, dtype=torch.float64) if m2 is not None else var * count)
                if norm.m2.shape != (k,):
                    raise ValueError(f"m2 must have {k} values")
            else:
                norm.running_var.copy_(var)
        except DataError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(where, "", f"invalid statistics entry: {type(e).__name__}: {e}") from None
        return norm

    def save(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None, stage: str | None = None) -> None:
        """Write the statistics (with the class names) to a JSON file, under ``stage`` (default
        :attr:`stage` or ``"roi_heads"``). See :func:`save_normalizers` for the format."""
        save_normalizers(path, {stage or self.stage or DEFAULT_STAGE: self}, extra=extra)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        stage: str | None = None,
    ) -> "LogitNormalizer":
        """Read one stage of a statistics file, checking it belongs to the model's classes.

        ``stage`` None: the file's only stage (an error when it has several). A different class
        count, or a class list that differs, raises :class:`DataError` naming the file and the
        first mismatching class.
        """
        stages = load_normalizers(path, class_names=class_names, num_classes=num_classes)
        if stage is None:
            if len(stages) != 1:
                raise DataError(path, "stages", f"file has stages {sorted(stages)}; pass stage=")
            return next(iter(stages.values()))
        if stage not in stages:
            raise DataError(path, f"stage {stage!r}", f"not in the file (stages: {sorted(stages)})")
        return stages[stage]


def save_normalizers(
    path: str | os.PathLike, normalizers: Mapping[str, LogitNormalizer], extra: Mapping[str, Any] | None = None
) -> None:
    """Write several stages' statistics to one JSON file (written to a temporary name, then
    renamed; format: :mod:`taildet.calibration.stats_file`). All stages share the class list."""
    if not normalizers:
        raise ValueError("save_normalizers: nothing to save")
    first = next(iter(normalizers.values()))
    names = None
    for key, n in normalizers.items():
        if n.num_classes != first.num_classes:
            raise ValueError(f"stage {key!r} has {n.num_classes} classes, stage 1 has {first.num_classes}")
        if n.class_names is not None:
            if names is not None and names != n.class_names:
                raise ValueError(f"stage {key!r} has a different class list from the other stages")
            names = n.class_names
    write_statistics_file(path, first.num_classes, names,
                          {str(k): n.state_for_file() for k, n in normalizers.items()}, extra)


def load_normalizers(
    path: str | os.PathLike, class_names: Sequence[str] | None = None, num_classes: int | None = None
) -> dict[str, LogitNormalizer]:
    """Read every stage of a statistics file (``{stage: LogitNormalizer}``), checking the classes
    (:func:`taildet.calibration.stats_file.read_statistics_file`)."""
    path = os.fspath(path)
    names, entries = read_statistics_file(path, class_names=class_names, num_classes=num_classes)
    out = {}
    for key, entry in entries.items():
        norm = LogitNormalizer.from_file_state(entry, class_names=names, where=f"{path}: stage {key!r}")
        norm.stage = key
        out[key] = norm
    return out
