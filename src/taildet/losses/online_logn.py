"""Online inverse LogN (paper eq. 3): a classification loss trained on de-normalized logits.

:class:`OnlineLogitNormalization` keeps EMA statistics of the raw logits during training and maps
them to ``z * sigma + mu - beta`` on the foreground columns, so the loss sees de-normalized logits
and the raw ones learn balance; :class:`OnlineLogNLoss` wraps any taildet loss with it (config
name ``online_logn``, built by :func:`taildet.losses.online_logn_loss`). At test time the raw logits
are the calibrated ones. The shift choices (:data:`BETAS`, :func:`check_beta`) and the variance
floor :data:`EPS` are shared with the post-hoc normalizer,
:class:`taildet.calibration.logit_norm.LogitNormalizer` (calibration imports them from here).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from taildet.losses.base import ClassificationLoss
from taildet.utils.comm import all_reduce_mean_, get_world_size

__all__ = ["BETAS", "EPS", "check_beta", "OnlineLogitNormalization", "OnlineLogNLoss"]

BETAS = ("min_fg", "mean_fg", "bg", "none")
EPS = 1e-11


def check_beta(beta: Any, background: bool) -> str | float:
    """``beta`` validated: one of :data:`BETAS` or a finite number (``"bg"`` needs a background column)."""
    if isinstance(beta, bool):
        raise ValueError(f"beta must be one of {BETAS} or a number, got {beta!r}")
    if isinstance(beta, (int, float)):
        if not math.isfinite(float(beta)):
            raise ValueError(f"beta must be finite, got {beta!r}")
        return float(beta)
    if beta not in BETAS:
        raise ValueError(f"beta must be one of {BETAS} or a number, got {beta!r}")
    if beta == "bg" and not background:
        raise ValueError('beta="bg" needs a background column (background=True)')
    return beta


class OnlineLogitNormalization(nn.Module):
    """Training-time inverse LogN: feed the loss de-normalized logits so the raw ones learn balance.

    In training mode, :meth:`forward` first updates persistent EMA statistics of the raw, detached
    logits (:meth:`step`, unless it already ran for this iteration) and returns
    ``z_c * sigma_c + mu_c - beta`` for the foreground columns (background unchanged), with
    ``sigma = sqrt(max(var, eps))`` and ``beta = min_fg mu``; the statistics are constants for the
    gradient. In eval mode it is the identity (the raw logits are the calibrated ones).

    EMA: ``mu <- (1 - m) mu + m mean_batch``, ``var <- (1 - m) var + m var_batch`` (population
    variance of the batch), starting from mean 0 / var 1, so the transform starts as the identity
    (``beta = min mu = 0``). Buffers ``running_mean``, ``running_var``, ``num_updates``.
    Without a background column (sigmoid heads) every column is foreground (implicit background
    logit 0; see :mod:`taildet.calibration.logit_norm`).

    Order within an iteration: the first of :meth:`step` / training :meth:`forward` updates the
    statistics; a training :meth:`forward` right after an explicit :meth:`step` does not update
    them again (the two-stage heads call ``loss.update`` then ``loss(...)``, one-stage heads only
    the loss).
    """

    def __init__(
        self,
        num_classes: int,
        momentum: float = 0.01,
        background: bool = True,
        beta: str | float = "min_fg",
        *,
        background_index: int | None = None,
        eps: float = EPS,
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.background = bool(background)
        self.beta = check_beta(beta, self.background)
        self.background_index = (self.num_classes if background_index is None else int(background_index)) if background else None
        self.eps = float(eps)
        k = self.num_classes + (1 if self.background else 0)
        self.num_outputs = k
        self.register_buffer("running_mean", torch.zeros(k, dtype=torch.float32))
        self.register_buffer("running_var", torch.ones(k, dtype=torch.float32))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self._stepped = False

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, momentum={self.momentum}, background={self.background}, beta={self.beta!r}"

    def _fg(self) -> Tensor:
        m = torch.ones(self.num_outputs, dtype=torch.bool, device=self.running_mean.device)
        if self.background_index is not None:
            m[self.background_index] = False
        return m

    def beta_value(self) -> Tensor:
        b = self.beta
        if isinstance(b, float):
            return self.running_mean.new_tensor(b)
        if b == "none":
            return self.running_mean.new_zeros(())
        fg = self.running_mean[self._fg()]
        if b == "min_fg":
            return fg.min()
        if b == "mean_fg":
            return fg.mean()
        return self.running_mean[self.background_index]

    @torch.no_grad()
    def step(self, logits: Tensor) -> None:
        """One EMA update with the raw logits ``[N, K]`` of this iteration (detached)."""
        if logits.dim() != 2 or logits.shape[1] != self.num_outputs:
            raise ValueError(f"OnlineLogitNormalization: expected logits [N, {self.num_outputs}], got {tuple(logits.shape)}")
        self._stepped = True
        if logits.shape[0] == 0:
            return
        x = logits.detach().to(torch.float64)
        mean_b = x.mean(dim=0)
        var_b = ((x - mean_b) ** 2).mean(dim=0)
        m = self.momentum
        self.running_mean.mul_(1.0 - m).add_((m * mean_b).to(self.running_mean.dtype))
        self.running_var.mul_(1.0 - m).add_((m * var_b).to(self.running_var.dtype))
        self.num_updates += 1

    def forward(self, logits: Tensor) -> Tensor:
        if not self.training:
            return logits
        if not self._stepped:
            self.step(logits)
        self._stepped = False
        return self.denormalize(logits)

    def denormalize(self, logits: Tensor) -> Tensor:
        """``z * sigma + mu - beta`` on foreground columns with the current statistics (no update)."""
        fg = self._fg()
        sigma = torch.sqrt(self.running_var.clamp(min=self.eps))
        scale = torch.where(fg, sigma, torch.ones_like(sigma)).to(logits.dtype)
        shift = torch.where(fg, self.running_mean - self.beta_value(), torch.zeros_like(sigma)).to(logits.dtype)
        return logits * scale + shift

    @torch.no_grad()
    def sync_state(self) -> None:
        """Average the EMA statistics over DDP ranks (no-op in one process). The trainer calls
        ``sync_state`` of every submodule after each optimizer step."""
        if get_world_size() == 1:
            return
        packed = all_reduce_mean_(torch.cat([self.running_mean, self.running_var]))
        k = self.num_outputs
        self.running_mean.copy_(packed[:k])
        self.running_var.copy_(packed[k:])


class OnlineLogNLoss(ClassificationLoss):
    """A classification loss trained on de-normalized logits (paper eq. 3), wrapping ``base_loss``.

    Training: ``base_loss(OnlineLogitNormalization(logits), ...)``; ``update(logits, labels,
    gt_index)`` first steps the EMA statistics, then calls ``base_loss.update`` with the
    de-normalized logits (what the loss sees). Test time: ``scores(logits) =
    base_loss.scores(logits)`` on the raw logits. ``kind``, ``has_background``, ``num_outputs``,
    ``init_bias`` and ``uses_quality`` are the base loss's. State: ``base.*`` (the base loss's
    buffers) and ``online.running_mean`` / ``online.running_var`` / ``online.num_updates``.

    Args:
        base_loss: any taildet :class:`~taildet.losses.base.ClassificationLoss`.
        momentum: EMA momentum of the statistics (default 0.01).
        beta: shift choice as :class:`taildet.calibration.logit_norm.LogitNormalizer` (default ``"min_fg"``).
    """

    def __init__(self, base_loss: nn.Module, momentum: float = 0.01, beta: str | float = "min_fg"):
        if not isinstance(base_loss, ClassificationLoss):
            raise TypeError(f"OnlineLogNLoss wraps a ClassificationLoss, got {type(base_loss).__name__}")
        super().__init__(base_loss.num_classes)
        self.base = base_loss
        self.kind = base_loss.kind
        self.has_background = base_loss.has_background
        k = base_loss.num_outputs()
        background = k == base_loss.num_classes + 1
        if not background and k != base_loss.num_classes:
            raise ValueError(
                f"OnlineLogNLoss: {type(base_loss).__name__} has {k} outputs for {base_loss.num_classes} classes; "
                "only C (sigmoid) or C + 1 (background last) heads are supported"
            )
        self.online = OnlineLogitNormalization(base_loss.num_classes, momentum, background=background, beta=beta)

    @property
    def uses_quality(self) -> bool:  # type: ignore[override]  # one-stage heads pass quality= only when the loss asks
        return bool(self.base.uses_quality)

    def before_backward(self, grad_scale: float) -> None:
        self.base.before_backward(grad_scale)

    def observe_memory(self, logits: Tensor, labels: Tensor) -> None:
        self.base.observe_memory(logits, labels)

    def num_outputs(self) -> int:
        return self.base.num_outputs()

    def init_bias(self, bias: Tensor) -> None:
        self.base.init_bias(bias)

    def scores(self, logits: Tensor) -> Tensor:
        return self.base.scores(logits)

    def update(self, logits: Tensor, labels: Tensor, gt_index: Tensor | None = None) -> None:
        if self.training:
            self.online.step(logits)  # the loss of this iteration will not step again
            logits = self.online.denormalize(logits.detach())
        self.base.update(logits, labels, gt_index)

    def forward(self, logits: Tensor, labels: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.training and not self.online._stepped:
            # the statistics of the rows the loss uses: one-stage heads mark ignored anchors -1
            ignored = labels < 0
            self.online.step(logits[~ignored] if bool(ignored.any()) else logits)
        return self.base(self.online(logits), labels, *args, **kwargs)
