"""The fast path of the Seesaw loss (:class:`taildet.losses.seesaw.SeesawLoss`): a row kernel for
:func:`taildet.ops.rowwise.rowwise_loss`, tested equal to the plain :func:`taildet.losses.seesaw.seesaw_loss`.
The factors ``log(M_ij C_ij)`` are the loss's own (``log_factors``, passed in)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from taildet.ops.pool import Scratch
from taildet.ops.rowwise import minus_ones, softmax_target_log_prob_
from taildet.utils.host_sync import avoid_host_sync

__all__ = ["SeesawKernel"]


class SeesawKernel:
    """Rows of the Seesaw loss (taildet.ops.rowwise): objectness CE on every row plus the class
    CE of ``z + log(M C)`` on foreground rows, each times the per-RoI weight.

    The forward leaves both softmaxes in the ``[r, C + 2]`` buffer that becomes the gradient
    (class columns zero on background rows), so the backward is a subtraction of the one-hot
    targets and a row scaling: two exponential passes over the foreground rows in all (the
    compensation factor's softmax and the adjusted logits' softmax)."""

    def __init__(self, labels: Tensor, num_classes: int, log_factors: Callable[..., Tensor], weight: Tensor | None):
        self.labels, self.C, self.log_factors, self.weight = labels, num_classes, log_factors, weight

    def _split(self, rows: slice):
        """Objectness targets ``[r, 1]``, foreground row indices ``[P]``, the labels ``[r]`` and
        the foreground factors: None on CPU (rows compacted with ``nonzero``); in the sync-free
        form (GPU, :func:`~taildet.utils.host_sync.avoid_host_sync`) every row is kept (``P = r``,
        labels clamped to ``C - 1``) and the ``[r]`` 0/1 factor ``fg_i`` zeroes the class term of
        background rows."""
        y = self.labels[rows]
        obj_t = (y == self.C).long()[:, None]
        if avoid_host_sync(y):
            return obj_t, torch.arange(y.shape[0], device=y.device), y.clamp(max=self.C - 1), (y < self.C)
        return obj_t, torch.nonzero(y < self.C).flatten(), y, None

    def _adjusted(self, z: Tensor, pos: Tensor, yp: Tensor, scratch: Scratch | None) -> Tensor:
        """The foreground rows' adjusted class logits ``z + log(M C)`` ``[P, C]`` (in work buffers
        when ``scratch`` is given)."""
        shape = (pos.shape[0], self.C)
        buf = (lambda name: None) if scratch is None else (lambda name: scratch.empty(shape, z.dtype, z.device, name))
        zc = buf("seesaw_class_logits")
        zc = torch.index_select(z[:, : self.C], 0, pos, out=zc) if zc is not None else z[:, : self.C].index_select(0, pos)
        adj = self.log_factors(zc, yp, out=buf("seesaw_factors"), work=buf("seesaw_work"))
        return zc.add_(adj)

    def loss(self, z: Tensor, rows: slice, scratch: Scratch) -> Tensor:
        return self.loss_keep(z, rows, scratch(z, "softmax"), scratch)

    def loss_keep(self, z: Tensor, rows: slice, keep: Tensor, scratch: Scratch | None = None) -> Tensor:
        """:meth:`loss`, leaving in ``keep`` ``[r, C + 2]`` the class softmax of the adjusted logits
        (foreground rows; 0 on background rows) and the objectness softmax."""
        C = self.C
        scratch = Scratch() if scratch is None else scratch
        obj_t, pos, y, fg = self._split(rows)
        yp = y[pos]
        zc = self._adjusted(z, pos, yp, scratch)
        cls = -softmax_target_log_prob_(zc, yp[:, None],
                                        lambda idx: self._adjusted(z, pos[idx], yp[idx], None))
        lo = torch.log_softmax(z[:, C:], dim=1)
        obj = -lo.gather(1, obj_t).squeeze(1)
        keep_cls = keep[:, :C]
        if fg is not None:  # sync-free: every row; the background rows' class softmax zeroed
            cls = cls * fg
            torch.mul(zc, fg.to(zc.dtype)[:, None], out=keep_cls)
        else:
            if pos.shape[0] < y.shape[0]:
                keep_cls.zero_()  # (index_fill_ of the background rows: single-threaded, ~10x slower)
            keep_cls.index_copy_(0, pos, zc)
        torch.exp(lo, out=keep[:, C:])
        if self.weight is None:
            return obj.sum() + cls.sum()
        w = self.weight[rows]
        return (obj * w).sum() + (cls * w[pos]).sum()

    def grad_from_kept(self, kept: Tensor, rows: slice, scale: Tensor) -> None:
        """:meth:`grad` in place from :meth:`loss_keep`'s buffer: ``scale * w (softmax - onehot)``."""
        C = self.C
        obj_t, pos, y, fg = self._split(rows)
        target = minus_ones(pos.shape[0], kept.dtype, kept.device).squeeze(1)
        kept.index_put_((pos, y[pos]), target if fg is None else target * fg, accumulate=True)
        kept[:, C:].scatter_add_(1, obj_t, minus_ones(obj_t.shape[0], kept.dtype, kept.device))
        if self.weight is None:
            kept.mul_(scale)
        else:
            kept.mul_((self.weight[rows] * scale)[:, None])

    def grad(self, z: Tensor, rows: slice, scale: Tensor, out: Tensor, scratch: Scratch) -> None:
        # the same op sequence as loss_keep + grad_from_kept, so every backward gives the same bits
        self.loss_keep(z, rows, out, scratch)
        self.grad_from_kept(out, rows, scale)
