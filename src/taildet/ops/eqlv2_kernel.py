"""The fast path of EQLv2 (:class:`taildet.losses.eql.EQLv2Loss`): a row kernel for
:func:`taildet.ops.rowwise.rowwise_loss`, tested equal to the plain :func:`taildet.losses.eql.eqlv2_loss`."""

from __future__ import annotations

import torch
from torch import Tensor

from taildet.ops.pool import Scratch

__all__ = ["EQLv2Kernel"]


class EQLv2Kernel:
    """Rows of EQLv2 (:class:`taildet.losses.eql.EQLv2Loss`) without a dense target matrix.

    Every row has exactly one target column (its label; the objectness column for background), so
    ``sum_j w_ij BCE(z_ij, t_ij) = sum_j neg_w_j softplus(z_ij)`` corrected on the target entry to
    ``pos_w_y softplus(-z_iy)``; the gradient is ``neg_w_j sigmoid(z_ij)`` corrected to
    ``pos_w_y (sigmoid(z_iy) - 1)``. With ``collect``, the forward also sums ``|gradient|`` per
    class into ``pos_inc`` / ``neg_inc`` (float64, ``[C + 1]``) for the state update.
    """

    def __init__(self, labels: Tensor, pos_w: Tensor, neg_w: Tensor, weight: Tensor | None, collect: bool):
        self.labels, self.pos_w, self.neg_w, self.weight = labels, pos_w, neg_w, weight
        self.collect = collect
        k = pos_w.shape[0]
        self.pos_inc = torch.zeros(k, dtype=torch.float64, device=pos_w.device)
        self.neg_inc = torch.zeros(k, dtype=torch.float64, device=pos_w.device)

    def loss(self, z: Tensor, rows: slice, scratch: Scratch) -> Tensor:
        y = self.labels[rows]
        sp = torch._C._nn.softplus(z, 1, 20, out=scratch(z, "softplus"))  # F.softplus into a work buffer
        zy = z.gather(1, y[:, None]).squeeze(1)
        spy = sp.gather(1, y[:, None]).squeeze(1)
        pw, nw = self.pos_w[y], self.neg_w[y]
        row = torch.mv(sp, self.neg_w) - nw * spy + pw * (spy - zy)  # softplus(-z) = softplus(z) - z
        w = self.weight[rows] if self.weight is not None else None
        if self.collect:
            sig = torch.sigmoid(z, out=scratch(z, "sigmoid"))
            sy = sig.gather(1, y[:, None]).squeeze(1)
            # the target entries out of the column sums (not subtracted afterwards: confident
            # positives would cancel most of a small G- in float32)
            sig.scatter_(1, y[:, None], 0.0)
            col = torch.mv(sig.t(), w) if w is not None else sig.sum(0)
            target_pos = pw * (1.0 - sy)
            if w is not None:
                target_pos = target_pos * w
            f64 = torch.float64
            self.neg_inc += (col * self.neg_w).to(f64)
            self.pos_inc.index_add_(0, y, target_pos.to(f64))
        return (row * w).sum() if w is not None else row.sum()

    def grad(self, z: Tensor, rows: slice, scale: Tensor, out: Tensor, scratch: Scratch) -> None:
        y = self.labels[rows, None]
        torch.sigmoid(z, out=out)
        sy = out.gather(1, y)
        out.mul_(self.neg_w)
        out.scatter_(1, y, self.pos_w[y] * (sy - 1.0))
        out.mul_(scale if self.weight is None else (self.weight[rows] * scale)[:, None])
