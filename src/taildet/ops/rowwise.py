"""Row-chunked evaluation of a classification loss with its analytic gradient.

The two-stage losses whose every row (RoI) is independent -- Balanced Softmax and Sigmoid, the
Equilibrium Loss, Seesaw, EQL, EQLv2 -- are written as a :class:`RowKernel`: the loss of a block of rows and its
gradient, in closed form. :func:`rowwise_loss` runs a kernel over blocks of rows inside one
``torch.autograd.Function``:

* forward: the loss, block by block (nothing of size ``[N, K]`` is kept);
* backward: one ``[N, K]`` gradient tensor, filled block by block (the kernel recomputes what it
  needs from the logits, e.g. the softmax) -- or, for a kernel with ``loss_keep`` /
  ``grad_from_kept``, the ``[N, K]`` buffer the forward left (the softmax losses: the softmax of
  the adjusted logits) turned into the gradient in place (on CPU one exponential pass in forward
  and backward together, still one allocation).

Why: on CPU, the time of these losses at LVIS width (``K`` ~ 1,204) is dominated by allocating and
touching ``[N, K]`` temporaries -- at 16 images x 512 RoIs one such tensor is 39 MB, above glibc's
``mmap`` threshold, so every one costs fresh page faults. ``F.cross_entropy`` makes three of them
(log-softmax, the one-hot gradient, the input gradient); a kernel run here makes one (the input
gradient) and keeps its temporaries at block size, in cache. So the long-tail losses cost about
what plain cross-entropy costs (``benchmarks/losses.py``). On GPU (allocation is free with the
caching allocator) the whole batch is one block.

Contract: the kernel's loss and gradient must agree (tests check every kernel against
``torch.autograd`` on the plain formula). The result is differentiable once (no double backward);
per-RoI weights and every statistic the kernel holds get no gradient.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from taildet.ops.pool import DEFAULT_BLOCK_BYTES, Scratch
from taildet.utils.host_sync import avoid_host_sync

__all__ = ["RowKernel", "Scratch", "rowwise_loss", "block_rows", "compute_dtype", "softmax_", "log_softmax_", "minus_ones",
           "softmax_target_log_prob_", "SoftmaxOffsetKernel", "SigmoidBCEKernel",
           "BLOCK_BYTES"]

#: Target size of one block of rows on CPU (bytes of ``float32`` logits): well under glibc's
#: dynamic ``mmap`` threshold (32 MB), so block temporaries are reused from the heap.
BLOCK_BYTES = DEFAULT_BLOCK_BYTES


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute in: float32 for half precision (AMP), else the logits' own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def block_rows(logits: Tensor) -> int:
    """Rows per block: about :data:`BLOCK_BYTES` on CPU, every row at once elsewhere."""
    n, k = logits.shape
    if logits.device.type != "cpu":
        return max(n, 1)
    return max(1, min(n, BLOCK_BYTES // (4 * max(k, 1))))


_MINUS_ONES: dict[tuple, Tensor] = {}


def minus_ones(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``[n, 1]`` view of a cached ``-1`` column (the ``- onehot`` of the softmax gradients)."""
    key = (dtype, device)
    col = _MINUS_ONES.get(key)
    if col is None or col.shape[0] < n:
        col = torch.full((max(n, 1024), 1), -1.0, dtype=dtype, device=device)
        _MINUS_ONES[key] = col
    return col[:n]


def _inplace_ok(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.dim() == 2 and t.is_contiguous()


def softmax_(t: Tensor) -> Tensor:
    """``t <- softmax(t, dim=1)`` in place (no temporary on CPU; tested against ``torch.softmax``)."""
    if _inplace_ok(t):
        return torch._softmax(t, 1, False, out=t)
    return t.copy_(torch.softmax(t, dim=1))


def log_softmax_(t: Tensor) -> Tensor:
    """``t <- log_softmax(t, dim=1)`` in place (no temporary on CPU; tested)."""
    if _inplace_ok(t):
        return torch._log_softmax(t, 1, False, out=t)
    return t.copy_(torch.log_softmax(t, dim=1))


class RowKernel(Protocol):
    """A loss that is a sum over rows, with its gradient in closed form.

    ``z`` is a block ``[r, K]`` of the logits (rows ``rows`` of the batch) in the compute dtype.
    """

    def loss(self, z: Tensor, rows: slice, scratch: Scratch) -> Tensor:
        """Summed (unreduced, weighted) loss of the block, a 0-d tensor. ``scratch`` gives work
        buffers; ``z`` must not be modified (it may be a view of the logits)."""
        ...

    def grad(self, z: Tensor, rows: slice, scale: Tensor, out: Tensor, scratch: Scratch) -> None:
        """Write ``scale * d(loss of the block)/dz`` into ``out`` (``[r, K]``, the compute dtype,
        contiguous)."""
        ...


_ALL = slice(None)


def _blocks(n: int, step: int):
    if n <= step:
        return (_ALL,)
    return tuple(slice(start, start + step) for start in range(0, n, step))


class _RowwiseLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, kernel: RowKernel, denom: Tensor | float, grad_wanted: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits)
        ctx.kernel = kernel
        ctx.denom = denom
        dt = compute_dtype(logits.dtype)
        ctx.blocks = _blocks(logits.shape[0], block_rows(logits))
        # kernels with loss_keep leave in an [N, K] buffer what their gradient starts from (e.g.
        # the softmax of the offset logits); the backward then turns that buffer into the gradient in place
        ctx.kept = None
        if grad_wanted and ctx.needs_input_grad[0] and dt == logits.dtype and hasattr(kernel, "loss_keep"):
            ctx.kept = torch.empty_like(logits, memory_format=torch.contiguous_format)
        scratch = Scratch(BLOCK_BYTES)
        total = None
        single = len(ctx.blocks) == 1
        for rows in ctx.blocks:
            z = logits if single else logits[rows]
            if dt != logits.dtype:
                z = z.to(dt)
            if ctx.kept is not None:
                part = kernel.loss_keep(z, rows, ctx.kept if single else ctx.kept[rows])
            else:
                part = kernel.loss(z, rows, scratch)
            total = part if total is None else total + part
        return total / denom

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        kernel: RowKernel = ctx.kernel
        dt = compute_dtype(logits.dtype)
        scale = grad_output / ctx.denom
        if scale.dtype != dt:
            scale = scale.to(dt)
        if ctx.kept is not None:
            grad, ctx.kept = ctx.kept, None  # a second backward (retain_graph) recomputes below
            single = len(ctx.blocks) == 1
            for rows in ctx.blocks:
                kernel.grad_from_kept(grad if single else grad[rows], rows, scale)
            return grad, None, None, None
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        scratch = Scratch(BLOCK_BYTES)
        for rows in ctx.blocks:
            if dt == logits.dtype:
                kernel.grad(logits[rows], rows, scale, grad[rows], scratch)
            else:
                z = logits[rows].to(dt)
                tmp = scratch(z, "grad_in_compute_dtype")
                kernel.grad(z, rows, scale, tmp, scratch)
                grad[rows].copy_(tmp)
        return grad, None, None, None


def rowwise_loss(logits: Tensor, kernel: RowKernel, denom: Tensor | float) -> Tensor:
    """``sum over rows of kernel.loss / denom``, differentiable w.r.t. ``logits`` (``[N, K]``).

    ``denom`` is a number or a 0-d tensor (no gradient). Returns a 0-d tensor in the compute dtype
    (float32 for half-precision logits).
    """
    if isinstance(denom, Tensor):
        denom = denom.detach()
    # under no_grad (evaluation of a model whose logits require grad) no buffer is kept for a backward
    return _RowwiseLoss.apply(logits, kernel, denom, torch.is_grad_enabled())


def _host_checks_free(t: Tensor) -> bool:
    """Whether reading a value of ``t`` on the host costs nothing (CPU, outside
    :func:`taildet.utils.host_sync.sync_free_paths`: no device sync)."""
    return not avoid_host_sync(t)


def softmax_target_log_prob_(t: Tensor, target: Tensor, rows_again) -> Tensor:
    """``t <- softmax(t, dim=1)`` in place; returns ``log softmax(t)[i, target_i]`` ``[r]``, exact.

    ``t`` is a contiguous ``[r, K]`` block of (shifted) logits, ``target`` ``[r, 1]`` columns.
    On CPU the log-probabilities are ``log`` of the ``r`` gathered probabilities: one exponential
    pass over the block (the gradient of a cross-entropy starts from the softmax left in ``t``, so
    forward and backward together make one such pass; ``F.cross_entropy`` makes two). Rows whose
    target probability is below the smallest normal float (the target logit ~87 under the row's
    maximum in float32), where that ``log`` would lose precision or be ``-inf``, are recomputed
    with ``log_softmax`` from ``rows_again(idx)`` (the ``[m, K]`` logits of rows ``idx``).
    Elsewhere (GPU, where that check would be a host sync) ``log_softmax`` then ``exp``.
    """
    if _host_checks_free(t):
        p_y = softmax_(t).gather(1, target).squeeze(1)
        lp = p_y.log()
        small = p_y < torch.finfo(p_y.dtype).tiny
        if bool(small.any()):
            idx = small.nonzero().squeeze(1)
            lp[idx] = torch.log_softmax(rows_again(idx), dim=1).gather(1, target.index_select(0, idx)).squeeze(1)
        return lp
    ls = torch.log_softmax(t, dim=1)
    lp = ls.gather(1, target).squeeze(1)
    torch.exp(ls, out=t)
    return lp


class SoftmaxOffsetKernel:
    """Cross-entropy of offset logits: ``l_i = w_i * CE(z_i + a, y_i)`` with a fixed ``[K]`` offset.

    The shared core of Balanced Softmax (``a = log n`` form) and the Equilibrium Loss
    (``a = log s``). Gradient: ``w_i (softmax(z_i + a) - onehot(y_i))``.

    Args:
        labels: ``[N]`` int64 target columns (``0..K-1``).
        offset: ``[K]`` in the compute dtype, or ``None`` for plain cross-entropy.
        weight: ``[N]`` per-row weights in the compute dtype, or ``None``.
    """

    def __init__(self, labels: Tensor, offset: Tensor | None = None, weight: Tensor | None = None):
        self.labels = labels
        self.offset = offset
        self.weight = weight
        self._y = labels.unsqueeze(1)  # [N, 1] target columns

    def _target(self, rows: slice) -> Tensor:
        return self._y if rows == _ALL else self._y[rows]

    def _weight(self, rows: slice) -> Tensor:
        return self.weight if rows == _ALL else self.weight[rows]

    def _shifted(self, z: Tensor, out: Tensor) -> Tensor:
        if self.offset is None:
            return out.copy_(z)
        return torch.add(z, self.offset, out=out)

    def loss(self, z: Tensor, rows: slice, scratch: Scratch) -> Tensor:
        return self.loss_keep(z, rows, scratch(z, "softmax"))

    def loss_keep(self, z: Tensor, rows: slice, keep: Tensor) -> Tensor:
        """:meth:`loss`, leaving the softmax ``softmax(z + a)`` of the block in ``keep`` (what
        :meth:`grad_from_kept` starts from); see :func:`softmax_target_log_prob_`."""
        def rows_again(idx: Tensor) -> Tensor:
            zs = z.index_select(0, idx)
            return zs if self.offset is None else zs + self.offset

        lp = softmax_target_log_prob_(self._shifted(z, keep), self._target(rows), rows_again)
        if self.weight is not None:
            return -(lp * self._weight(rows)).sum()
        return -lp.sum()

    def grad_from_kept(self, kept: Tensor, rows: slice, scale: Tensor) -> None:
        """:meth:`grad` in place from :meth:`loss_keep`'s buffer (the softmax)."""
        y = self._target(rows)
        kept.scatter_add_(1, y, minus_ones(y.shape[0], kept.dtype, kept.device))
        if self.weight is not None:
            kept.mul_((self._weight(rows) * scale)[:, None])
        else:
            kept.mul_(scale)

    def grad(self, z: Tensor, rows: slice, scale: Tensor, out: Tensor, scratch: Scratch) -> None:
        # the same op sequence as loss_keep + grad_from_kept, so every backward gives the same bits
        self.loss_keep(z, rows, out)
        self.grad_from_kept(out, rows, scale)


class SigmoidBCEKernel:
    """Binary cross-entropy on ``C`` sigmoid logits with one-hot targets, without a dense target.

    Labels ``0..C-1`` are foreground (target column ``y_i``); ``C`` is background (no target: an
    all-zero row). With ``fg_i = [y_i < C]``::

        x_ij = z_ij + fg_i shift_j                        (Balanced Sigmoid; shift None: x = z)
        l_i  = w_i sum_j v_ij BCE(x_ij, t_ij),  v_ij = 1 - fg_i s_j (1 - t_ij)   (EQL; s None: 1)

    Since ``BCE(x, t) = softplus(x) - t x``, a row is ``sum_j softplus(x_ij) - fg_i (sum_j s_j
    softplus(x_ij)) + fg_i (s_y softplus(x_iy) - x_iy)``: two column sums of one softplus pass.
    Gradient: ``w_i (v_ij sigmoid(x_ij) - t_ij)`` (``v_iy = 1``).

    Args:
        labels: ``[N]`` int64, ``0..C``.
        num_classes: ``C`` (= the number of logit columns).
        shift: ``[C]`` added to the foreground rows' logits, or ``None``.
        suppress: ``[C]`` ``s_j`` in ``[0, 1]`` (EQL: 1 for rare classes), or ``None``.
        weight: ``[N]`` per-row weights, or ``None``. Vectors in the compute dtype.
    """

    def __init__(self, labels: Tensor, num_classes: int, shift: Tensor | None = None,
                 suppress: Tensor | None = None, weight: Tensor | None = None):
        self.labels, self.C, self.shift, self.suppress, self.weight = labels, num_classes, shift, suppress, weight
        if suppress is not None:
            # [C, 2]: (1, s_j) -- both column sums of the softplus block in one matrix product
            self._sums = torch.stack([torch.ones_like(suppress), suppress], dim=1)
            self._keep = 1.0 - suppress

    def _split(self, rows: slice):
        """Foreground mask ``[r]``, foreground row indices ``[P]``, their labels ``[P]`` and, for
        the sync-free form (GPU: :func:`~taildet.utils.host_sync.avoid_host_sync`), ``[P]`` 0/1
        factors: there every row is kept (``P = r``, labels clamped to ``C - 1``) and the factor
        ``fg_i`` zeroes the background rows' corrections; on CPU the rows are compacted with
        ``nonzero`` (factor None)."""
        y = self.labels[rows]
        fg = y < self.C
        if avoid_host_sync(y):
            return fg, torch.arange(y.shape[0], device=y.device), y.clamp(max=self.C - 1), fg
        pos = torch.nonzero(fg).flatten()
        return fg, pos, y[pos], None

    def _x(self, z: Tensor, fg: Tensor, out: Tensor) -> Tensor:
        if self.shift is None:
            return z
        return torch.addcmul(z, fg.to(z.dtype)[:, None], self.shift[None, :], out=out)

    def loss(self, z: Tensor, rows: slice, scratch: Scratch) -> Tensor:
        fg, pos, yp, keep_row = self._split(rows)
        x = self._x(z, fg, scratch(z, "shifted"))
        sp = torch._C._nn.softplus(x, 1, 20, out=scratch(z, "softplus"))  # F.softplus into a work buffer
        if self.suppress is None:
            row = sp.sum(1)
        else:
            sums = sp @ self._sums
            row = sums[:, 0].clone()
            sub = sums[:, 1].index_select(0, pos)
            row.index_add_(0, pos, sub if keep_row is None else sub * keep_row, alpha=-1.0)
        if pos.numel():
            corr = -x[pos, yp]
            if self.suppress is not None:
                corr = corr + self.suppress[yp] * sp[pos, yp]
            row.index_add_(0, pos, corr if keep_row is None else corr * keep_row)
        if self.weight is not None:
            return (row * self.weight[rows]).sum()
        return row.sum()

    def grad(self, z: Tensor, rows: slice, scale: Tensor, out: Tensor, scratch: Scratch) -> None:
        fg, pos, yp, keep_row = self._split(rows)
        torch.sigmoid(self._x(z, fg, out), out=out)
        if keep_row is not None:  # sync-free: every row, background rows left as they are
            f = keep_row.to(out.dtype)
            if self.suppress is None:
                out.index_put_((pos, yp), -f, accumulate=True)
            else:
                s_y = out[pos, yp]
                out.mul_(1.0 - f[:, None] * self.suppress)
                out.index_put_((pos, yp), s_y - f)
        elif pos.numel():
            if self.suppress is None:
                out.index_put_((pos, yp), minus_ones(pos.shape[0], out.dtype, out.device).squeeze(1), accumulate=True)
            else:
                s_y = out[pos, yp]
                fg_rows = torch.index_select(out, 0, pos, out=scratch.empty((pos.shape[0], self.C), out.dtype,
                                                                             out.device, "fg_rows"))
                out.index_copy_(0, pos, fg_rows.mul_(self._keep))
                out.index_put_((pos, yp), s_y - 1.0)
        out.mul_(scale if self.weight is None else (self.weight[rows] * scale)[:, None])
