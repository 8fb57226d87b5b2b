"""Errors taildet raises for bad user input.

Every error about user data names the file, the item and what is wrong, so a user never has to
read a traceback from deep inside torch to find the broken annotation.
"""

from __future__ import annotations

from typing import Any


class TaildetError(Exception):
    """Base class of every error taildet raises on purpose."""


class DataError(TaildetError, ValueError):
    """Invalid input data (annotation JSON, images, results files, statistics files).

    Args:
        file: the path of the offending file (or a short description when there is none).
        item: the offending item, e.g. ``"annotation id 17"`` or ``"images[3]"``; may be empty.
        problem: what is wrong, in words.
    """

    def __init__(self, file: Any, item: str | None = None, problem: str | None = None):
        if item is None and problem is None:
            # re-created from a message alone: torch's DataLoader re-raises a worker's exception
            # as ``type(msg)`` with the worker's traceback text; keep only the original message
            text = str(file)
            marker = f"{type(self).__name__}: "
            lines = [ln for ln in text.splitlines() if ln.strip()]
            last = next((ln for ln in reversed(lines) if marker in ln), text)
            text = last.split(marker, 1)[1] if marker in last else last
            self.file, self.item, self.problem = text, "", ""
            super().__init__(text)
            return
        self.file = str(file)
        self.item = item or ""
        self.problem = problem or ""
        where = f"{self.file}: {item}: " if item else f"{self.file}: "
        super().__init__(where + self.problem)


class OutputError(TaildetError):
    """A file taildet must write could not be written (disk full, read-only, not a directory):
    names the file and the reason."""


class ConfigError(TaildetError, ValueError):
    """Invalid configuration: names the key and what is wrong."""


class TrainingDivergedError(TaildetError, RuntimeError):
    """Training stopped on a non-finite loss / gradients / parameters: names the iteration and the
    loss terms; the checkpoints written before are kept (``last good`` is ``checkpoint``)."""

    def __init__(self, message: str, iteration: int, loss_terms: dict[str, float] | None = None,
                 checkpoint: str | None = None):
        super().__init__(message)
        self.iteration = iteration
        self.loss_terms = dict(loss_terms or {})
        self.checkpoint = checkpoint
