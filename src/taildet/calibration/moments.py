"""Streaming moments of logit columns in float64: one batch's ``(count, mean, m2)`` and Chan et
al.'s parallel merge of several parts' moments (batches, or ranks under DDP). The exact statistics
of :class:`taildet.calibration.logit_norm.LogitNormalizer` are built from these two functions."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batch_moments", "merge_moments"]


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, mean [K], m2 [K])`` of the rows of ``x [N, K]`` in float64 (``m2`` = sum of squared
    deviations from the mean). ``N = 0`` gives zeros."""
    x = x.detach().to(torch.float64)
    n = x.shape[0]
    count = torch.tensor(float(n), dtype=torch.float64, device=x.device)
    if n == 0:
        z = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        return count, z, z.clone()
    mean = x.mean(dim=0)
    m2 = ((x - mean) ** 2).sum(dim=0)
    return count, mean, m2


def merge_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the moments of ``R`` disjoint parts (Chan et al.'s parallel formula, all parts at once).

    Args:
        counts: ``[R]`` row counts (0 allowed). means: ``[R, K]``. m2s: ``[R, K]`` sums of squared
            deviations from each part's mean.
    Returns:
        ``(count [], mean [K], m2 [K])`` of the union, float64:
        ``n = sum n_r``, ``mean = sum n_r mean_r / n``, ``m2 = sum m2_r + sum n_r (mean_r - mean)^2``.
    This is the one function both :meth:`LogitNormalizer.update` and :meth:`LogitNormalizer.sync`
    use, so the multi-rank merge is tested without a process group.
    """
    counts = counts.to(torch.float64).reshape(-1)
    means = means.to(torch.float64)
    m2s = m2s.to(torch.float64)
    n = counts.sum()
    if float(n) == 0.0:
        return n, torch.zeros_like(means[0]), torch.zeros_like(m2s[0])
    w = (counts / n)[:, None]
    mean = (w * means).sum(dim=0)
    m2 = m2s.sum(dim=0) + (counts[:, None] * (means - mean) ** 2).sum(dim=0)
    return n, mean, m2

