"""Analysis figures of training-time method state (the plotting that used to live in the methods).

One home for figures that read a method's state after or during training and are not part of
any method: today the per-class mean classification score against training instance counts
(LOCE's Fig. 4, :func:`plot_mean_score_vs_instances`). matplotlib is imported on use only.
The calibration figure stays with calibration (:mod:`taildet.calibration.plots`, it draws a
fitted normalizer) and the evaluation figures with the report (:mod:`taildet.evaluation.report`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor

__all__ = ["plot_mean_score_vs_instances"]


def plot_mean_score_vs_instances(
    mean_score: Tensor | np.ndarray | Mapping[str, Tensor | np.ndarray],
    instance_counts: Sequence[int] | np.ndarray,
    out_png: str | os.PathLike,
    label: str | None = None,
    *,
    title: str | None = None,
    log_y: bool = True,
) -> str:
    """The paper's Fig. 4: per-class mean classification score against training instance count.

    ``mean_score``: one run (``[C]`` or ``[C + 1]``, background dropped) named ``label``, or a
    mapping ``{label: scores}`` for several runs (e.g. CE from
    :func:`taildet.sampling.prefill.observe_mean_score` and
    LOCE's ``cls_head.loss.mean_score``). Each run is a scatter of its classes plus the median
    over log-spaced instance-count bins. Classes with 0 instances are drawn at x = 0.5.
    Returns the path written.
    """
    import matplotlib  # optional: matplotlib, a heavy dependency imported on use

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # optional: matplotlib, imported on use

    counts = np.asarray(instance_counts, dtype=np.float64).reshape(-1)
    C = counts.size
    runs = dict(mean_score) if isinstance(mean_score, Mapping) else {label or "model": mean_score}
    x = np.where(counts > 0, counts, 0.5)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    edges = np.unique(np.geomspace(0.5, max(float(x.max()), 1.0) * 1.0001, num=9))
    for i, (name, s) in enumerate(runs.items()):
        s = np.asarray(s.detach().cpu() if isinstance(s, Tensor) else s, dtype=np.float64).reshape(-1)
        if s.size == C + 1:
            s = s[:C]
        if s.size != C:
            raise ValueError(f"plot_mean_score_vs_instances: run {name!r} has {s.size} scores, "
                             f"expected {C} (or {C + 1} with background)")
        col = colours[i % len(colours)]
        ax.scatter(x, s, s=12, alpha=0.6, color=col, label=str(name))
        centres, medians = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (x >= lo) & (x < hi)
            if sel.any():
                centres.append(math.sqrt(lo * hi))
                medians.append(float(np.median(s[sel])))
        if centres:
            ax.plot(centres, medians, color=col, linewidth=1.5)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("training instances per class (log)")
    ax.set_ylabel("mean classification score")
    ax.set_title(title or "Mean classification score vs. instances")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
