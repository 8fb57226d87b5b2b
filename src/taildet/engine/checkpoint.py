"""Atomic checkpoints and finding the newest complete one in a run directory.

Writing: the state goes to a temporary file in the same directory, is flushed and fsync'ed, then
``os.replace``'d over the target (atomic on POSIX), and the directory is fsync'ed. Only then is the
``last_checkpoint`` text file (the checkpoint's base name) rewritten the same way. A crash at any
point leaves every earlier checkpoint and the pointer to the newest complete one intact.

A training checkpoint holds ``model`` (a plain ``state_dict``, loss buffers included),
``optimizer``, ``scheduler``, ``scaler`` (AMP), ``iteration`` (iterations done), ``epoch``,
``sampler_epoch``, ``epoch_iteration`` (batches of that epoch done), ``rng`` (python, numpy,
torch CPU and CUDA states; ``rng_per_rank`` under DDP), ``config`` (dict) and
``taildet_version``.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

import numpy as np
import torch

from taildet import __version__
from taildet.errors import TaildetError
from taildet.fileio import atomic_write
from taildet.models.heads import remap_legacy_keys

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "last_checkpoint",
    "get_rng_state",
    "set_rng_state",
    "LAST_CHECKPOINT_FILE",
]

LAST_CHECKPOINT_FILE = "last_checkpoint"
_CKPT_RE = re.compile(r"^checkpoint_(\d+)\.pth$")


class CheckpointError(TaildetError, OSError):
    """A checkpoint is missing, truncated or not a taildet checkpoint (names the file)."""


def _atomic_write(path: str, write) -> None:
    atomic_write(path, write)


def save_checkpoint(path: str | os.PathLike, **state: Any) -> str:
    """Atomically save ``state`` (plus ``taildet_version``) to ``path``; update ``last_checkpoint``.

    Returns the path. The pointer file ``last_checkpoint`` next to it is rewritten (atomically)
    only after the checkpoint itself is in place.
    """
    path = os.fspath(path)
    state.setdefault("taildet_version", __version__)
    _atomic_write(path, lambda fh: torch.save(state, fh))
    pointer = os.path.join(os.path.dirname(os.path.abspath(path)), LAST_CHECKPOINT_FILE)
    name = os.path.basename(path).encode()
    _atomic_write(pointer, lambda fh: fh.write(name + b"\n"))
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (or any dict with a ``model`` entry).

    Raises :class:`CheckpointError` naming the file when it is missing, truncated or not a dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a broken file
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a taildet checkpoint (no 'model' entry)")
    if not isinstance(state["model"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise CheckpointError(f"{path}: not a taildet checkpoint ('model' is not a state dict of tensors)")
    return state


def check_finite_weights(state_dict: dict, source: str) -> None:
    """CheckpointError naming ``source`` and the first floating-point tensor holding NaN or an
    infinity (a model with such weights returns NaN boxes that fail deep inside torchvision)."""
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        v = state_dict[bad[0]]
        n = int((~torch.isfinite(v)).sum())
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise CheckpointError(f"{source}: weight {bad[0]} has {n} non-finite value(s) (NaN or inf) of "
                              f"{v.numel()}{more}: the run that saved it diverged; use an earlier checkpoint")


#: State-dict prefixes that only a training set-up has (MFS's mean-score observer): dropped by
#: :func:`load_model_weights` when the model being loaded has no such module.
TRAINING_ONLY_PREFIXES = ("roi_heads.mfs_observer.",)


def load_model_weights(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint",
                       saved_config: dict | None = None) -> None:
    """``model.load_state_dict(state_dict)`` (strict) for inference-time models: entries under
    :data:`TRAINING_ONLY_PREFIXES` that ``model`` lacks (it was built without MFS) are dropped.

    Weights that do not fit (another architecture, class count or loss head) are a
    :class:`CheckpointError` naming ``source``, the first differences and, when ``saved_config``
    (the checkpoint's ``config`` entry) is given, what the checkpoint was trained as. Keys saved
    before the classification-head contract (``roi_heads.loss.*``, ``cls_loss.*``, ...) are read
    under their ``cls_head.*`` names (:func:`taildet.models.heads.remap_legacy_keys`)."""
    state_dict = dict(state_dict)
    remap_legacy_keys(state_dict)
    own = model.state_dict()
    kept = {k: v for k, v in state_dict.items()
            if k in own or not any(k.startswith(p) for p in TRAINING_ONLY_PREFIXES)}
    problems = [f"shape {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model for {k}"
                for k, v in kept.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in kept]
    unexpected = [k for k in kept if k not in own]
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
    if problems:
        trained = ""
        model_cfg = (saved_config or {}).get("model") if isinstance(saved_config, dict) else None
        if isinstance(model_cfg, dict):
            trained = (f"; it was trained as arch {model_cfg.get('arch')!r} with loss "
                       f"{model_cfg.get('loss')!r} and num_classes {model_cfg.get('num_classes')!r}")
        raise CheckpointError(f"{source}: the checkpoint does not fit the model built from the config: "
                              + "; ".join(problems[:4]) + trained
                              + ". Use the config the checkpoint was trained with")
    check_finite_weights(kept, source)
    model.load_state_dict(kept)


def _iteration_of(name: str) -> int:
    m = _CKPT_RE.match(name)
    return int(m.group(1)) if m else -1


def last_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint of ``run_dir``, or ``None`` when there is none.

    Follows the ``last_checkpoint`` pointer when it names an existing file; otherwise falls back
    to ``model_final.pth``, then the ``checkpoint_<iteration>.pth`` with the largest iteration
    (temporary files of an interrupted write never match).
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        return None
    pointer = os.path.join(run_dir, LAST_CHECKPOINT_FILE)
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as fh:
            name = fh.read().strip()
        if name and os.path.isfile(os.path.join(run_dir, name)):
            return os.path.join(run_dir, name)
    final = os.path.join(run_dir, "model_final.pth")
    if os.path.isfile(final):
        return final
    cands = sorted((n for n in os.listdir(run_dir) if _CKPT_RE.match(n)), key=_iteration_of)
    return os.path.join(run_dir, cands[-1]) if cands else None


def get_rng_state() -> dict:
    """Python, numpy, torch CPU and (when available) all CUDA generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda[0])
