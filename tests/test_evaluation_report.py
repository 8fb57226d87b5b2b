"""taildet.evaluation.report: per-class tables, metrics tables, the AP plot, eval_results_main."""

from __future__ import annotations

import json
import math

import pytest

from taildet.evaluation import (
    eval_results_main,
    format_metrics_table,
    format_per_class_table,
    per_class_table,
    plot_per_class_ap,
)


def _gt(lvis=True):
    cats = [{"id": 1, "name": "acorn"}, {"id": 2, "name": "bell"}, {"id": 3, "name": "cup"}]
    if lvis:
        for c, f, n in zip(cats, "rcf", (4, 40, 400)):
            c.update(frequency=f, image_count=n)
    imgs = [{"id": i, "width": 100, "height": 100} for i in (1, 2)]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [10, 10, 40, 40], "area": 1600},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [60, 60, 30, 30], "area": 900}]
    return {"images": imgs, "categories": cats, "annotations": anns}


def _dets():
    return [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "score": 0.9},
            {"image_id": 2, "category_id": 2, "bbox": [10, 10, 40, 40], "score": 0.8}]


def test_per_class_table_rows(tmp_path):
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(_gt()))
    metrics = {"per_class_AP": {1: 1.0, 2: 0.5, 3: float("nan")}}
    rows = per_class_table(metrics, p)
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert rows[0] == {"id": 1, "name": "acorn", "frequency": "r", "train_image_count": 4, "AP": 1.0}
    assert math.isnan(rows[2]["AP"])
    # without image_count: counted from the GT; explicit training counts win
    gt = _gt()
    for c in gt["categories"]:
        del c["image_count"]
    rows = per_class_table(metrics, gt, image_counts={3: 7})
    assert [r["train_image_count"] for r in rows] == [1, 1, 7]
    # string keys (metrics read back from JSON) work too
    rows = per_class_table({"per_class_AP": {"1": 1.0}}, gt)
    assert rows[0]["AP"] == 1.0 and math.isnan(rows[1]["AP"])


def test_format_tables():
    rows = [{"id": 1, "name": "acorn", "frequency": "r", "train_image_count": 4, "AP": 0.1234},
            {"id": 2, "name": "bell", "frequency": "c", "train_image_count": 40, "AP": float("nan")}]
    t = format_per_class_table(rows)
    assert "| 1 | acorn | r | 4 | 12.3 |" in t and "| 2 | bell | c | 40 | - |" in t
    t1 = format_per_class_table(rows, limit=1)
    assert "bell" not in t1 and "1 more rows" in t1
    mt = format_metrics_table({"base": {"AP": 0.25, "APr": float("nan"), "APc": 0.1, "APf": 0.4,
                                        "AP50": 0.5}, "rfs": {"AP": 0.3}})
    lines = mt.splitlines()
    assert lines[0] == "| name | AP | APr | APc | APf | AP50 |"
    assert lines[2] == "| base | 25.0 | - | 10.0 | 40.0 | 50.0 |"
    assert lines[3] == "| rfs | 30.0 | - | - | - | - |"
    assert format_metrics_table({"x": {"AR@100": 0.5}}, keys=("AR@100",)).endswith("| x | 50.0 |")


def test_plot_per_class_ap_writes_png(tmp_path):
    rows = [{"id": i, "name": str(i), "frequency": "rcf"[i % 3], "train_image_count": i * 7,
             "AP": (i % 5) / 5} for i in range(30)]
    rows.append({"id": 99, "name": "nan", "frequency": "r", "train_image_count": 3, "AP": float("nan")})
    out = plot_per_class_ap(rows, tmp_path / "plots" / "ap.png", image_counts={1: 1000})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_results_main_lvis_writes_outputs(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(_gt()))
    res = tmp_path / "res.json"
    res.write_text(json.dumps(_dets()))
    printed = []
    m = eval_results_main(gt, res, out=tmp_path / "out", print_fn=printed.append)
    assert m["protocol"] == "lvis"
    assert m["APr"] == pytest.approx(1.0) and m["APc"] == pytest.approx(51 / 101)
    assert math.isnan(m["APf"])
    text = "\n".join(printed)
    assert "| bbox | " in text and "classes with ground truth: 2 of 3" in text
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["APf"] is None and saved["per_class_AP"]["1"] == pytest.approx(1.0)
    assert (tmp_path / "out" / "per_class_ap.png").stat().st_size > 0
    assert "acorn" in (tmp_path / "out" / "per_class_ap.md").read_text()


def test_eval_results_main_detects_coco(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(_gt(lvis=False)))
    printed = []
    m = eval_results_main(gt, _dets(), print_fn=printed.append)
    assert m["protocol"] == "coco" and "AR@100" in m and "APr" not in m
    assert m["AP"] == pytest.approx((1 + 51 / 101) / 2)
    with pytest.raises(ValueError, match="LVIS"):
        eval_results_main(gt, _dets(), fixed=True, print_fn=printed.append)
