"""taildet.analysis.error_seeds (``taildet errors-table``): the error analysis of compared recipes over
every replicate, mean +- sd per column, written as a measured-tables file the docs can name."""

from __future__ import annotations

import json
import statistics

import pytest

from taildet.analysis.error_seeds import COLUMNS, error_rows, replicate_dirs
from taildet.cli import main
from taildet.errors import DataError
from taildet.evaluation.error_analysis import error_breakdown
from taildet.results_docs import format_measured_table, load_measured_tables
from test_error_analysis import MAIN_DETS, MAIN_GT


def _compare_dir(tmp_path):
    """seed0 and seed1 of recipe ``a`` (seed1 without the two background errors), seed0 only of ``b``,
    plus folders that are not replicates."""
    root = tmp_path / "cmp"
    runs = {("seed0", "a"): MAIN_DETS, ("seed1", "a"): [d for d in MAIN_DETS if d["bbox"][:2] not in
                                                         ([80, 0], [0, 80])],
            ("seed0", "b"): MAIN_DETS[:4]}
    for (rep, recipe), dets in runs.items():
        (root / rep / recipe).mkdir(parents=True, exist_ok=True)
        (root / rep / recipe / "results_bbox.json").write_text(json.dumps(dets))
    (root / "errors_a").mkdir()
    (root / "seed1" / "errors_a").mkdir()
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(MAIN_GT))
    return gt, root, runs


def test_rows_are_mean_and_sd_of_each_replicates_breakdown(tmp_path):
    gt, root, runs = _compare_dir(tmp_path)
    assert [d.name for d in replicate_dirs(root)] == ["seed0", "seed1"]
    rows = error_rows(gt, root, ["a", "b"])
    assert [r[:2] for r in rows] == [["a", 2], ["b", 1]]
    reports = [error_breakdown(MAIN_GT, runs[("seed0", "a")]), error_breakdown(MAIN_GT, runs[("seed1", "a")])]
    names = [c for c, _ in COLUMNS]
    for k, (name, fn) in enumerate(COLUMNS):
        vals = [fn(r) for r in reports]
        assert rows[0][2 + k] == f"{statistics.fmean(vals):.1f} ± {statistics.stdev(vals):.1f}", name
    # removing the two background errors: Bkg's dAP50 is 0 in seed1, positive in seed0
    bkg = [COLUMNS[names.index("dAP50 Bkg")][1](r) for r in reports]
    assert bkg[0] > 0 and bkg[1] == 0
    # one replicate: the value alone, no sd
    one = error_breakdown(MAIN_GT, runs[("seed0", "b")])
    assert rows[1][2] == f"{COLUMNS[0][1](one):.1f}"


def test_a_recipe_without_results_is_named(tmp_path):
    gt, root, _ = _compare_dir(tmp_path)
    with pytest.raises(DataError, match="recipe 'c'.*seed0, seed1"):
        error_rows(gt, root, ["a", "c"])
    with pytest.raises(DataError, match="not found"):
        replicate_dirs(tmp_path / "missing")


def test_cli_writes_a_table_the_docs_render(tmp_path, capsys):
    gt, root, _ = _compare_dir(tmp_path)
    out = tmp_path / "errors.json"
    assert main(["errors-table", str(gt), str(root), "--recipes", "a,b", "--json", str(out)]) == 0
    doc = load_measured_tables(out)
    table = doc["tables"]["errors"]
    assert table["columns"][:3] == ["recipe", "n", "AP50"] and [r[0] for r in table["rows"]] == ["a", "b"]
    md = format_measured_table(doc, "errors")
    assert "| a | 2 |" in md and "taildet errors-table" in md
    # the output may not be the ground truth; nothing is written over it
    before = gt.read_text()
    assert main(["errors-table", str(gt), str(root), "--recipes", "a", "--json", str(gt)]) == 2
    assert gt.read_text() == before
    assert "ground truth" in capsys.readouterr().err
