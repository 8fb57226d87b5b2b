"""Small helpers shared by the long-tail losses: DDP reductions of loss state, input checks.

DDP helpers (all no-ops in one process, so the losses run unchanged without a process group;
defined in :mod:`taildet.utils.comm`, re-exported here for the losses):

* :func:`is_distributed` -- ``torch.distributed`` is available and initialised;
* :func:`all_reduce_sum_` -- in-place sum over processes (accumulators, counts);
* :func:`all_gather_cat` -- concatenation over processes of tensors whose first dimension
  differs between processes (per-iteration observations), in rank order.

Every process must call a reduction at the same point of the same iteration (they are
collectives). With the ``nccl`` backend tensors travel through the current CUDA device, with
``gloo`` through the host; results come back on the input's device and dtype.

Input checks (:func:`check_inputs`, :func:`as_class_vector`) give the clear ``ValueError`` messages
the losses promise: they name the loss and what is wrong.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from taildet.utils.comm import all_gather_cat, all_reduce_sum_, is_distributed, world_size
from taildet.utils.host_sync import checks_deferred, expect

__all__ = [
    "is_distributed",
    "world_size",
    "all_reduce_sum_",
    "all_gather_cat",
    "check_inputs",
    "check_finite_loss",
    "label_range",
    "as_class_vector",
    "one_hot",
    "cached",
]


# --------------------------------------------------------------------------------------------
# Input checks


def check_inputs(
    loss: Any,
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None,
    max_label: int | None = None,
    finite: bool = True,
) -> Tensor:
    """Raise ``ValueError`` naming ``loss`` when the two-stage inputs are malformed; return the
    labels to compute with.

    Checks: ``logits`` is ``[N, loss.num_outputs()]``, ``labels`` is an int64 ``[N]`` vector with
    values in ``0..max_label`` (default ``C``, the background), ``weight`` (if given) is ``[N]``,
    and (``finite=True``) every logit is finite. The shapes are checked on the host; the values
    through :func:`taildet.utils.host_sync.expect` (one host read, or none inside
    :func:`~taildet.utils.host_sync.deferred_checks`: the check is queued, and the labels returned
    are clamped into range so that no kernel indexes out of bounds before the queued check
    raises). Losses that compute their value anyway pass ``finite=False`` and call
    :func:`check_finite_loss` on the result instead (no pass over the logits: a NaN or infinite
    logit makes the loss non-finite).
    """
    name = type(loss).__name__
    k = loss.num_outputs()
    if logits.dim() != 2 or logits.shape[1] != k:
        raise ValueError(
            f"{name}: expected logits of shape [N, {k}] for {loss.num_classes} classes, got {tuple(logits.shape)}"
        )
    n = logits.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"{name}: expected labels of shape [{n}], got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"{name}: expected int64 labels, got {labels.dtype}")
    if weight is not None and weight.shape != (n,):
        raise ValueError(f"{name}: expected weight of shape [{n}], got {tuple(weight.shape)}")
    if n == 0:
        return labels
    hi = loss.num_classes if max_label is None else int(max_label)
    lo_v, hi_v = torch.aminmax(labels)
    ok = (lo_v >= 0) & (hi_v <= hi)
    if finite:
        # the logits are checked through their sum (finite iff every entry is, barring an overflow
        # of the sum itself, which the diagnosis rules out)
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        ok = ok & torch.isfinite(logits.detach().sum(dtype=acc))

    def diagnose() -> None:
        if bool(((labels < 0) | (labels > hi)).any()):
            raise ValueError(
                f"{name}: labels must be in 0..{hi} (foreground 0..{loss.num_classes - 1}"
                + (f", background {loss.num_classes}" if hi == loss.num_classes else "")
                + f"), got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        if finite:
            _raise_if_nonfinite(name, logits)

    expect(ok, diagnose)
    return labels.clamp(0, hi) if checks_deferred() else labels


def label_range(labels: Tensor) -> tuple[int, int]:
    """``(min, max)`` of a non-empty integer tensor as Python ints (one host sync on GPU)."""
    lo, hi = torch.aminmax(labels)
    if labels.is_cuda:
        lo_v, hi_v = torch.stack([lo, hi]).tolist()
        return int(lo_v), int(hi_v)
    return int(lo.item()), int(hi.item())


def _raise_if_nonfinite(name: str, logits: Tensor) -> None:
    nonfinite = ~torch.isfinite(logits.detach())
    if bool(nonfinite.any()):
        bad = int(nonfinite.any(dim=1).sum())
        raise ValueError(f"{name}: logits contain NaN or infinite values ({bad} of {logits.shape[0]} rows)")


def check_finite_loss(loss: Any, value: Tensor, logits: Tensor) -> Tensor:
    """``value`` (a 0-d loss); when it is not finite, a ``ValueError`` naming ``loss`` if any logit
    is NaN or infinite (through :func:`taildet.utils.host_sync.expect`: one host read, none when
    deferred). A finite-logit overflow is returned as is: the trainer's non-finite-loss stop
    reports it."""
    name, z = type(loss).__name__, logits.detach()
    expect(torch.isfinite(value.detach()), lambda: _raise_if_nonfinite(name, z))
    return value


def one_hot(labels: Tensor, num_columns: int, dtype: torch.dtype) -> Tensor:
    """``F.one_hot(labels, num_columns).to(dtype)`` (``[N, num_columns]``) without its range check,
    which reads the labels on the host (a synchronisation on GPU); the labels are checked by the
    losses' own :func:`check_inputs`."""
    out = torch.zeros(labels.shape[0], num_columns, dtype=dtype, device=labels.device)
    return out.scatter_(1, labels[:, None], 1.0)


def as_class_vector(value: Any, num_classes: int, loss_name: str, arg_name: str) -> Tensor:
    """A list / numpy array / tensor of ``num_classes`` finite numbers as a float32 CPU tensor."""
    if value is None:
        raise ValueError(
            f"{loss_name}: {arg_name} is required ({num_classes} values from the training set; "
            "the engine fills it when the config does not give it)"
        )
    try:
        if isinstance(value, Tensor):
            arr = value.detach().cpu().to(torch.float64).numpy()
        else:
            arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{loss_name}: {arg_name} must be a sequence of numbers: {exc}") from None
    if arr.shape != (num_classes,):
        raise ValueError(f"{loss_name}: {arg_name} must have {num_classes} entries (one per class), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = np.nonzero(~np.isfinite(arr))[0].tolist()
        raise ValueError(f"{loss_name}: {arg_name} has non-finite values for classes {_short(bad)}")
    return torch.from_numpy(arr.astype(np.float32))


def _short(ids: list[int], limit: int = 20) -> str:
    text = ", ".join(str(i) for i in ids[:limit])
    return f"[{text}{', ...' if len(ids) > limit else ''}] ({len(ids)} in all)"


def cached(module: Any, name: str, source: Tensor, dtype: torch.dtype, device: Any, fn: Any) -> Tensor:
    """``fn()`` (a small vector derived from the buffer ``source``), cast to ``dtype`` on ``device``,
    memoised on ``module`` until ``source`` changes (in-place writes and ``load_state_dict`` bump its
    version counter). Saves the handful of tiny kernels per call that recomputing it costs on GPU."""
    device = torch.device(device) if device is not None else source.device
    stamp = (source.data_ptr(), source._version, dtype, device)
    store = module.__dict__.setdefault("_vector_cache", {})
    hit = store.get(name)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = fn().to(device=device, dtype=dtype)
    store[name] = (stamp, value)
    return value
