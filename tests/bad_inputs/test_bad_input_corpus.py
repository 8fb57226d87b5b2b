"""Every case of the bad-input corpus (bad_input_corpus.py): exit status 2, one line on stderr
naming the file and the item, and nothing under the folder changed (inputs, outputs and the
earlier run in run/ byte for byte as before)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import sys
from pathlib import Path

import pytest

from taildet.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_spec = importlib.util.spec_from_file_location("bad_input_corpus", Path(__file__).with_name("bad_input_corpus.py"))
corpus = importlib.util.module_from_spec(_spec)
sys.modules["bad_input_corpus"] = corpus
_spec.loader.exec_module(corpus)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return corpus.make_base(tmp_path_factory.mktemp("corpus") / "base")


@pytest.fixture
def fresh_logging():
    """taildet's log handler writes to the stderr of the moment it is made: make it anew, so that
    any line a failing command logs lands in this test's captured stderr."""
    logger = logging.getLogger("taildet")
    saved = list(logger.handlers)
    for h in saved:
        logger.removeHandler(h)
    yield
    for h in list(logger.handlers):
        logger.removeHandler(h)
    for h in saved:
        logger.addHandler(h)


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: content hash (files) or ``dir``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("name", list(corpus.CASES))
def test_bad_input_is_one_clear_line_and_changes_nothing(name, base, tmp_path, capsys, monkeypatch, fresh_logging):
    root = tmp_path / "w"
    shutil.copytree(base, root)
    case = corpus.CASES[name](root)
    before = snapshot(root)
    if case.patch is not None:
        case.patch(monkeypatch)
    rc, lines = run_cli(case.argv, capsys)
    assert rc == 2, lines
    assert len(lines) == 1, "\n".join(lines)
    assert lines[0].startswith(f"taildet {case.argv[0]}: error: "), lines[0]
    for text in case.expect:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert snapshot(root) == before
