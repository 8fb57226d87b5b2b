"""The positive entries of a one-stage batch, in the two layouts the dense sigmoid losses use
(sigmoid focal loss, QFL, EFL, EQFL).

One-stage labels (``[N]``): ``0..C-1`` positive anchor, ``C`` negative anchor, ``-1`` ignored.
The losses need the non-ignored anchors and the positive entries ``(anchor, label)``; there are
two ways to hand them over, chosen per tensor by
:func:`taildet.utils.host_sync.avoid_host_sync`:

* **compacted** (the CPU, the default there): the ignored rows are dropped (boolean-mask
  indexing) and the ``P`` positive entries located with ``nonzero`` -- fewer rows to compute,
  but the shapes depend on the label values, so the host reads them (on CUDA: a synchronisation
  each);
* **fixed-shape** (CUDA and every other device; the CPU inside
  :func:`~taildet.utils.host_sync.sync_free_paths`): every row is kept, ``keep = labels >= 0``
  gives the ignored rows zero weight, and the candidate positive entries are
  ``(arange(N), labels.clamp(0, C - 1))``, masked by ``pos = keep & (labels < C)``. No host read.

Both layouts give the same loss, gradient and EFL state (tested equal,
``tests/test_losses_sync_free_one_stage.py``); a :class:`PositiveEntries` describes either.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from taildet.utils.host_sync import avoid_host_sync, expect

__all__ = ["PositiveEntries", "positive_entries", "sparse_positives", "multilabel_entries", "positive_values",
           "positive_quality", "check_quality", "check_binary_targets"]


class PositiveEntries(NamedTuple):
    """The positive entries ``x[rows, cols]`` of ``[N, C]`` logits, in either layout.

    * ``rows``, ``cols``: ``[P]`` int64 (compacted: the positives only; fixed-shape: one candidate
      per row, ``P = N``, or every entry for a target matrix);
    * ``keep``: ``[N]`` bool, the rows that count (None: every row, e.g. compacted);
    * ``pos``: ``[P]`` bool, which candidates are positive (None: all of them);
    * ``count``: 0-d int64 tensor, the number of positive entries (the default normalizer).
    """

    rows: Tensor
    cols: Tensor
    keep: Tensor | None
    pos: Tensor | None
    count: Tensor


def sparse_positives(
    logits: Tensor, labels: Tensor, quality: Tensor | None, num_classes: int
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """The compacted layout: drop the ignored anchors (label ``-1``) and locate the positive entries.

    Returns ``(logits, labels, quality, rows, cols)`` restricted to the non-ignored anchors
    (``quality`` stays None when None), with ``logits[rows, cols]`` the positive entries (one per
    positive anchor, ``cols`` its label). The inputs are returned as they are when nothing is
    ignored. Reads device values on the host (``all``, boolean masks, ``where``): the CPU path.
    """
    valid = labels >= 0
    if not bool(valid.all()):
        logits, labels = logits[valid], labels[valid]
        if quality is not None:
            quality = quality[valid]
    rows = torch.where(labels < num_classes)[0]
    return logits, labels, quality, rows, labels[rows]


def positive_entries(
    logits: Tensor, labels: Tensor, quality: Tensor | None, num_classes: int
) -> tuple[Tensor, Tensor, Tensor | None, PositiveEntries]:
    """``(logits, labels, quality, entries)`` of a one-stage batch (``[N, C]``, ``[N]``, ``[N]`` or
    None), in the layout :func:`~taildet.utils.host_sync.avoid_host_sync` picks for ``logits``:
    compacted (:func:`sparse_positives`; the rows returned are the non-ignored ones) or
    fixed-shape (the inputs returned as they are; module docstring). ``labels`` must be in
    ``-1..C`` (checked, or clamped by the deferred check, before)."""
    if not avoid_host_sync(logits):
        logits, labels, quality, rows, cols = sparse_positives(logits, labels, quality, num_classes)
        return logits, labels, quality, PositiveEntries(rows, cols, None, None, rows.new_tensor(rows.numel()))
    keep = labels >= 0
    pos = keep & (labels < num_classes)
    rows = torch.arange(labels.shape[0], device=labels.device)
    entries = PositiveEntries(rows, labels.clamp(0, num_classes - 1), keep, pos, pos.sum())
    return logits, labels, quality, entries


def multilabel_entries(targets: Tensor) -> PositiveEntries:
    """The positive entries of a ``{0, 1}`` target matrix ``[N, C]`` (several per row allowed):
    compacted with ``nonzero`` on the CPU; where the host must not read device values, every
    entry is a candidate (``rows``, ``cols`` of all ``N C`` entries, row-major) masked by
    ``pos = targets > 0``."""
    if not avoid_host_sync(targets):
        rows, cols = torch.nonzero(targets, as_tuple=True)
        return PositiveEntries(rows, cols, None, None, rows.new_tensor(rows.numel()))
    n, c = targets.shape
    rows = torch.arange(n, device=targets.device)[:, None].expand(n, c).reshape(-1)
    cols = torch.arange(c, device=targets.device).repeat(n)
    pos = targets.reshape(-1) > 0
    return PositiveEntries(rows, cols, None, pos, pos.sum())


def positive_values(values: Tensor, entries: PositiveEntries) -> Tensor:
    """``values`` ``[P]`` of the candidate entries with the non-positive ones set to 0 (as they
    are in the compacted layout, where every candidate is positive). A ``where``, not a product:
    a NaN of a non-positive candidate (e.g. the quality of a negative anchor) does not leak."""
    return values if entries.pos is None else torch.where(entries.pos, values, values.new_zeros(()))


def positive_quality(quality: Tensor, entries: PositiveEntries) -> Tensor:
    """The quality targets ``q`` ``[P]`` of the candidate entries (one value per anchor,
    ``quality`` ``[N]`` of the rows :func:`positive_entries` returned): detached, clamped to
    ``[0, 1]``, 0 at the candidates that are not positive (whatever the quality of those anchors)."""
    return positive_values(quality[entries.rows].detach().clamp(0.0, 1.0), entries)


def check_quality(loss: Any, quality: Tensor | None, labels: Tensor) -> None:
    """``ValueError`` naming ``loss`` unless ``quality`` is given with the shape of ``labels``
    (``[N]``; QFL and EQFL use the values of the positive anchors only)."""
    name = type(loss).__name__
    if quality is None:
        raise ValueError(f"{name} needs quality= (IoU of each positive anchor's decoded box with its GT)")
    if quality.shape != labels.shape:
        raise ValueError(f"{name}: expected quality of shape [{labels.shape[0]}], got {tuple(quality.shape)}")


def check_binary_targets(name: str, targets: Tensor) -> None:
    """``ValueError`` (``"{name}: targets must be 0 or 1"``) unless every entry of ``targets`` is
    0 or 1; through :func:`taildet.utils.host_sync.expect` (one host read, none when deferred)."""
    if targets.numel():
        def diagnose() -> None:
            raise ValueError(f"{name}: targets must be 0 or 1")

        expect(((targets == 0) | (targets == 1)).all(), diagnose)
