"""Figure of LogN statistics: per-class logit mean and standard deviation against the class's
number of training instances (the paper's Fig. 2).

Two panels sharing a logarithmic x axis (instances per class): top, the mean ``mu_c`` of each
foreground column, with horizontal lines at the background column's mean (if any) and at the
shift ``beta``; bottom, the standard deviation ``sigma_c = sqrt(var_c)``. Classes with 0 training
instances are drawn at x = 0.5 (hollow markers), since 0 has no place on a log axis.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

__all__ = ["plot_logit_statistics"]


def plot_logit_statistics(
    normalizer,
    instance_counts: Sequence[int] | np.ndarray,
    out_png: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    *,
    annotate: int = 3,
    title: str | None = None,
) -> str:
    """Write the two-panel figure to ``out_png`` and return its path.

    Args:
        normalizer: a :class:`~taildet.calibration.LogitNormalizer` with statistics.
        instance_counts: ``[C]`` training instances per foreground class.
        class_names: names for the labels of the ``annotate`` rarest and most frequent classes
            (default: the normalizer's, if any; ``annotate=0`` labels nothing).
    """
    import matplotlib  # optional: matplotlib, imported on use

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # optional: matplotlib, imported on use

    counts = np.asarray(instance_counts, dtype=np.float64).reshape(-1)
    c = normalizer.num_classes
    if counts.shape != (c,):
        raise ValueError(f"instance_counts has {counts.size} values for {c} classes")
    if float(normalizer.count) == 0:
        raise ValueError("the normalizer has no statistics")
    fg = normalizer.fg_mask.cpu().numpy()
    mean = normalizer.mean.detach().cpu().numpy()
    std = np.sqrt(normalizer.variance.detach().cpu().numpy())
    mu_fg, sd_fg = mean[fg], std[fg]
    names = list(class_names) if class_names is not None else normalizer.class_names

    x = np.where(counts > 0, counts, 0.5)
    seen = counts > 0
    fig, axes = plt.subplots(2, 1, figsize=(7.0, 6.5), sharex=True)
    for ax, y, label in ((axes[0], mu_fg, "logit mean $\\mu_c$"), (axes[1], sd_fg, "logit std $\\sigma_c$")):
        ax.scatter(x[seen], y[seen], s=12, color="tab:blue", alpha=0.8, label="foreground class")
        if (~seen).any():
            ax.scatter(x[~seen], y[~seen], s=14, facecolors="none", edgecolors="tab:blue", label="0 instances (x=0.5)")
        ax.set_xscale("log")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    if normalizer.background:
        b = normalizer.background_index
        axes[0].axhline(mean[b], color="tab:red", lw=1.2, ls="--", label=f"background $\\mu$ = {mean[b]:.2f}")
        axes[1].axhline(std[b], color="tab:red", lw=1.2, ls="--", label=f"background $\\sigma$ = {std[b]:.2f}")
    beta = normalizer.beta_value()
    if beta != 0.0:
        axes[0].axhline(beta, color="tab:green", lw=1.0, ls=":", label=f"$\\beta$ = {beta:.2f}")
    if names is not None and annotate > 0:
        order = np.argsort(counts, kind="stable")
        for i in list(order[:annotate]) + list(order[-annotate:]):
            axes[0].annotate(str(names[i]), (x[i], mu_fg[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[1].set_xlabel("training instances per class (log scale)")
    for ax in axes:
        ax.legend(fontsize=8, loc="best")
    axes[0].set_title(title or f"Logit statistics of {c} classes ({int(float(normalizer.count))} RoIs)")
    fig.tight_layout()
    out = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
