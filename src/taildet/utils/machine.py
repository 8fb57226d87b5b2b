"""The machine a run's numbers were measured on (recorded in every compare summary and benchmark file)."""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["default_jobs", "machine_info"]


def default_jobs() -> int:
    """One training job per CPU core (``len(os.sched_getaffinity(0))`` where available)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def machine_info() -> dict:
    """What a run's numbers depend on beyond seeds: torch, its CPU kernel level, threads.

    Trainings are deterministic on one machine type, but CPU kernels of another instruction set
    (e.g. AVX2 vs AVX512) round differently and a long training diverges from there, so single
    runs on two machine types differ by about as much as two seeds.
    """
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "cpus": default_jobs()}
