"""benchmarks/errors_scale.py: the error analysis measured at fractions of LVIS val, extrapolated to
the full size with a least-squares line, written as a measured-tables file for the docs."""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark

@pytest.fixture(scope="module")
def bench():
    return load_benchmark("errors_scale")


def test_extrapolation_is_the_least_squares_line(bench):
    assert bench.extrapolate([0.1, 0.2], [2.0, 3.0]) == pytest.approx(11.0)  # 1 + 10 x
    # (0, 1), (0.5, 1), (1, 4): slope 3, intercept 0.5 -> 3.5 at 1
    assert bench.extrapolate([0.0, 0.5, 1.0], [1.0, 1.0, 4.0]) == pytest.approx(3.5)


def test_bad_fractions_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--fractions", "0.1"])
    with pytest.raises(SystemExit):
        bench.main(["--fractions", "0.1", "1.5"])


def test_all_evaluated_results_move_only_unevaluated_detections(bench, tmp_path):
    """Detections of a class neither annotated on their image nor negative there get one of the
    image's classes; the others and every other field stay; an image with no class keeps its own."""
    val = tmp_path / "val.json"
    val.write_text(json.dumps({
        "images": [{"id": 1, "neg_category_ids": [7]}, {"id": 2, "neg_category_ids": []},
                   {"id": 3, "neg_category_ids": []}],
        "annotations": [{"image_id": 1, "category_id": 3}, {"image_id": 2, "category_id": 5}]}))
    dets = [{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 0.9},
            {"image_id": 1, "category_id": 9, "bbox": [5, 6, 7, 8], "score": 0.8},
            {"image_id": 2, "category_id": 9, "bbox": [0, 0, 1, 1], "score": 0.7},
            {"image_id": 3, "category_id": 9, "bbox": [0, 0, 2, 2], "score": 0.6}]
    res = tmp_path / "results.json"
    res.write_text(json.dumps(dets))
    out = json.loads(bench.write_all_evaluated(val, res, tmp_path / "all.json").read_text())
    assert out[0] == dets[0] and out[3] == dets[3]
    assert out[1]["category_id"] in (3, 7) and out[2]["category_id"] == 5
    assert [{k: v for k, v in d.items() if k != "category_id"} for d in out] == \
        [{k: v for k, v in d.items() if k != "category_id"} for d in dets]


@pytest.mark.slow  # generates two tiny LVIS-shaped sets and runs 8 CLI processes (about 25 s)
def test_measures_each_fraction_and_the_analysed_detections(bench, tmp_path):
    from taildet.evaluation.error_analysis import error_breakdown

    out = tmp_path / "bench.json"
    assert bench.main(["--fractions", "0.002", "0.001", "--points", "4", "--data", str(tmp_path / "data"),
                       "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["tables"]["errors"]["rows"]
    assert [r[:3] for r in rows] == [["0.001", "as generated", 20], ["0.002", "as generated", 40],
                                     ["1 (extrapolated)", "as generated", 19_809], ["0.001", "all evaluated", 20],
                                     ["0.002", "all evaluated", 40], ["1 (extrapolated)", "all evaluated", 19_809]]
    data = tmp_path / "data" / "f0.001_p4_d300"
    want = error_breakdown(data / "val.json", data / "results.json")["num_detections"]
    assert rows[0][3] == want > 0  # parsed from the command's output
    every = len(json.loads((data / "results_all_evaluated.json").read_text()))
    assert rows[3][3] == error_breakdown(data / "val.json", data / "results_all_evaluated.json")["num_detections"]
    assert want < rows[3][3] <= every
    assert all(r[k] > 0 for r in rows if r[3] for k in (4, 5, 6, 7))
    assert rows[2][6] == pytest.approx(bench.extrapolate([0.001, 0.002], [rows[0][6], rows[1][6]]), abs=0.051)
