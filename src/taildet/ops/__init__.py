"""Fast paths of the classification losses, kept apart from the methods.

Every loss in :mod:`taildet.losses` is written plainly first (its paper's formula with torch ops,
differentiated by autograd, or by its closed-form gradient where the method needs that gradient:
EFL / EQFL). Some also have a *fast path* here: a row-blocked kernel with its closed-form
gradient (:mod:`taildet.ops.rowwise`) that on CPU never allocates a ``[N, K]`` temporary besides
the gradient (work buffers come from a keyed per-thread pool, :mod:`taildet.ops.pool`), or, for
the dense one-stage losses EFL / EQFL / QFL, an evaluation without a target matrix
(:mod:`taildet.ops.efl_kernel`). The fast path is tested equal to the plain form (values and
gradients).

Which path runs is chosen per device type with :func:`use_fast_path` / :func:`set_fast_path`.
Default: on for ``cpu`` and ``cuda`` (the numbers every result so far was made with), off for any
other device type. Set ``TAILDET_FAST_PATH=0`` in the environment to start with it off everywhere.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["use_fast_path", "set_fast_path", "fast_path"]

_ENABLED: dict[str, bool] = {"cpu": True, "cuda": True}
if os.environ.get("TAILDET_FAST_PATH", "1").strip().lower() in ("0", "false", "no", "off"):
    _ENABLED = {"cpu": False, "cuda": False}


def use_fast_path(device: torch.device | str) -> bool:
    """Whether losses on ``device`` take their fast path (when they have one)."""
    return _ENABLED.get(torch.device(device).type, False)


def set_fast_path(device_type: str, enabled: bool) -> bool:
    """Turn the fast path on or off for a device type (``"cpu"``, ``"cuda"``, ...); returns the
    previous setting."""
    device_type = torch.device(device_type).type
    before = _ENABLED.get(device_type, False)
    _ENABLED[device_type] = bool(enabled)
    return before


@contextlib.contextmanager
def fast_path(enabled: bool, device_type: str = "cpu") -> Iterator[None]:
    """``with fast_path(False): ...`` -- the plain (or fast) path for one block of code."""
    before = set_fast_path(device_type, enabled)
    try:
        yield
    finally:
        set_fast_path(device_type, before)
