"""benchmarks/errors_scale.py: the error analysis measured at fractions of LVIS val, extrapolated to
the full size with a least-squares line, written as a measured-tables file for the docs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("errors_scale", ROOT / "benchmarks" / "errors_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_extrapolation_is_the_least_squares_line(bench):
    assert bench.extrapolate([0.1, 0.2], [2.0, 3.0]) == pytest.approx(11.0)  # 1 + 10 x
    # (0, 1), (0.5, 1), (1, 4): slope 3, intercept 0.5 -> 3.5 at 1
    assert bench.extrapolate([0.0, 0.5, 1.0], [1.0, 1.0, 4.0]) == pytest.approx(3.5)


def test_bad_fractions_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--fractions", "0.1"])
    with pytest.raises(SystemExit):
        bench.main(["--fractions", "0.1", "1.5"])


@pytest.mark.slow  # generates two tiny LVIS-shaped sets and runs 4 CLI processes (about 20 s)
def test_measures_each_fraction_and_the_analysed_detections(bench, tmp_path):
    from taildet.evaluation.error_analysis import error_breakdown

    out = tmp_path / "bench.json"
    assert bench.main(["--fractions", "0.002", "0.001", "--points", "4", "--data", str(tmp_path / "data"),
                       "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["tables"]["errors"]["rows"]
    assert [r[0] for r in rows] == ["0.001", "0.002", "1 (extrapolated)"]
    assert [r[1] for r in rows] == [20, 40, 19_809]
    data = tmp_path / "data" / "f0.001_p4_d300"
    want = error_breakdown(data / "val.json", data / "results.json")["num_detections"]
    assert rows[0][2] == want > 0  # parsed from the command's output
    assert all(r[k] > 0 for r in rows[:2] for k in (3, 4, 5, 6))
    assert rows[2][5] == pytest.approx(bench.extrapolate([0.001, 0.002], [rows[0][5], rows[1][5]]), abs=0.051)
