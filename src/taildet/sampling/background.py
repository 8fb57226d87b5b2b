"""The one background thread MFS uses to overlap its enqueue with the RPN on CPU.

A single-worker :class:`~concurrent.futures.ThreadPoolExecutor`, created on first use and
forgotten in a forked child (which has none of the parent's threads; ``os.register_at_fork``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

__all__ = ["background_executor"]

_BACKGROUND: ThreadPoolExecutor | None = None


def _forget_background_after_fork() -> None:
    global _BACKGROUND
    _BACKGROUND = None  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_background_after_fork)


def background_executor() -> ThreadPoolExecutor:
    """The process's MFS worker thread (one worker; created on first use)."""
    global _BACKGROUND
    if _BACKGROUND is None:
        _BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taildet-mfs")
    return _BACKGROUND
