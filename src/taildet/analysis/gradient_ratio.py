"""EFL / EQFL's gradient ratio over a training run, per frequency group (a diagnostic of the method).

Equalized Focal Loss (seed 003, methods.md section 4) raises the focusing factor
``gamma_j = gamma_b + s (1 - r_j)`` and the weighting factor ``gamma_j / gamma_b`` of a class
only while its accumulated positive/negative gradient ratio ``r_j = G+_j / G-_j`` is below 1; at
``r_j >= 1`` (clamped to 1) the class is trained by the plain focal loss. The paper's premise is
that rare classes have ``r_j << 1`` (their positive gradients drowned by the negatives of every
other class's anchors). Whether that holds on a dataset decides whether EFL can do anything there,
so :func:`gradient_ratio_report` reads ``G+`` / ``G-`` (the loss's ``pos_grad`` / ``neg_grad``
buffers) from every checkpoint a run wrote and reports, per frequency group, the smallest and the
median unclamped ratio and the share of classes still below 1 (where EFL differs from focal).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

__all__ = ["gradient_ratio_by_group", "gradient_ratio_report"]

_CKPT = re.compile(r"checkpoint_(\d+)\.pth$")


def gradient_ratio_by_group(pos_grad: torch.Tensor, neg_grad: torch.Tensor, groups: Sequence[str],
                            eps: float = 1e-10) -> dict[str, dict[str, float]]:
    """``{group: {"min", "median", "below_1"}}`` of ``r = pos_grad / (neg_grad + eps)`` (``[C]``).

    ``groups[j]`` is class ``j``'s frequency group (``"r"``, ``"c"``, ``"f"``); ``"all"`` covers
    every class. ``below_1``: percent of the group's classes with ``r < 1 - 1e-6`` (the ``eps`` in the
    denominator keeps an exactly balanced class just under 1; EFL treats it as focal).
    """
    if pos_grad.shape != neg_grad.shape or pos_grad.dim() != 1 or len(groups) != pos_grad.numel():
        raise ValueError(f"gradient_ratio_by_group: pos_grad {tuple(pos_grad.shape)}, neg_grad "
                         f"{tuple(neg_grad.shape)} and {len(groups)} groups must all be [C]")
    r = pos_grad.double() / (neg_grad.double() + eps)
    out = {}
    for g in ("r", "c", "f", "all"):
        m = torch.tensor([g == "all" or x == g for x in groups], dtype=torch.bool)
        if not bool(m.any()):
            continue
        v = r[m]
        out[g] = {"min": round(float(v.min()), 4), "median": round(float(v.median()), 4),
                  "below_1": round(100.0 * float((v < 1 - 1e-6).double().mean()), 2)}
    return out


def _buffers(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state) if isinstance(state, dict) else state
    keys = [k for k in state if k.endswith("pos_grad")]
    if len(keys) != 1 or keys[0].replace("pos_grad", "neg_grad") not in state:
        return None
    return state[keys[0]], state[keys[0].replace("pos_grad", "neg_grad")]


def gradient_ratio_report(run_dir: str | Path, groups: Sequence[str] | Mapping[int, str]) -> dict[str, dict] | None:
    """``{iteration: gradient_ratio_by_group(...)}`` over a run's checkpoints (``checkpoint_N.pth``
    and ``model_final.pth``, the latter under the key ``"final"``), or ``None`` when the run's loss
    keeps no ``pos_grad`` / ``neg_grad`` (not EFL / EQFL / EQLv2; EQLv2's objectness column is dropped). ``groups``: class index -> group, in
    the contiguous class order of the model (LVIS category ids sorted)."""
    run_dir = Path(run_dir)
    if isinstance(groups, Mapping):
        groups = [groups[k] for k in sorted(groups)]
    files = sorted((int(m.group(1)), p) for p in run_dir.glob("checkpoint_*.pth") if (m := _CKPT.search(p.name)))
    named: list[tuple[str, Path]] = [(str(i), p) for i, p in files]
    if (run_dir / "model_final.pth").exists():
        named.append(("final", run_dir / "model_final.pth"))
    out = {}
    for key, path in named:
        bufs = _buffers(path)
        if bufs is None:
            return None
        pos, neg = bufs
        if pos.numel() == len(groups) + 1:  # EQLv2: the last column is the objectness, not a class
            pos, neg = pos[:-1], neg[:-1]
        out[key] = gradient_ratio_by_group(pos, neg, list(groups))
    return out or None
