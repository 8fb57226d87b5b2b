"""Looking at detections (``taildet show``, :mod:`taildet.analysis.show`) and the compare / demo
report's detection grids (:mod:`taildet.compare.grids`).

The fixture: three 32 x 24 (W x H) images whose pixel (x, y) is (8x, 10y, 50) -- no pixel of an
image is white or a group colour, so a pixel tells a drawn outline from the image -- with three
classes, one per frequency group, and a results file. Every expected coordinate below follows
the layout the module docstring documents (tile origin, ``floor(scale * x)`` corners).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taildet.analysis import show
from taildet.analysis.show import (CAPTION_PX, GROUP_COLORS, GT_COLOR, LEGEND_PX, PADDING, default_image_ids,
                                   detection_grid, grid_size, select_detections, upscale)
from taildet.cli import main
from taildet.data.lvis import load_lvis
from taildet.errors import ConfigError, DataError, OutputError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

W, H = 32, 24
RARE, COMMON, FREQ = GROUP_COLORS["r"], GROUP_COLORS["c"], GROUP_COLORS["f"]


def _image_pixels() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([8 * x, 10 * y, np.full_like(x, 50)], axis=-1).astype(np.uint8)


def _write_fixture(root) -> tuple:
    img_dir = root / "images"
    img_dir.mkdir()
    for i in (1, 2, 3):
        Image.fromarray(_image_pixels()).save(img_dir / f"img{i}.png")
    gt = {
        "images": [{"id": i, "file_name": f"img{i}.png", "width": W, "height": H} for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "cat_r", "frequency": "r"}, {"id": 2, "name": "cat_c", "frequency": "c"},
                       {"id": 3, "name": "cat_f", "frequency": "f"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 8], "area": 80, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 2, 8, 8], "area": 64, "iscrowd": 0},
            {"id": 3, "image_id": 3, "category_id": 2, "bbox": [20, 2, 8, 8], "area": 64, "iscrowd": 0},
        ],
    }
    results = [
        {"image_id": 2, "category_id": 1, "bbox": [16, 4, 12, 16], "score": 0.9},   # rare, kept
        {"image_id": 2, "category_id": 3, "bbox": [1, 17, 6, 5], "score": 0.2},     # below 0.3
        {"image_id": 1, "category_id": 2, "bbox": [14, 8, 14, 12], "score": 0.8},   # common on a frequent GT
        {"image_id": 1, "category_id": 3, "bbox": [2, 14, 8, 8], "score": 0.6},     # second best of image 1
    ]
    (root / "annotations").mkdir()
    gt_path, res_path = root / "annotations" / "val.json", root / "results.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(results))
    return gt_path, res_path


@pytest.fixture
def fixture(tmp_path):
    return _write_fixture(tmp_path)


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _image_at(gx: int, gy: int, origin: tuple[int, int], scale: int) -> tuple:
    """The source image's pixel under grid pixel (gx, gy) of the tile at ``origin``."""
    return tuple(_image_pixels()[(gy - origin[1]) // scale, (gx - origin[0]) // scale])


# the grid of the default call below: scale 3, 2 columns, images 2, 3, 1 (rare, common, frequent)
SCALE, COLS = 3, 2
TILE_W, TILE_H = W * SCALE, H * SCALE + CAPTION_PX           # 96, 86
ORIGIN = {2: (PADDING, PADDING), 3: (PADDING + TILE_W + PADDING, PADDING), 1: (PADDING, PADDING + TILE_H + PADDING)}


def test_pure_parts():
    s = torch.tensor([0.5, 0.9, 0.2, 0.9, 0.7])
    assert select_detections(s, 0.3, 3).tolist() == [1, 3, 4]      # ties in input order, 0.5 cut by top-k
    assert select_detections(s, 0.6, 10).tolist() == [1, 3, 4]
    assert select_detections(s, 0.95, 10).tolist() == []
    assert select_detections(torch.tensor([0.3, 0.29]), 0.3, 5).tolist() == [0]   # at the threshold: kept
    img = torch.arange(6, dtype=torch.uint8).reshape(1, 2, 3).expand(3, 2, 3)
    up = upscale(img, 2)
    assert up.shape == (3, 4, 6) and up[0].tolist() == [[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2
    # 2 x 2 tiles of 96 x (72 + caption), padding around and between, legend under
    assert grid_size([(H, W)] * 3, SCALE, COLS) == (2 * (96 + 2) + 2, 2 * (72 + CAPTION_PX + 2) + 2 + LEGEND_PX)
    assert grid_size([(H, W)], SCALE, 4) == (96 + 4, 72 + CAPTION_PX + 4 + LEGEND_PX)   # one column only
    assert grid_size([(10, 40), (30, 20)], 2, 4) == (2 * (80 + 2) + 2, 60 + CAPTION_PX + 4 + LEGEND_PX)
    assert show.default_scale([(96, 96)]) == 4 and show.default_scale([(480, 640)]) == 1


def test_grid_size_boxes_and_pixels(fixture, tmp_path):
    gt, res = fixture
    out = tmp_path / "grid.png"
    info = detection_grid(gt, res, out, score_thresh=0.3, top_k=10, cols=COLS, scale=SCALE)
    assert info["image_ids"] == [2, 3, 1]                        # rare first, then common, then frequent
    assert info["shown"] == {2: 1, 3: 0, 1: 2}
    px = _png(out)
    assert (px.shape[1], px.shape[0]) == (198, 194) == info["size"] == grid_size([(H, W)] * 3, SCALE, COLS)

    def at(x, y):
        return tuple(int(v) for v in px[y, x])

    # image 2: the rare detection [16, 4, 28, 20] -> tile rectangle (48, 12)-(84, 60), 2 px outline, magenta
    ox, oy = ORIGIN[2]
    assert at(ox + 48, oy + 40) == RARE and at(ox + 49, oy + 40) == RARE     # left edge, both px
    assert at(ox + 84, oy + 40) == RARE and at(ox + 70, oy + 60) == RARE     # right and bottom edges
    assert at(ox + 50, oy + 40) == _image_at(ox + 50, oy + 40, (ox, oy), SCALE)  # just inside: the image
    assert at(ox + 80, oy + 55) == _image_at(ox + 80, oy + 55, (ox, oy), SCALE)
    assert at(ox + 47, oy + 40) == _image_at(ox + 47, oy + 40, (ox, oy), SCALE)  # just outside
    # its GT [2, 2, 10, 10] -> (6, 6)-(30, 30), white, 1 px
    assert at(ox + 6, oy + 20) == GT_COLOR and at(ox + 30, oy + 20) == GT_COLOR
    assert at(ox + 7, oy + 20) == _image_at(ox + 7, oy + 20, (ox, oy), SCALE)
    # the 0.2 detection [1, 17, 7, 22] -> (3, 51)-(21, 66) is below the threshold: not drawn
    assert at(ox + 3, oy + 62) == _image_at(ox + 3, oy + 62, (ox, oy), SCALE)
    # image 1: the common class's box (colour of the predicted class, not of the GT's frequent
    # class) [14, 8, 28, 20] -> (42, 24)-(84, 60); the frequent one [2, 14, 10, 22] -> (6, 42)-(30, 66)
    ox, oy = ORIGIN[1]
    assert at(ox + 84, oy + 50) == COMMON and at(ox + 70, oy + 60) == COMMON   # (left edge: under a label)
    assert at(ox + 6, oy + 62) == FREQ and at(ox + 20, oy + 66) == FREQ
    # image 3: no detection; its GT [20, 2, 28, 10] -> (60, 6)-(84, 30)
    ox, oy = ORIGIN[3]
    assert at(ox + 60, oy + 20) == GT_COLOR
    # the empty fourth tile and the padding are black
    assert at(PADDING + TILE_W + PADDING + 40, PADDING + TILE_H + PADDING + 40) == (0, 0, 0)
    assert at(0, 50) == (0, 0, 0) and at(PADDING + TILE_W, 50) == (0, 0, 0)


def test_threshold_and_top_k_drop_the_right_boxes(fixture, tmp_path):
    gt, res = fixture
    ox, oy = ORIGIN[2]
    low = _png(detection_grid(gt, res, tmp_path / "low.png", score_thresh=0.1, cols=COLS, scale=SCALE)["path"])
    assert tuple(low[oy + 62, ox + 3]) == FREQ                    # the 0.2 detection is drawn now
    top1 = detection_grid(gt, res, tmp_path / "top1.png", top_k=1, cols=COLS, scale=SCALE)
    assert top1["shown"] == {2: 1, 3: 0, 1: 1}
    px = _png(top1["path"])
    ox, oy = ORIGIN[1]
    assert tuple(px[oy + 50, ox + 84]) == COMMON                  # the best (0.8) stays
    assert tuple(px[oy + 62, ox + 6]) == _image_at(ox + 6, oy + 62, (ox, oy), SCALE)  # the 0.6 one is gone


def test_chosen_images_default_scale_and_single_tile(fixture, tmp_path):
    gt, res = fixture
    assert default_image_ids(load_lvis(gt), 2) == [2, 3]
    info = detection_grid(gt, res, tmp_path / "one.png", image_ids=[1])
    assert info["scale"] == 384 // W == 12
    px = _png(info["path"])
    assert px.shape == (H * 12 + CAPTION_PX + 2 * PADDING + LEGEND_PX, W * 12 + 2 * PADDING, 3)
    # the common box of image 1 at scale 12: left edge x = 12 * 14 = 168, y from 96 to 240
    assert tuple(px[PADDING + 200, PADDING + 168]) == COMMON


def test_bad_inputs_are_named(fixture, tmp_path):
    gt, res = fixture
    with pytest.raises(DataError, match=r"val.json: image id 99: not an image"):
        detection_grid(gt, res, tmp_path / "g.png", image_ids=[1, 99])
    bad = json.loads(res.read_text())
    bad[2]["category_id"] = 7
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"bad.json: results\[2\]: unknown category_id 7"):
        detection_grid(gt, tmp_path / "bad.json", tmp_path / "g.png")
    with pytest.raises(OutputError, match="would overwrite the results"):
        detection_grid(gt, res, res)
    with pytest.raises(OutputError, match="would overwrite the image 2"):
        detection_grid(gt, res, tmp_path / "images" / "img2.png")
    with pytest.raises(ConfigError, match="top_k"):
        detection_grid(gt, res, tmp_path / "g.png", top_k=0)
    (tmp_path / "images" / "img3.png").unlink()
    with pytest.raises(DataError, match=r"img3.png: image id 3: image file not found"):
        detection_grid(gt, res, tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()                       # nothing written on any error


def test_cli_end_to_end(fixture, tmp_path, capsys):
    gt, res = fixture
    out = tmp_path / "cli.png"
    assert main(["show", str(gt), str(res), "--images", str(tmp_path / "images"), "--out", str(out),
                 "--cols", "2", "--scale", "3", "--image-ids", "1,2"]) == 0
    assert "2 images (1, 2), scale 3, 198x106 px" in capsys.readouterr().out
    px = _png(out)
    assert px.shape[:2] == (106, 198)
    assert tuple(px[PADDING + 50, PADDING + 84]) == COMMON       # image 1 first, as asked
    # an unknown image id: one line naming the GT and the id, exit 2, nothing written
    assert main(["show", str(gt), str(res), "--out", str(tmp_path / "x.png"), "--image-ids", "1,42"]) == 2
    err = capsys.readouterr().err
    assert "val.json: image id 42" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
    # never over an input
    before = gt.read_bytes()
    assert main(["show", str(gt), str(res), "--out", str(gt)]) == 2
    assert "would overwrite the GT" in capsys.readouterr().err and gt.read_bytes() == before


# ------------------------------------------------------------------------ the compare report
def _summary(aprs: dict) -> dict:
    base = {"faster_ce": [], "faster_ce_rfs": ["faster_ce"], "faster_ce+logn": ["faster_ce"], "prior": []}
    return {"recipes": {n: {"baselines": base[n], "stats": {"APr": {"mean": a}}} for n, a in aprs.items()}}


def test_report_grids_baseline_and_best_on_the_same_images(fixture, tmp_path, monkeypatch):
    from taildet.compare import grids

    gt, res = fixture
    out = tmp_path / "cmp"
    for n in ("faster_ce", "faster_ce_rfs", "faster_ce+logn"):   # "prior" has no results file
        (out / "seed0" / n).mkdir(parents=True)
        (out / "seed0" / n / "results_bbox.json").write_bytes(res.read_bytes())
    names = ["prior", "faster_ce", "faster_ce_rfs", "faster_ce+logn"]
    # the best long-tail row follows APr
    summary = _summary({"prior": 50.0, "faster_ce": 6.0, "faster_ce_rfs": 14.5, "faster_ce+logn": 10.2})
    assert grids.grid_recipes(summary, names, out / "seed0") == ["faster_ce", "faster_ce_rfs"]
    flipped = _summary({"prior": 50.0, "faster_ce": 6.0, "faster_ce_rfs": 9.0, "faster_ce+logn": 10.2})
    assert grids.grid_recipes(flipped, names, out / "seed0") == ["faster_ce", "faster_ce+logn"]

    calls = []
    real = grids.detection_grid

    def recording(ds, results, png, **kw):
        calls.append((str(results), kw["image_ids"]))
        return real(ds, results, png, **kw)

    monkeypatch.setattr(grids, "detection_grid", recording)
    lines = grids.detection_grid_section(summary, names, out, "seed0", gt)
    assert [c[0] for c in calls] == [str(out / "seed0" / n / "results_bbox.json") for n in ("faster_ce", "faster_ce_rfs")]
    assert calls[0][1] == calls[1][1] == [2, 3, 1]                   # the same images, rare first
    text = "\n".join(lines)
    assert "![detections faster_ce](detections_faster_ce.png)" in text
    assert "![detections faster_ce_rfs](detections_faster_ce_rfs.png)" in text and "logn" not in text
    assert _png(out / "detections_faster_ce.png").shape == _png(out / "detections_faster_ce_rfs.png").shape


@pytest.mark.slow
def test_compare_report_links_the_grids(tmp_path, monkeypatch):
    """run_compare over finished (reused) runs: report.md shows the baseline's and the best-APr
    recipe's grids, drawn from their own results on the same images."""
    import torch

    from taildet.compare import grids, run_compare
    from taildet.data.synthetic import make_dataset
    from taildet.evaluation import evaluate_lvis, save_metrics

    out = tmp_path / "cmp"
    val = Path(make_dataset(tmp_path / "data" / "synthetic_seed0_scale0.05", seed=0, scale=0.05,
                            progress=False)["val_json"])
    gt = json.loads(val.read_text())
    rare = {c["id"] for c in gt["categories"] if c["frequency"] == "r"}
    other = min(c["id"] for c in gt["categories"] if c["frequency"] == "f")
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    runs = {"faster_ce": [dict(r, category_id=other if r["category_id"] in rare else r["category_id"])
                          for r in perfect],              # rare objects called a frequent class
            "faster_ce_rfs": perfect}
    for name, results in runs.items():
        run = out / "seed0" / name
        run.mkdir(parents=True)
        (run / "results_bbox.json").write_text(json.dumps(results))
        save_metrics(evaluate_lvis(val, results), run / "metrics.json")
        torch.save({"model": {}}, run / "model_final.pth")
    calls = []
    real = grids.detection_grid
    monkeypatch.setattr(grids, "detection_grid",
                        lambda ds, res, png, **kw: calls.append((Path(res).parent.name, kw["image_ids"]))
                        or real(ds, res, png, **kw))
    summary = run_compare(["faster_ce", "faster_ce_rfs"], out, scale=0.05, reuse=True, progress=False, jobs=1)
    assert summary["recipes"]["faster_ce_rfs"]["stats"]["APr"]["mean"] > summary["recipes"]["faster_ce"]["stats"]["APr"]["mean"]
    assert [c[0] for c in calls] == ["faster_ce", "faster_ce_rfs"] and calls[0][1] == calls[1][1]
    report = (out / "report.md").read_text()
    assert "![detections faster_ce](detections_faster_ce.png)" in report
    assert "![detections faster_ce_rfs](detections_faster_ce_rfs.png)" in report
    # each grid drew its own results: the first images hold rare objects, which RFS's results call
    # rare (magenta boxes) and the baseline's call a frequent class (none; the legend strip aside)
    ce, rfs = (_png(out / f"detections_{n}.png")[:-LEGEND_PX] for n in ("faster_ce", "faster_ce_rfs"))
    assert ce.shape == rfs.shape
    assert (ce == RARE).all(axis=-1).sum() == 0 and (rfs == RARE).all(axis=-1).sum() > 100
