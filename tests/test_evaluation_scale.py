"""Issue 13: evaluate_lvis on numpy columns, one faster-coco-eval run per group of categories.

Every number must equal, to the bit, what the list-of-dicts path with one run over everything
(``lvis_eval._evaluate_lvis_dicts``, the implementation before the change) gives -- on the real
100-image LVIS sample and on a small generated LVIS-v1-shaped set, for bbox, AP-fixed and segm,
however the categories are grouped into runs and however the results file is written -- and every
bad input must get the same error.
"""

from __future__ import annotations

import io
import json
import math
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from taildet.errors import DataError
from taildet.evaluation import cap_per_image, evaluate_lvis, top_k_per_class
from taildet.evaluation import federated, result_columns
from taildet.evaluation.lvis_eval import _evaluate_lvis_dicts
from taildet.evaluation.result_columns import cap_order, read_result_columns, top_k_order
from taildet.evaluation.results_json import iter_json_list, read_flat_bbox
from helpers import LVIS_VAL_100, load_benchmark

def same(a, b) -> bool:
    """Equal to the bit (NaN equals NaN), types included, recursively."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def assert_same(new: dict, ref: dict) -> None:
    assert new.keys() == ref.keys()
    for k in new:
        assert same(new[k], ref[k]), (k, new[k] if k != "per_class_AP" else "...", ref[k] if k != "per_class_AP" else "...")


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sample():
    from test_evaluation import perturbed_results

    gt = json.loads(LVIS_VAL_100.read_text())
    return gt, perturbed_results(gt, seed=0), perturbed_results(gt, seed=2, segm=True)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A LVIS-v1-shaped val set at fraction 0.002 (40 images, 300 detections each, 1,203
    categories, neg / not-exhaustive lists) with bbox and RLE results files."""
    gen = load_benchmark("lvis_scale_data")
    out = tmp_path_factory.mktemp("lvis_scale")
    return gen.write_lvis_pair(out, 0.002, points=12, dets=300, segm=True, progress=lambda *a: None)


# ------------------------------------------------------------------------- same numbers
@pytest.mark.parametrize("kind", ["bbox", "fixed", "segm"])
def test_sample_matches_the_list_of_dicts_path(sample, kind):
    gt, bbox, segm = sample
    kw = {"iou_type": "segm"} if kind == "segm" else {"fixed": kind == "fixed"}
    res = segm if kind == "segm" else bbox
    new = evaluate_lvis(LVIS_VAL_100, res, **kw)
    assert 0 < new["AP"] < 1 and new["num_detections"] > 3000
    assert_same(new, _evaluate_lvis_dicts(LVIS_VAL_100, res, **kw))


@pytest.mark.parametrize("kind", ["bbox", "fixed", "segm"])
def test_generated_set_files_match_the_list_of_dicts_path(generated, kind):
    kw = {"iou_type": "segm"} if kind == "segm" else {"fixed": kind == "fixed"}
    res = generated["results_segm" if kind == "segm" else "results"]
    new = evaluate_lvis(generated["val"], res, **kw)
    assert 0 < new["AP"] < 1 and new["num_results"] == 40 * 300
    assert_same(new, _evaluate_lvis_dicts(generated["val"], res, **kw))


def test_segm_with_some_boxes_and_uncompressed_rles_matches(sample):
    """segm areas come from the boxes when the first result has one (missing ones from the masks),
    and uncompressed RLEs are compressed first, as the list-of-dicts path does."""
    from faster_coco_eval.core import mask as mask_utils

    _, _, segm = sample
    res = []
    for i, r in enumerate(segm):
        r = dict(r)
        if i % 3 == 0:
            x, y, w, h = mask_utils.toBbox(r["segmentation"]).tolist()
            r["bbox"] = [x, y, w * 1.5, h] if i % 2 else [x, y, w, h]
        if i % 21 == 0:  # (the list-of-dicts path fails on an uncompressed RLE without a box here)
            h, w = r["segmentation"]["size"]
            flat = mask_utils.decode(r["segmentation"]).ravel(order="F")
            r["segmentation"] = {"size": [h, w], "counts": _uncompressed(flat)}
        res.append(r)
    new = evaluate_lvis(LVIS_VAL_100, res, iou_type="segm")
    assert_same(new, _evaluate_lvis_dicts(LVIS_VAL_100, res, iou_type="segm"))
    plain = evaluate_lvis(LVIS_VAL_100, segm, iou_type="segm")
    assert [new[k] for k in ("APs", "APm", "APl")] != [plain[k] for k in ("APs", "APm", "APl")]  # box areas count


def _uncompressed(flat: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts of a column-major 0/1 mask: run lengths, zeros first."""
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [len(flat)]])).tolist()
    return ([0] + runs) if len(flat) and flat[0] else runs


@pytest.fixture(scope="module")
def sample_metrics(sample):
    return evaluate_lvis(LVIS_VAL_100, sample[1])


@pytest.mark.parametrize("cost, max_dets", [(0, 10**9), (10**9, 10**9), (10**9, 200)])
def test_grouping_of_categories_into_runs_does_not_change_a_bit(sample, sample_metrics, monkeypatch, cost, max_dets):
    """One run per category, one run for all, runs cut by the detection limit: a category's
    numbers do not depend on the other categories or images of its run."""
    gt, bbox, _ = sample
    ref = sample_metrics
    monkeypatch.setattr(federated, "RUN_COST", cost)
    monkeypatch.setattr(federated, "RUN_DETECTIONS", max_dets)
    assert_same(evaluate_lvis(LVIS_VAL_100, bbox), ref)


def _write(path, res, **dump):
    path.write_text(json.dumps(res, **dump))
    return path


@pytest.mark.parametrize("layout", ["compact", "indent", "keys_reordered", "one_odd_record", "float_ids"])
def test_any_way_of_writing_the_file_reads_the_same(generated, tmp_path, layout):
    """The fast reader (flat records written alike) and the general one give json.load's values."""
    res = json.loads(Path(generated["results"]).read_text())[:3000]
    dump = {}
    if layout == "compact":
        dump = {"separators": (",", ":")}
    elif layout == "indent":
        dump = {"indent": 2}
    elif layout == "keys_reordered":
        res = [{"score": r["score"], "bbox": r["bbox"], "image_id": r["image_id"], "category_id": r["category_id"]}
               for r in res]
    elif layout == "one_odd_record":
        res[2345] = dict(res[2345], area=5.0)  # an extra key the evaluation ignores
    elif layout == "float_ids":
        res[17] = dict(res[17], image_id=float(res[17]["image_id"]))  # an error, named the same way
    path = _write(tmp_path / "res.json", res, **dump)
    if layout == "float_ids":
        assert "results[17]: image_id must be an integer" in _errors_match(generated["val"], path)
        return
    ids = federated.PairIndex(json.loads(Path(generated["val"]).read_text()))
    got, want = read_result_columns(path, ids, "bbox"), read_result_columns(res, ids, "bbox")
    for k in ("image_id", "category_id", "score", "bbox", "has_bbox"):
        assert getattr(got, k).dtype == getattr(want, k).dtype
        assert getattr(got, k).tobytes() == getattr(want, k).tobytes(), k


# ------------------------------------------------------------------------------- readers
def test_flat_reader_is_json_load_in_any_piece_size(generated):
    for chunk in (97, 4096, 1 << 20):
        data = Path(generated["results"]).read_bytes()
        if chunk < 4096:
            data = data[:data.index(b"}", 30_000) + 1] + b"]"
        want = json.loads(data)
        cols = read_flat_bbox(io.BytesIO(data), chunk_bytes=chunk)
        assert cols["image_id"].tolist() == [r["image_id"] for r in want]
        assert cols["category_id"].tolist() == [r["category_id"] for r in want]
        assert cols["score"].tobytes() == np.array([r["score"] for r in want], dtype=np.float64).tobytes()
        assert cols["bbox"].tobytes() == np.array([r["bbox"] for r in want], dtype=np.float64).tobytes()
        elements = [e for batch in iter_json_list(io.BytesIO(data), batch=1000, chunk_bytes=chunk) for e in batch]
        assert elements == want


@pytest.mark.parametrize("number, valid", [
    ("0.5", True), ("1e-05", True), ("-0", True), ("0", True), ("1E+2", True), ("2.50", True), ("1.5e300", True),
    ("123456789.123456789", True), ("4.9e-324", True), ("-0.0", True), ("12345678901234567890123", True),
    ("01", False), (".5", False), ("1.", False), ("+1", False), ("1.e5", False), ("-.5", False), ("00", False),
    ("1e", False), ("--1", False), ("0x1", False), ("NaN", False),
])
def test_flat_reader_reads_numbers_as_json_does(number, valid):
    recs = b",".join(b'{"image_id": %d, "category_id": 3, "bbox": [1.5, 2, 30, 40], "score": %s}'
                     % (i, number.encode() if i == 1 else b"0.25") for i in range(3))
    data = b"[" + recs + b"]"
    cols = read_flat_bbox(io.BytesIO(data))
    if not valid:
        assert cols is None  # the general reader then gives json's own verdict
        return
    want = float(json.loads(data)[1]["score"])
    assert struct.pack("<d", cols["score"][1]) == struct.pack("<d", want)


def test_flat_reader_declines_ids_that_are_not_json_integers():
    for image_id in (b"1.0", b"1e2", b"10000000000000000"):
        data = b'[{"image_id": 5, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 0.5}, ' \
               b'{"image_id": %s, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 0.5}]' % image_id
        assert read_flat_bbox(io.BytesIO(data)) is None


def test_cap_and_top_k_orders_are_the_dict_functions_orders():
    rng = random.Random(0)
    res = [{"image_id": rng.randrange(6), "category_id": rng.randrange(4), "k": i,
            "score": rng.choice([0.1, 0.5, 0.5, 0.9, -0.0, 0.0])} for i in range(400)]
    img = np.array([r["image_id"] for r in res])
    cat = np.array([r["category_id"] for r in res])
    score = np.array([r["score"] for r in res])
    for k in (-1, 0, 1, 5, 60, 100, 1000):
        assert cap_order(img, score, k).tolist() == [r["k"] for r in cap_per_image(res, k)]
        assert top_k_order(cat, score, k).tolist() == [r["k"] for r in top_k_per_class(res, k)]


# ------------------------------------------------------------------------------ same errors
def _errors_match(gt, res, **kw) -> str:
    with pytest.raises(DataError) as ref:
        _evaluate_lvis_dicts(gt, res, **kw)
    with pytest.raises(DataError) as new:
        evaluate_lvis(gt, res, **kw)
    assert str(new.value) == str(ref.value)
    assert (new.value.file, new.value.item) == (ref.value.file, ref.value.item)
    return str(new.value)


_BAD = [
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}, "missing key 'score'"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": float("nan")}, "finite"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, float("inf"), 1], "score": 0.5}, "non-finite"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1], "score": 0.5}, ">= 0"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 0.5}, "4 numbers"),
    ({"image_id": 1, "category_id": 99999, "bbox": [0, 0, 1, 1], "score": 0.5}, "unknown category_id 99999"),
    ({"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}, "unknown image_id 7"),
    ({"image_id": "1", "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}, "image_id must be an integer"),
    ({"image_id": 1, "category_id": True, "bbox": [0, 0, 1, 1], "score": 0.5}, "category_id must be an integer"),
    ({"image_id": 10**30, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}, "unknown image_id"),
    ({"image_id": 1, "category_id": 1, "bbox": None, "score": 0.5}, "4 numbers"),
    ("oops", "must be a dict"),
]


@pytest.mark.parametrize("bad, match", _BAD)
@pytest.mark.parametrize("where", [2, 23])
def test_bad_result_gets_the_same_error(sample, tmp_path, monkeypatch, bad, match, where):
    """At the start and in a later batch of results (batches of 7 here)."""
    monkeypatch.setattr(result_columns, "_BATCH", 7)
    gt, bbox, _ = sample
    if isinstance(bad, dict):  # id 1 stands for a valid id
        bad = dict(bad, **{k: gt[g][0]["id"] for k, g in (("image_id", "images"), ("category_id", "categories"))
                           if type(bad.get(k)) is int and bad[k] == 1})
    res = bbox[:where] + [bad] + bbox[:50]
    assert match in _errors_match(LVIS_VAL_100, res)
    if where == 2 or match in ("finite", "unknown image_id 7"):  # a file too (NaN is written as NaN)
        path = tmp_path / "res.json"
        path.write_text(json.dumps(res))
        assert f"results[{where}]" in _errors_match(LVIS_VAL_100, path)


@pytest.mark.parametrize("text, match", [
    ('{"not": "a list"}', "JSON list"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}', "not valid JSON"),
    ('\ufeff[]', "not valid JSON"),
    ('[1, 2] 3', "not valid JSON"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 01}]', "not valid JSON"),
])
def test_bad_results_file_gets_the_same_error(tmp_path, text, match):
    path = tmp_path / "res.json"
    path.write_text(text, encoding="utf-8")
    assert match in _errors_match(LVIS_VAL_100, path)


def test_unreadable_results_files_get_the_same_error(tmp_path):
    (tmp_path / "bin.json").write_bytes(b"[\xff\xfe\x00binary]")
    assert "not a JSON text file" in _errors_match(LVIS_VAL_100, tmp_path / "bin.json")
    assert "not a JSON text file" in _errors_match(LVIS_VAL_100, tmp_path)
    assert "results file not found" in _errors_match(LVIS_VAL_100, tmp_path / "missing.json")


def test_a_syntax_error_after_a_bad_result_wins_as_with_json_load(sample, tmp_path):
    gt, bbox, _ = sample
    text = json.dumps(bbox[:3] + [{"image_id": 1}] + bbox)
    path = tmp_path / "res.json"
    path.write_text(text[:-1] + ", }")
    assert "not valid JSON" in _errors_match(LVIS_VAL_100, path)


def test_bad_segm_results_get_the_same_error(sample, tmp_path):
    gt, _, segm = sample
    bad_rle = dict(segm[5], segmentation={"size": segm[5]["segmentation"]["size"], "counts": "\x7f\x7f!!zz"})
    wrong_size = dict(segm[7], segmentation={"size": [3, 3], "counts": [9]})
    polygon = dict(segm[9], segmentation=[[0, 0, 5, 0, 5, 5]])
    for bad, match in ((bad_rle, "alphabet"), (wrong_size, "RLE size [3, 3] != image"), (polygon, "not a polygon")):
        res = segm[:40] + [bad] + segm[40:]
        assert match in _errors_match(LVIS_VAL_100, res, iou_type="segm")
        path = tmp_path / "res.json"
        path.write_text(json.dumps(res))
        assert match in _errors_match(LVIS_VAL_100, path, iou_type="segm")
