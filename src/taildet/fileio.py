"""Atomic file writes shared by checkpoints, results and metrics.

A file is written to a temporary file in the same directory, flushed and fsynced, then renamed
over the target (``os.replace``): a reader sees the old file or the new one, never half of one,
and a killed writer leaves the previous file intact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _fsync_dir(directory: str) -> None:
    """Make the rename durable (best effort: some filesystems cannot fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported here; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` atomically with ``write(binary_file)``; returns the path."""
    path = Path(path)
    directory = str(path.parent.resolve())
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # the temporary file is already gone; re-raise the original error below
        raise
    _fsync_dir(directory)
    return path


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write the UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
