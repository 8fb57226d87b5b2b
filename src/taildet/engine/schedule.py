"""Learning-rate schedule: linear warm-up, then step decay or cosine, as a pure function.

``lr_factor(it, ...)`` depends on nothing but the iteration, so a resumed run (whose
``LambdaLR`` is rebuilt and has its ``last_epoch`` restored) continues exactly.

* warm-up (``it < warmup_iters``): ``warmup_factor * (1 - a) + a`` with ``a = it / warmup_iters``
  (linear from ``warmup_factor`` at iteration 0 to 1 at ``warmup_iters``), multiplied with the
  main schedule's value (so a warm-up longer than the first step still decays).
* step: ``gamma ** (number of milestones <= it)``; milestones are iterations (ints >= 1) or
  fractions of ``max_iter`` (numbers < 1).
* cosine: ``0.5 * (1 + cos(pi * it / max_iter))``, from 1 at 0 to 0 at ``max_iter``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from functools import partial

import torch

__all__ = ["lr_factor", "resolve_steps", "build_scheduler"]


def resolve_steps(steps: Sequence[float], max_iter: int) -> list[int]:
    """Milestone iterations: numbers < 1 are fractions of ``max_iter``, the rest iterations."""
    out = []
    for s in steps:
        out.append(int(round(s * max_iter)) if s < 1 else int(s))
    return sorted(out)


def lr_factor(
    it: int,
    *,
    max_iter: int,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
    schedule: str = "step",
    steps: Sequence[float] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base learning rate at iteration ``it`` (0-based)."""
    if schedule == "step":
        milestones = resolve_steps(steps, max_iter)
        main = gamma ** bisect.bisect_right(milestones, it)
    elif schedule == "cosine":
        frac = min(max(it, 0), max_iter) / max(max_iter, 1)
        main = 0.5 * (1.0 + math.cos(math.pi * frac))
    else:
        raise ValueError(f"unknown schedule {schedule!r} (expected step or cosine)")
    if warmup_iters > 0 and it < warmup_iters:
        alpha = it / warmup_iters
        main *= warmup_factor * (1.0 - alpha) + alpha
    return main


def build_scheduler(optimizer: torch.optim.Optimizer, *, max_iter: int, warmup_iters: int = 0,
                    warmup_factor: float = 0.001, schedule: str = "step", steps: Sequence[float] = (),
                    gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping once per iteration with :func:`lr_factor`."""
    fn = partial(lr_factor, max_iter=max_iter, warmup_iters=warmup_iters, warmup_factor=warmup_factor,
                 schedule=schedule, steps=tuple(steps), gamma=gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
