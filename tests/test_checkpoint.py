"""Atomic checkpoints: round trip, crash during write, corrupt files, newest-checkpoint lookup."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from taildet.engine.checkpoint import (CheckpointError, get_rng_state, last_checkpoint, load_checkpoint,
                                       save_checkpoint, set_rng_state)


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((3,), v)}, "iteration": int(v), "config": {"a": 1}}


def test_round_trip_and_pointer(tmp_path):
    p = save_checkpoint(tmp_path / "checkpoint_0000010.pth", **_state(10))
    s = load_checkpoint(p)
    assert torch.equal(s["model"]["w"], torch.full((3,), 10.0)) and s["iteration"] == 10
    assert "taildet_version" in s
    assert (tmp_path / "last_checkpoint").read_text().strip() == "checkpoint_0000010.pth"
    save_checkpoint(tmp_path / "checkpoint_0000020.pth", **_state(20))
    assert last_checkpoint(tmp_path).endswith("checkpoint_0000020.pth")
    save_checkpoint(tmp_path / "model_final.pth", **_state(30))
    assert last_checkpoint(tmp_path).endswith("model_final.pth")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_last_checkpoint_fallbacks(tmp_path):
    assert last_checkpoint(tmp_path) is None
    assert last_checkpoint(tmp_path / "missing") is None
    save_checkpoint(tmp_path / "checkpoint_0000005.pth", **_state(5))
    save_checkpoint(tmp_path / "checkpoint_0000040.pth", **_state(40))
    os.remove(tmp_path / "last_checkpoint")
    assert last_checkpoint(tmp_path).endswith("checkpoint_0000040.pth")
    (tmp_path / "last_checkpoint").write_text("gone.pth\n")  # dangling pointer
    assert last_checkpoint(tmp_path).endswith("checkpoint_0000040.pth")


def test_crash_during_write_keeps_previous(tmp_path, monkeypatch):
    good = save_checkpoint(tmp_path / "checkpoint_0000001.pth", **_state(1))
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04partial-bytes")  # a few bytes, then the "crash"
        raise KeyboardInterrupt("simulated kill during write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "checkpoint_0000002.pth", **_state(2))
    # same target name as an existing checkpoint: the old file must survive too
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(good, **_state(99))
    monkeypatch.setattr(torch, "save", real_save)
    assert not (tmp_path / "checkpoint_0000002.pth").exists()
    assert last_checkpoint(tmp_path) == str(good)
    assert load_checkpoint(good)["iteration"] == 1
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_missing_and_corrupt_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.pth"):
        load_checkpoint(tmp_path / "nothere.pth")
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth"):
        load_checkpoint(bad)
    good = save_checkpoint(tmp_path / "c.pth", **_state(1))
    data = open(good, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="broken.pth"):
        load_checkpoint(bad)
    torch.save({"no_model": 1}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="other.pth"):
        load_checkpoint(tmp_path / "other.pth")


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint(tmp_path / "c.pth", model={}, rng=get_rng_state())
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(load_checkpoint(tmp_path / "c.pth")["rng"])
    b = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert a == b


def test_atomic_write_text_replaces_whole_file_or_keeps_old(tmp_path):
    from taildet.fileio import atomic_write, atomic_write_text

    target = tmp_path / "sub" / "m.json"
    atomic_write_text("first\n", target)
    assert target.read_text() == "first\n"

    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(target, broken)
    assert target.read_text() == "first\n"
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]  # no temporary file left


def test_atomic_write_errors_name_the_file_and_files_are_readable(tmp_path):
    from taildet.errors import OutputError
    from taildet.fileio import atomic_write, atomic_write_text

    target = tmp_path / "a.txt"
    atomic_write_text("x", target)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~_umask())  # not mkstemp's 0600
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match=r"cannot write .*file/sub/b\.txt"):
        atomic_write_text("x", blocker / "sub" / "b.txt")  # a file where a directory should be
    # a directory the user may not write to (simulated: CI runs as root, which ignores modes)
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    mp = pytest.MonkeyPatch()
    mp.setattr(tempfile, "mkstemp", denied)
    try:
        with pytest.raises(OutputError, match=r"cannot write .*ro/c\.txt: Permission denied"):
            atomic_write_text("x", tmp_path / "ro" / "c.txt")
    finally:
        mp.undo()
    # a full disk while writing: named, no temporary file left
    import errno

    def full(fh):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=r"cannot write .*e\.bin: No space left on device \(\d+ MiB free"):
        atomic_write(tmp_path / "e.bin", full)
    # an error of the caller's own write function is not an output error

    def boom(fh):
        raise RuntimeError("not a disk problem")

    with pytest.raises(RuntimeError, match="not a disk problem"):
        atomic_write(tmp_path / "d.bin", boom)
    assert not list(tmp_path.glob(".*.tmp"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
