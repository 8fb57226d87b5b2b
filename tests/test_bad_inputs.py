"""Bad inputs found by an audit: each is a clear error naming the file / item, not a traceback
from deep inside torch or pycocotools, a hang or silently wrong data."""

from __future__ import annotations

import pytest
import torch

from taildet.data.lvis import _check_segmentation, rle_counts_problem
from taildet.engine.checkpoint import CheckpointError, load_model_weights
from taildet.errors import DataError
from taildet.evaluation.results_io import load_results


class _BadItem(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise DataError("train.json", f"image id {i}", "image file missing")


def test_data_error_in_a_loader_worker_keeps_its_one_line_message():
    loader = torch.utils.data.DataLoader(_BadItem(), batch_size=1, num_workers=1)
    with pytest.raises(DataError) as ei:
        next(iter(loader))
    assert str(ei.value) == "train.json: image id 0: image file missing"


def test_rle_counts_are_validated():
    assert rle_counts_problem([1, 2, 3], 2, 3) is None
    assert "sum to 15 pixels" in rle_counts_problem([10, 5], 480, 640)
    assert "non-negative integers" in rle_counts_problem([-5, 10], 1, 5)
    assert "empty string" in rle_counts_problem("", 4, 4)
    assert "alphabet" in rle_counts_problem("\x7f\x7f!!zz", 4, 4)
    assert rle_counts_problem("PPYo1", 4, 4) is None  # valid characters (length not decodable cheaply)
    assert "ASCII" in rle_counts_problem("é€".encode(), 4, 4)


def test_garbage_rle_in_a_results_file_is_an_error_not_a_hang():
    res = [{"image_id": 1, "category_id": 1, "score": 0.5,
            "segmentation": {"size": [4, 4], "counts": "\x7f\x7f!!zz"}}]
    with pytest.raises(DataError, match=r"results\[0\].*alphabet"):
        load_results(res, iou_type="segm")


def test_polygon_far_outside_the_image_is_rejected():
    assert _check_segmentation([[1.0, 1.0, 10.0, 1.0, 10.0, 10.0]], 20, 20) is None
    assert _check_segmentation([[-0.5, 0.0, 20.5, 0.0, 20.0, 20.0]], 20, 20) is None  # 1 px tolerance
    assert "extends beyond the 20x20 image" in _check_segmentation([[1e300, 0, 10, 0, 10, 10]], 20, 20)
    assert "RLE 'counts' sum" in _check_segmentation({"size": [2, 2], "counts": [1, 1]}, 2, 2)


def test_checkpoint_that_does_not_fit_names_the_file_and_what_it_was():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    wrong = {"0.weight": torch.zeros(5, 3), "0.bias": torch.zeros(5), "1.weight": torch.zeros(1)}
    cfg = {"model": {"arch": "retinanet", "loss": "sigmoid_focal", "num_classes": 4}}
    with pytest.raises(CheckpointError, match=r"ck\.pth: the checkpoint does not fit .*shape \(5, 3\) in the "
                                              r"checkpoint, \(4, 3\) in the model for 0\.weight.*1 unexpected key"
                                              r".*trained as arch 'retinanet'"):
        load_model_weights(model, wrong, "ck.pth", cfg)


def test_checkpoint_whose_model_entry_is_not_a_state_dict(tmp_path):
    from taildet.engine.checkpoint import load_checkpoint

    torch.save({"model": 5}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd\.pth: not a taildet checkpoint \('model' is not a state dict"):
        load_checkpoint(tmp_path / "odd.pth")


def test_bad_loss_kwargs_values_name_the_config_keys():
    from taildet.errors import ConfigError
    from taildet.losses import build_loss

    with pytest.raises(ConfigError, match=r"model\.loss_kwargs of loss 'seesaw' \(\{'p': 'abc'\}\)"):
        build_loss("seesaw", 5, p="abc")
    with pytest.raises(ConfigError, match=r"p and q must be >= 0"):
        build_loss("seesaw", 5, p=-1)


def test_eval_results_inputs_that_are_not_json_text(tmp_path):
    from taildet.evaluation.lvis_eval import load_gt

    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00binary")
    for bad in (tmp_path, tmp_path / "bin.json"):
        with pytest.raises(DataError, match="not a JSON text file"):
            load_results(bad)
        with pytest.raises(DataError, match="not a JSON text file"):
            load_gt(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda g: g["annotations"][0].update(image_id=123456789), r"annotations\[0\] \(id 1\): unknown image_id 123456789"),
    (lambda g: g["annotations"][0].update(category_id=99), r"unknown category_id 99"),
    (lambda g: g["annotations"][0].update(bbox=[1, 2, 3]), r"bbox must be \[x, y, w, h\]"),
    (lambda g: g["annotations"][0].update(bbox=[1, 2, float("nan"), 3]), r"bbox must be"),
    (lambda g: g["annotations"][0].update(area="big"), r"area must be a finite number"),
    (lambda g: g["annotations"].append(dict(g["annotations"][0])), r"duplicate annotation id 1"),
    (lambda g: g["images"].append(dict(g["images"][0])), r"duplicate image id 1"),
    (lambda g: g["categories"].append(dict(g["categories"][0])), r"duplicate category id 1"),
    (lambda g: g["images"][0].update(id="abc"), r"image id must be an integer"),
    (lambda g: g["images"][0].update(neg_category_ids=5), r"neg_category_ids must be a list of category ids"),
    (lambda g: g["images"][0].update(neg_category_ids="1,2"), r"neg_category_ids must be a list"),
    (lambda g: g["images"][0].update(not_exhaustive_category_ids=[77]), r"unknown category ids \[77\]"),
])
def test_evaluation_gt_is_validated(tmp_path, edit, message):
    import json

    from taildet.evaluation.lvis_eval import load_gt

    gt = {"images": [{"id": 1, "height": 10, "width": 10, "neg_category_ids": [], "not_exhaustive_category_ids": []}],
          "categories": [{"id": 1, "name": "a", "frequency": "r"}, {"id": 2, "name": "b", "frequency": "f"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16}]}
    load_gt(gt)  # valid as is
    edit(gt)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(DataError, match=message):
        load_gt(path)


@pytest.mark.parametrize("field, value, message", [
    ("neg_category_ids", [9], r"image id 1: neg_category_ids has unknown category ids \[9\]"),
    ("not_exhaustive_category_ids", "abc", r"not_exhaustive_category_ids must be a list of category ids"),
    ("file_name", 5, r"image id 1: file_name must be a string"),
])
def test_lvis_image_fields_are_validated(tmp_path, field, value, message):
    import json

    from taildet.data import load_lvis

    gt = {"images": [{"id": 1, "height": 10, "width": 10, "file_name": "a.jpg", field: value}],
          "categories": [{"id": 1, "name": "a", "frequency": "r"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(DataError, match=message):
        load_lvis(path, tmp_path)
