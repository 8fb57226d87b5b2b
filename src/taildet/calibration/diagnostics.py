"""Diagnostics of a logit transform: does the background column win the argmax of positive RoIs?

LogN leaves the background logit unchanged and moves the foreground logits to a normalised scale
shifted by ``beta`` (spec section 1). Whether that helps depends on the *scale of the background
logit relative to the normalised foreground*: on a detector trained with plain cross-entropy the
raw background logit of a positive RoI is large (mean 11-16 on the embedded set), while
``(z - mu + beta) / sigma`` of the right class is a few units, so after LogN the background wins
the argmax of most positive RoIs (92-99.9 % measured with ``beta = min fg mean``) and their class
scores collapse. On a detector trained with BatchNorm on its logits (LogN's released recipe) the
background logit lives on the normalised scale too (about 35 % measured).

:func:`background_argmax_share` measures this per LVIS frequency group (``r`` / ``c`` / ``f``)
on positive RoIs (sampled RoIs whose label is a foreground class); ``taildet calibrate``
collects a sample of positive RoIs' raw logits during its pass (:class:`PositiveLogitSample`),
prints the shares (raw logits, LogN as configured, LogN with ``beta = none``) and saves them in
the statistics file under ``extra["background_argmax_share"]``.

Heads without a background column (sigmoid heads, ``K = C``) are compared against the implicit
background logit 0 (``sigmoid(z) = softmax([z, 0])[0]``): a positive RoI counts when every one of
its foreground logits is below 0.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "PositiveLogitSample",
    "background_argmax_share",
    "background_argmax_report",
    "format_background_argmax_share",
    "GROUPS",
]

#: LVIS frequency groups, in table order.
GROUPS = ("r", "c", "f")


class PositiveLogitSample:
    """The raw logits and labels of the first ``max_rows`` positive RoIs seen (float32, on the CPU).

    ``add(logits [N, K], labels [N])`` keeps rows with ``0 <= label < num_classes`` (background and
    ignored rows are dropped) until ``max_rows`` are held. The statistics pass shuffles the
    training set, so the first rows are a random sample of the pass's positives. On LVIS
    (``K = 1204``) 20,000 rows take about 96 MB.
    """

    def __init__(self, num_classes: int, max_rows: int = 20000):
        if isinstance(num_classes, bool) or int(num_classes) <= 0:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if isinstance(max_rows, bool) or int(max_rows) < 0:
            raise ValueError(f"max_rows must be a non-negative integer, got {max_rows!r}")
        self.num_classes = int(num_classes)
        self.max_rows = int(max_rows)
        self._logits: list[Tensor] = []
        self._labels: list[Tensor] = []
        self.rows = 0

    @property
    def full(self) -> bool:
        return self.rows >= self.max_rows

    @torch.no_grad()
    def add(self, logits: Tensor, labels: Tensor) -> None:
        if self.full:
            return
        labels = labels.reshape(-1)
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(f"PositiveLogitSample.add: logits [N, K] and labels [N] expected, got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        keep = (labels >= 0) & (labels < self.num_classes)
        z, y = logits.detach()[keep], labels[keep]
        z, y = z[: self.max_rows - self.rows], y[: self.max_rows - self.rows]
        if z.shape[0]:
            self._logits.append(z.float().cpu())
            self._labels.append(y.long().cpu())
            self.rows += z.shape[0]

    @property
    def logits(self) -> Tensor:
        """``[n, K]`` float32 (``[0, 0]`` when empty)."""
        return torch.cat(self._logits) if self._logits else torch.zeros(0, 0)

    @property
    def labels(self) -> Tensor:
        """``[n]`` int64 class labels ``0..C-1``."""
        return torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.long)


def background_argmax_share(
    logits: Tensor,
    labels: Tensor,
    groups: Sequence[str],
    transform: Callable[[Tensor], Tensor] | None = None,
    background_index: int | None = -1,
) -> dict[str, dict[str, Any]]:
    """Per frequency group, the share of positive RoIs whose argmax is the background column.

    Args:
        logits: raw logits ``[N, K]`` of RoIs (any rows; only positives count).
        labels: ``[N]`` class labels; rows with a label outside ``0..C-1`` (background ``C``,
            ignored ``-1``) are left out.
        groups: ``'r'`` / ``'c'`` / ``'f'`` for each of the ``C`` classes (e.g. a dataset's
            ``frequency_groups``); ``C = len(groups)``.
        transform: applied to the logits first (e.g. a :class:`~taildet.calibration.LogitNormalizer`);
            None = the raw logits.
        background_index: the background column of ``K = C + 1`` logits (default -1, the last:
            taildet's convention; torchvision's detectors use 0). With ``K = C`` (no background
            column) the implicit background logit 0 of a sigmoid head is compared.
    Returns:
        ``{"r": {"share": s, "positives": n}, "c": ..., "f": ..., "all": ...}`` with ``s`` in
        ``[0, 1]``, or None for a group without positive RoIs.
    """
    C = len(groups)
    bad = sorted({g for g in groups if g not in GROUPS})
    if bad:
        raise ValueError(f"groups must be 'r', 'c' or 'f', got {bad}")
    if logits.dim() != 2 or labels.reshape(-1).shape[0] != logits.shape[0]:
        raise ValueError(f"logits [N, K] and labels [N] expected, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    K = logits.shape[1]
    if K not in (C, C + 1) and logits.shape[0]:
        raise ValueError(f"{K} logit columns for {C} classes: expected {C} or {C + 1}")
    labels = labels.reshape(-1).to(logits.device)
    keep = (labels >= 0) & (labels < C)
    z, y = logits[keep], labels[keep]
    if transform is not None and z.shape[0]:
        with torch.no_grad():
            z = transform(z)
    z = z.float()
    if z.shape[0] == 0:
        is_bg = torch.zeros(0, dtype=torch.bool)
    elif K == C:  # sigmoid head: the implicit background logit 0
        is_bg = z.max(dim=1).values < 0
    else:
        bi = (-1 if background_index is None else int(background_index)) % K
        is_bg = z.argmax(dim=1) == bi
    group_of = torch.tensor([GROUPS.index(g) for g in groups], dtype=torch.long)
    g = group_of[y.cpu()] if y.numel() else torch.zeros(0, dtype=torch.long)
    is_bg = is_bg.cpu()
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(GROUPS):
        sel = g == i
        n = int(sel.sum())
        out[name] = {"share": int(is_bg[sel].sum()) / n if n else None, "positives": n}
    n = int(is_bg.numel())
    out["all"] = {"share": int(is_bg.sum()) / n if n else None, "positives": n}
    return out


def background_argmax_report(sample: PositiveLogitSample, groups: Sequence[str], normalizer: Any,
                             background_index: int | None = -1) -> dict[str, Any]:
    """The shares for the raw logits, ``normalizer`` as configured and, when its ``beta`` is not
    already ``"none"``, the same normalizer with ``beta = "none"`` (what ``taildet calibrate``
    prints and saves)."""
    z, y = sample.logits, sample.labels
    report: dict[str, Any] = {"positives_sampled": int(y.numel()),
                              "raw": background_argmax_share(z, y, groups, None, background_index)}
    if normalizer is not None:
        name = f"logn (mode {normalizer.mode}, beta {normalizer.beta})"
        norm = copy.deepcopy(normalizer).cpu()
        report[name] = background_argmax_share(z, y, groups, norm, background_index)
        if normalizer.beta != "none" and normalizer.mode in ("all", "mean_only"):
            nb = copy.deepcopy(norm)
            nb.beta = "none"
            nb._cache = None
            report[f"logn (mode {normalizer.mode}, beta none)"] = background_argmax_share(z, y, groups, nb,
                                                                                          background_index)
    return report


def format_background_argmax_share(report: Mapping[str, Any]) -> str:
    """A text table of :func:`background_argmax_report` (or ``{name: shares}``): one row per
    variant, one column per group, cells ``share % (positives)``."""
    rows = [(k, v) for k, v in report.items() if isinstance(v, Mapping)]
    head = "share of positive RoIs whose argmax is the background column"
    if "positives_sampled" in report:
        head += f" ({report['positives_sampled']} positive RoIs sampled)"
    names = ["r", "c", "f", "all"]
    width = max([len(k) for k, _ in rows] + [7])
    lines = [head, f"{'logits':<{width}}  " + "  ".join(f"{n:>14}" for n in names)]
    for k, v in rows:
        cells = []
        for n in names:
            e = v.get(n) or {}
            s = e.get("share")
            cells.append(f"{'-' if s is None else f'{100 * s:.1f} %'} ({e.get('positives', 0)})".rjust(14))
        lines.append(f"{k:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
