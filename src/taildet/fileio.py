"""Atomic file writes shared by checkpoints, results and metrics.

A file is written to a temporary file in the same directory, flushed and fsynced, then renamed
over the target (``os.replace``): a reader sees the old file or the new one, never half of one,
and a killed writer leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from taildet.errors import OutputError


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Permission bits of written files: what ``open()`` would give (``mkstemp`` makes them 0600).
_FILE_MODE = 0o666 & ~_umask()

#: How the temporary files of :func:`atomic_write` are named: ``.<name>.<random>.tmp``.
TEMP_PATTERN = ".*.tmp"


def _output_error(path: Path, err: BaseException) -> OutputError:
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    with contextlib.suppress(OSError):  # the free space is extra detail; the reason stands without it
        free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
        reason += f" ({free / 2**20:.0f} MiB free on that filesystem)"
    return OutputError(f"cannot write {path}: {reason}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` atomically with ``write(binary_file)``; returns the path.

    A failure to write (disk full, read-only filesystem, a file where a directory should be) is
    an :class:`~taildet.errors.OutputError` naming the file, and leaves no temporary file.
    """
    path = Path(path)
    try:
        directory = str(path.parent.resolve())
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise _output_error(path, err) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # the temporary file is already gone; re-raise the original error below
        # torch.save reports a full disk as a RuntimeError from its zip writer
        if isinstance(err, OSError) or (isinstance(err, RuntimeError) and _disk_problem(directory)):
            raise _output_error(path, err) from None
        raise
    _fsync_dir(directory)
    return path


def _disk_problem(directory: str) -> bool:
    """Whether writing to ``directory`` fails now (full or read-only): tells a failed write from
    an error of the caller's ``write`` function."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=directory)
    except OSError:
        return True
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"\0" * 65536)
            fh.flush()
            os.fsync(fh.fileno())
        return False
    except OSError:
        return True
    finally:
        with contextlib.suppress(OSError):  # a probe that cannot be removed is what a failing disk does
            os.unlink(probe)


def remove_stale_temp_files(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary files interrupted :func:`atomic_write` calls left in ``directory``
    (``.<name>.<random>.tmp``; a killed writer cannot remove its own). Returns their names."""
    removed = []
    for p in Path(directory).glob(TEMP_PATTERN):
        # one that cannot be removed (another user's, read-only) stays: no reader ever picks a
        # temporary file up (last_checkpoint matches final names only)
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p.name)
    return removed


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write the UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def check_output_path(path: str | os.PathLike, *, directory: bool = False, what: str = "output") -> Path:
    """Check, before any work is done, that ``path`` can be written: as a file (``directory=False``)
    or as a directory to create / write into. Returns the path.

    An :class:`~taildet.errors.OutputError` naming ``path`` when it is an existing directory where a
    file is wanted (or a file where a directory is wanted), when one of its parents is a file, or
    when the nearest existing parent cannot be written (a temporary probe file is created there and
    removed: permission bits alone say nothing for root or a read-only filesystem).
    """
    p = Path(path)
    if directory:
        if p.exists() and not p.is_dir():
            raise OutputError(f"cannot write the {what} directory {p}: it exists and is not a directory")
    elif p.is_dir():
        raise OutputError(f"cannot write the {what} file {p}: it is a directory")
    anc = p if directory else p.parent
    anc = Path(os.path.abspath(anc))
    while not anc.exists() and anc != anc.parent:
        if os.path.lexists(anc):  # a dangling link
            raise OutputError(f"cannot write {p}: {anc} is a broken link")
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"cannot write {p}: {anc} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=str(anc))
    except OSError as err:
        raise OutputError(f"cannot write {p}: {anc} is not writable ({err.strerror or err})") from None
    os.close(fd)
    with contextlib.suppress(OSError):  # the probe is empty; one that cannot be removed is harmless
        os.unlink(probe)
    return p


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_not_inputs(outputs: dict[str, str | os.PathLike | None],
                     inputs: dict[str, str | os.PathLike | None]) -> None:
    """No command writes over one of its own inputs: an :class:`~taildet.errors.OutputError`
    naming both when an output file is an input file (same path after resolving links, or a hard
    link of it). ``outputs`` / ``inputs`` map a description (``"--out"``, ``"data.train_json"``)
    to a path; ``None`` entries are ignored."""
    for out_name, out in outputs.items():
        if out is None:
            continue
        for in_name, src in inputs.items():
            if src is not None and _same_file(out, src):
                raise OutputError(f"{out}: the {out_name} would overwrite the {in_name} it reads ({src}); "
                                  "choose another output path")
