"""Post-hoc logit adjustment (LogA; spec section 5): ``z_c - tau * log(pi_c)`` on foreground columns.

``pi`` is the training prior normalised over the ``C`` foreground classes; the background column
(index ``C`` by default, ``background_index`` otherwise) is left unchanged bit for bit. Without a
background column (``background=False``, sigmoid heads) every column is adjusted.

Priors from counts: ``pi_c = (n_c + s) / sum_k (n_k + s)`` with ``s = smoothing`` (default 0). A
class with ``n_c = 0`` would get ``log 0 = -inf``, so zero counts are an error unless
``smoothing > 0``. :meth:`LogitAdjuster.from_dataset` takes image counts (``prior_from="image"``,
the default: the frequency ``f_c`` the spec uses everywhere) or instance counts (``"instance"``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from taildet.errors import DataError

__all__ = ["LogitAdjuster"]


class LogitAdjuster(nn.Module):
    """``z'_c = z_c - tau * log(pi_c)`` for foreground columns, background unchanged.

    Args:
        prior: ``[C]`` positive class prior; it is renormalised to sum to 1.
        tau: temperature (1.0 as in the spec).
        background: True when logits are ``[N, C + 1]`` with a background column.
        background_index: the background column (default ``C``; torchvision detectors use 0).
    """

    def __init__(
        self,
        prior: Sequence[float] | np.ndarray | Tensor,
        tau: float = 1.0,
        background: bool = True,
        *,
        background_index: int | None = None,
        class_names: Sequence[str] | None = None,
    ):
        super().__init__()
        p = torch.as_tensor(np.asarray(prior, dtype=np.float64) if not isinstance(prior, Tensor) else prior)
        p = p.detach().to(torch.float64).reshape(-1)
        if p.numel() == 0:
            raise ValueError("LogitAdjuster: prior is empty")
        if not bool(torch.isfinite(p).all()) or bool((p <= 0).any()):
            bad = int(torch.nonzero(~torch.isfinite(p) | (p <= 0))[0, 0])
            raise ValueError(
                f"LogitAdjuster: prior must be finite and positive, class {bad} has {float(p[bad])} "
                "(use LogitAdjuster.from_counts(..., smoothing=...) for classes never seen)"
            )
        self.num_classes = int(p.numel())
        self.tau = float(tau)
        self.background = bool(background)
        if background_index is None:
            background_index = self.num_classes
        if self.background and not 0 <= int(background_index) <= self.num_classes:
            raise ValueError(f"background_index must be in 0..{self.num_classes}, got {background_index!r}")
        self.background_index = int(background_index) if self.background else None
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        p = p / p.sum()
        self.register_buffer("log_prior", torch.log(p))
        self._cache: tuple | None = None

    @property
    def num_outputs(self) -> int:
        return self.num_classes + (1 if self.background else 0)

    @property
    def prior(self) -> Tensor:
        return torch.exp(self.log_prior)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tau={self.tau}, background_index={self.background_index}"

    def offsets(self) -> Tensor:
        """The ``[K]`` float64 vector subtracted from the logits (0 at the background column)."""
        fg = self.tau * self.log_prior
        if not self.background:
            return fg
        zero = fg.new_zeros(1)
        b = self.background_index
        return torch.cat([fg[:b], zero, fg[b:]])

    def forward(self, logits: Tensor) -> Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_outputs:
            raise ValueError(
                f"LogitAdjuster: expected logits [N, {self.num_outputs}], got {tuple(logits.shape)}"
            )
        key = (logits.dtype, logits.device, self.tau, self.log_prior.data_ptr(), self.log_prior._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.offsets().to(device=logits.device, dtype=logits.dtype))
        return logits - self._cache[1]

    @classmethod
    def from_counts(
        cls,
        counts: Sequence[float] | np.ndarray | Tensor,
        tau: float = 1.0,
        background: bool = True,
        *,
        smoothing: float = 0.0,
        class_names: Sequence[str] | None = None,
        background_index: int | None = None,
        source: str = "counts",
    ) -> "LogitAdjuster":
        """Prior from per-class counts, normalised over the foreground classes (see module doc)."""
        n = np.asarray(counts.detach().cpu() if isinstance(counts, Tensor) else counts, dtype=np.float64).reshape(-1)
        if n.size == 0:
            raise DataError(source, "counts", "no classes")
        name = (lambda i: f"class {i} ({class_names[i]!r})") if class_names is not None else (lambda i: f"class {i}")
        bad = np.nonzero(~np.isfinite(n) | (n < 0))[0]
        if bad.size:
            raise DataError(source, name(int(bad[0])), f"count must be a finite non-negative number, got {n[bad[0]]}")
        if float(smoothing) < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing!r}")
        zero = np.nonzero(n + smoothing <= 0)[0]
        if zero.size:
            raise DataError(
                source,
                name(int(zero[0])),
                f"count is 0 ({zero.size} class(es) with zero count), so log(prior) = -inf; "
                "pass smoothing > 0 (e.g. smoothing=1) or drop the class",
            )
        return cls(n + smoothing, tau, background, background_index=background_index, class_names=class_names)

    @classmethod
    def from_dataset(
        cls,
        ds: Any,
        prior_from: str = "image",
        tau: float = 1.0,
        background: bool = True,
        *,
        smoothing: float = 0.0,
        background_index: int | None = None,
    ) -> "LogitAdjuster":
        """Prior from a training dataset's ``image_counts`` (``prior_from="image"``) or
        ``instance_counts`` (``"instance"``), e.g. a :class:`taildet.data.lvis.LVISDataset`."""
        if prior_from not in ("image", "instance"):
            raise ValueError(f'prior_from must be "image" or "instance", got {prior_from!r}')
        attr = "image_counts" if prior_from == "image" else "instance_counts"
        counts = getattr(ds, attr, None)
        if counts is None:
            raise ValueError(f"{type(ds).__name__} has no attribute {attr!r}")
        source = str(getattr(ds, "ann_file", None) or getattr(ds, "path", None) or type(ds).__name__)
        return cls.from_counts(
            counts,
            tau,
            background,
            smoothing=smoothing,
            class_names=getattr(ds, "class_names", None),
            background_index=background_index,
            source=f"{source} ({attr})",
        )
