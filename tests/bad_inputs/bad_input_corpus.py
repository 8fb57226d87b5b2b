"""The bad-input corpus: malformed inputs for the ``taildet`` command line, written at test time.

Nothing here is a stored blob: :func:`make_base` writes a small valid set-up (the embedded
synthetic dataset at scale 0.05, an untrained tiny Faster R-CNN checkpoint, and an earlier run in
``run/`` that a failing command must leave alone), and each function of :data:`CASES` writes one
malformed input next to it and returns the command line that must reject it.

Every case's command must exit with status 2, print ONE line ``taildet CMD: error: ...`` on
stderr that holds each string of ``Case.expect`` (the file and the item), and leave every file
under the folder (inputs, outputs, the earlier run) byte for byte as it was.

Run as a script to write the corpus into a folder for trying it by hand::

    python tests/bad_inputs/bad_input_corpus.py /tmp/corpus   # prints one command line per case
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

SCALE = 0.05  # 64 train / 16 val images of 96 px: a few seconds to write


@dataclass
class Case:
    argv: list[str]
    expect: tuple[str, ...]
    #: called with pytest's ``monkeypatch`` before the command (e.g. a read-only directory:
    #: CI runs as root, which permission bits do not stop)
    patch: Callable[[Any], None] | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


CASES: dict[str, Callable[[Path], Case]] = {}


def case(fn: Callable[[Path], Case]) -> Callable[[Path], Case]:
    CASES[fn.__name__] = fn
    return fn


# ----------------------------------------------------------------------------- the valid set-up


def train_json(root: Path) -> Path:
    return root / "data" / "annotations" / "train.json"


def val_json(root: Path) -> Path:
    return root / "data" / "annotations" / "val.json"


def checkpoint(root: Path) -> Path:
    return root / "ckpt" / "model.pth"


MODEL = {"arch": "faster_rcnn", "backbone": "tiny", "loss": "softmax_ce", "min_size": 96, "max_size": 96,
         "box_batch_size_per_image": 32, "representation_size": 64, "rpn_pre_nms_top_n_train": 100,
         "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50}


def config_dict(root: Path) -> dict:
    """A valid tiny config over the files under ``root`` (absolute paths)."""
    return {
        "model": dict(MODEL),
        "data": {"train_json": str(train_json(root)), "val_json": str(val_json(root)),
                 "image_root": str(root / "data" / "images"), "min_sizes": [96], "max_size": 96,
                 "batch_size": 2, "num_workers": 0, "flip_prob": 0.0},
        "train": {"iterations": 2, "lr": 0.01, "warmup_iters": 1, "device": "cpu", "checkpoint_period": 2,
                  "log_period": 1},
        "eval": {"max_dets": 20},
        "output_dir": str(root / "run"),
    }


def write_config(root: Path, name: str = "cfg.yaml", edit: Callable[[dict], None] | None = None) -> Path:
    cfg = config_dict(root)
    if edit is not None:
        edit(cfg)
    path = root / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def make_base(root: Path) -> Path:
    """The valid set-up every case starts from (see the module docstring)."""
    import torch

    from taildet.config import config_from_dict
    from taildet.data.synthetic import make_dataset
    from taildet.engine.checkpoint import save_checkpoint
    from taildet.models import build_model

    root.mkdir(parents=True, exist_ok=True)
    make_dataset(root / "data", seed=0, scale=SCALE, progress=False)
    cfg = config_from_dict(config_dict(root))
    num_classes = len(json.loads(train_json(root).read_text())["categories"])
    torch.manual_seed(0)
    model = build_model(cfg.model.arch, num_classes, **cfg.model.kwargs)
    save_checkpoint(checkpoint(root), model=model.state_dict(), config=cfg.to_dict(), iteration=0)
    # an earlier run in the output directory: a command that fails must not touch it
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text("# the earlier run's config\n" + yaml.safe_dump(cfg.to_dict()))
    (run / "metrics.jsonl").write_text('{"iteration": 1, "loss": 2.5}\n{"iteration": 2, "loss": 2.1}\n')
    shutil.copy(checkpoint(root), run / "model_final.pth")
    (run / "last_checkpoint").write_text("model_final.pth\n")
    (root / "notes.txt").write_text("a file, not a directory\n")
    (root / "plots").mkdir()
    return root


def edited_json(src: Path, dst: Path, edit: Callable[[dict], None], **dump_kwargs: Any) -> Path:
    data = json.loads(src.read_text())
    edit(data)
    dst.write_text(json.dumps(data, **dump_kwargs))
    return dst


def renumber_images(data: dict, base: int) -> None:
    """Image ids ``base + k`` (annotations follow)."""
    new = {im["id"]: base + k for k, im in enumerate(data["images"])}
    for im in data["images"]:
        im["id"] = new[im["id"]]
    for a in data["annotations"]:
        a["image_id"] = new[a["image_id"]]


def first_ann(data: dict) -> dict:
    return data["annotations"][0]


def _read_only(directory: Path) -> Callable[[Any], None]:
    """Make ``directory`` refuse new files, as a read-only directory does for a normal user and a
    read-only filesystem for root."""

    def patch(monkeypatch):
        real = tempfile.mkstemp

        def mkstemp(*args, **kwargs):
            d = kwargs.get("dir") or (args[2] if len(args) > 2 else None)
            if d is not None and Path(d).resolve() == directory.resolve():
                raise PermissionError(13, "Permission denied")
            return real(*args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    return patch


# ----------------------------------------------------------------------------- taildet data stats


@case
def stats_binary_garbage(root: Path) -> Case:
    p = root / "garbage.json"
    p.write_bytes(bytes(range(256)) * 8)
    return Case(["data", "stats", str(p)], ("garbage.json", "not a UTF-8 JSON text file"))


@case
def stats_utf16_json(root: Path) -> Case:
    p = root / "utf16.json"
    p.write_bytes(val_json(root).read_text().encode("utf-16"))
    return Case(["data", "stats", str(p)], ("utf16.json", "UTF-16"))


@case
def stats_directory(root: Path) -> Case:
    return Case(["data", "stats", str(root / "data")], ("data", "is a directory"))


@case
def stats_mixed_int_str_category_ids(root: Path) -> Case:
    p = edited_json(val_json(root), root / "mixed.json", lambda d: d["categories"][1].update(id="2"))
    return Case(["data", "stats", str(p)], ("mixed.json", "categories[1]", "category id must be an integer"))


@case
def stats_out_is_an_existing_directory(root: Path) -> Case:
    return Case(["data", "stats", str(val_json(root)), "--out", str(root / "plots")], ("plots", "is a directory"))


@case
def stats_out_in_a_read_only_directory(root: Path) -> Case:
    ro = root / "ro"
    ro.mkdir()
    ro.chmod(0o555)  # enough for a normal user; root needs the patch
    return Case(["data", "stats", str(val_json(root)), "--out", str(ro / "plot.png")],
                ("plot.png", "not writable", "Permission denied"), patch=_read_only(ro))


@case
def stats_out_under_a_file(root: Path) -> Case:
    return Case(["data", "stats", str(val_json(root)), "--out", str(root / "notes.txt" / "plot.png")],
                ("notes.txt", "is a file, not a directory"))


@case
def stats_out_is_its_own_input(root: Path) -> Case:
    return Case(["data", "stats", str(val_json(root)), "--out", str(val_json(root))],
                ("val.json", "would overwrite the annotation file"))


@case
def synth_into_a_folder_holding_another_dataset(root: Path) -> Case:
    """``data synth`` regenerates its own files: someone else's annotations (and images named like
    its own, 000001.png) in the same layout must not be overwritten or deleted."""
    mine = root / "mine"
    (mine / "annotations").mkdir(parents=True)
    (mine / "images" / "train").mkdir(parents=True)
    edited_json(val_json(root), mine / "annotations" / "train.json", lambda d: d.pop("info"))
    shutil.copy(next((root / "data" / "images" / "val").iterdir()), mine / "images" / "train" / "000001.png")
    return Case(["data", "synth", str(mine), "--scale", "0.05"],
                ("mine/annotations/train.json", "not written by taildet data synth"))


# ----------------------------------------------------------------------------- taildet eval-results


def _perfect_results(root: Path, gt: Path) -> Path:
    data = json.loads(gt.read_text())
    res = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
           for a in data["annotations"]]
    p = root / "results.json"
    p.write_text(json.dumps(res))
    return p


@case
def eval_results_out_is_an_existing_file(root: Path) -> Case:
    return Case(["eval-results", str(val_json(root)), str(_perfect_results(root, val_json(root))),
                 "--out", str(root / "notes.txt")], ("notes.txt", "not a directory"))


@case
def eval_results_out_would_overwrite_the_gt(root: Path) -> Case:
    ev = root / "ev"
    ev.mkdir()
    gt = ev / "metrics.json"
    shutil.copy(val_json(root), gt)
    return Case(["eval-results", str(gt), str(_perfect_results(root, gt)), "--out", str(ev)],
                ("metrics.json", "would overwrite the ground truth"))


@case
def eval_results_image_ids_near_2_60(root: Path) -> Case:
    gt = edited_json(val_json(root), root / "big_ids.json", lambda d: renumber_images(d, 2**60))
    return Case(["eval-results", str(gt), str(_perfect_results(root, gt))],
                ("big_ids.json", "images[0]", str(2**60), "outside the supported range"))


@case
def eval_results_gt_bbox_of_1e308_width(root: Path) -> Case:
    data = json.loads(val_json(root).read_text())
    aid = first_ann(data)["id"]
    gt = edited_json(val_json(root), root / "wide.json", lambda d: first_ann(d)["bbox"].__setitem__(2, 1e308))
    return Case(["eval-results", str(gt), str(_perfect_results(root, val_json(root)))],
                ("wide.json", f"annotations[0] (id {aid})", "far outside image"))


def _segm_case(root: Path, name: str, segmentation: Any, expect: str) -> Case:
    data = json.loads(val_json(root).read_text())
    aid = first_ann(data)["id"]

    def edit(d):
        if segmentation is None:
            del first_ann(d)["segmentation"]
        else:
            first_ann(d)["segmentation"] = segmentation

    gt = edited_json(val_json(root), root / f"{name}.json", edit)
    res = root / "empty_results.json"
    res.write_text("[]")
    return Case(["eval-results", str(gt), str(res), "--iou-type", "segm"],
                (f"{name}.json", f"annotations[0] (id {aid})", expect))


@case
def errors_out_would_overwrite_the_results(root: Path) -> Case:
    out = root / "err"
    out.mkdir()
    res = out / "errors.json"
    shutil.copy(_perfect_results(root, val_json(root)), res)
    return Case(["errors", str(val_json(root)), str(res), "--out", str(out)],
                ("errors.json", "would overwrite the results file"))


@case
def errors_results_of_an_unknown_category(root: Path) -> Case:
    res = root / "unknown_cat.json"
    res.write_text(json.dumps([{"image_id": json.loads(val_json(root).read_text())["images"][0]["id"],
                                "category_id": 9999, "bbox": [1, 1, 5, 5], "score": 0.5}]))
    return Case(["errors", str(val_json(root)), str(res), "--out", str(root / "err_out")],
                ("unknown_cat.json", "results[0]", "9999"))


@case
def eval_results_segm_gt_is_a_string(root: Path) -> Case:
    return _segm_case(root, "segm_string", "not a mask", "segmentation must be a polygon list or an RLE dict")


@case
def eval_results_segm_gt_garbage_rle(root: Path) -> Case:
    return _segm_case(root, "segm_rle", {"size": [96, 96], "counts": "\x7f\x7f!!zz"}, "alphabet")


@case
def eval_results_segm_gt_nan_polygon(root: Path) -> Case:
    return _segm_case(root, "segm_nan", [[10.0, float("nan"), 20.0, 10.0, 20.0, 20.0]], "non-finite")


@case
def eval_results_segm_gt_missing_names_the_file(root: Path) -> Case:
    return _segm_case(root, "segm_missing", None, "missing 'segmentation'")


# ----------------------------------------------------------------------------- taildet eval / calibrate


@case
def eval_checkpoint_with_nan_weights(root: Path) -> Case:
    import torch

    state = torch.load(checkpoint(root), weights_only=False)
    state["model"]["roi_heads.box_predictor.cls_score.weight"][0, 0] = float("nan")
    bad = root / "ckpt" / "nan.pth"
    torch.save(state, bad)
    return Case(["eval", str(write_config(root)), str(bad)],
                ("nan.pth", "roi_heads.box_predictor.cls_score.weight", "non-finite"))


@case
def eval_image_ids_near_2_60(root: Path) -> Case:
    big = edited_json(val_json(root), root / "val_big_ids.json", lambda d: renumber_images(d, 2**60))
    cfg = write_config(root, edit=lambda c: c["data"].update(val_json=str(big)))
    return Case(["eval", str(cfg), str(checkpoint(root))],
                ("val_big_ids.json", "images[0]", "outside the supported range"))


@case
def calibrate_out_is_the_checkpoint(root: Path) -> Case:
    return Case(["calibrate", str(write_config(root)), str(checkpoint(root)), "--out", str(checkpoint(root))],
                ("model.pth", "would overwrite the checkpoint"))


# ----------------------------------------------------------------------------- taildet train / finetune
# Each leaves the earlier run in run/ as it was: nothing is written before the inputs pass.


@case
def train_val_image_ids_near_2_60(root: Path) -> Case:
    big = edited_json(val_json(root), root / "val_big_ids.json", lambda d: renumber_images(d, 2**60 + 7))
    cfg = write_config(root, edit=lambda c: c["data"].update(val_json=str(big)))
    return Case(["train", str(cfg)], ("val_big_ids.json", "images[0]", str(2**60 + 7), "outside the supported range"))


@case
def train_lr_1e308(root: Path) -> Case:
    cfg = write_config(root, edit=lambda c: c["train"].update(lr=1e308))
    return Case(["train", str(cfg)], ("cfg.yaml", "train.lr", "at most 10"))


@case
def train_yaml_duplicate_key(root: Path) -> Case:
    cfg = write_config(root)
    cfg.write_text(cfg.read_text().replace("  lr: 0.01\n", "  lr: 0.01\n  lr: 0.5\n"))
    return Case(["train", str(cfg)], ("cfg.yaml", "duplicate key 'lr'", "line"))


@case
def train_yaml_tab_indent(root: Path) -> Case:
    cfg = write_config(root)
    cfg.write_text(cfg.read_text().replace("  lr: 0.01\n", "\tlr: 0.01\n"))
    return Case(["train", str(cfg)], ("cfg.yaml", "tabs", "line"))


def _model_kwarg_case(root: Path, key: str, value: Any) -> Case:
    cfg = write_config(root, edit=lambda c: c["model"].update({key: value}))
    return Case(["train", str(cfg)], ("cfg.yaml", f"model.{key}"))


@case
def train_anchor_sizes_not_a_list(root: Path) -> Case:
    return _model_kwarg_case(root, "anchor_sizes", "abc")


@case
def train_rpn_pre_nms_top_n_train_a_string(root: Path) -> Case:
    return _model_kwarg_case(root, "rpn_pre_nms_top_n_train", "many")


@case
def train_representation_size_a_fraction(root: Path) -> Case:
    return _model_kwarg_case(root, "representation_size", 0.5)


@case
def train_mask_rcnn_without_masks(root: Path) -> Case:
    def edit(c):
        c["model"]["arch"] = "mask_rcnn"
        c["data"]["with_masks"] = False

    return Case(["train", str(write_config(root, edit=edit))], ("cfg.yaml", "data.with_masks", "mask_rcnn"))


def _area_case(root: Path, area: Any, expect: str) -> Case:
    data = json.loads(train_json(root).read_text())
    aid = first_ann(data)["id"]
    bad = edited_json(train_json(root), root / "train_area.json", lambda d: first_ann(d).update(area=area))
    cfg = write_config(root, edit=lambda c: c["data"].update(train_json=str(bad)))
    return Case(["train", str(cfg)], ("train_area.json", f"annotation id {aid}", "area", expect))


@case
def train_area_negative(root: Path) -> Case:
    return _area_case(root, -5.0, "got -5.0")


@case
def train_area_nan(root: Path) -> Case:
    return _area_case(root, float("nan"), "got nan")


@case
def train_area_not_a_number(root: Path) -> Case:
    return _area_case(root, "big", "got 'big'")


@case
def train_mask_val_gt_with_a_bad_segmentation(root: Path) -> Case:
    """Found at start-up, not by the final evaluation after the whole training."""
    data = json.loads(val_json(root).read_text())
    aid = first_ann(data)["id"]
    bad = edited_json(val_json(root), root / "val_bad_segm.json", lambda d: first_ann(d).update(segmentation="x"))

    def edit(c):
        c["model"]["arch"] = "mask_rcnn"
        c["data"].update(with_masks=True, val_json=str(bad))
        c["eval"]["iou_types"] = ["bbox", "segm"]

    return Case(["train", str(write_config(root, edit=edit))],
                ("val_bad_segm.json", f"annotations[0] (id {aid})", "segmentation must be a polygon list"))


@case
def train_image_file_missing(root: Path) -> Case:
    data = json.loads(train_json(root).read_text())
    im = data["images"][len(data["images"]) // 2]
    (root / "data" / "images" / im["file_name"]).unlink()
    return Case(["train", str(write_config(root))],
                ("train.json", "1 of 64 image files are missing", Path(im["file_name"]).name, f"image id {im['id']}"))


@case
def train_output_dir_is_a_file(root: Path) -> Case:
    cfg = write_config(root, edit=lambda c: c.update(output_dir=str(root / "notes.txt")))
    return Case(["train", str(cfg)], ("notes.txt", "not a directory"))


@case
def finetune_bad_train_data(root: Path) -> Case:
    c = _area_case(root, -1.0, "got -1.0")
    return Case(["finetune", c.argv[1], "--from", str(checkpoint(root))], c.expect)


@case
def finetune_from_a_checkpoint_the_run_would_overwrite(root: Path) -> Case:
    return Case(["finetune", str(write_config(root)), "--from", str(root / "run" / "model_final.pth")],
                ("model_final.pth", "would overwrite the --from checkpoint"))


@case
def finetune_from_a_checkpoint_with_nan_weights(root: Path) -> Case:
    nan_case = eval_checkpoint_with_nan_weights(root)
    return Case(["finetune", nan_case.argv[1], "--from", nan_case.argv[2]], nan_case.expect)


# ----------------------------------------------------------------------------- taildet compare


@case
def compare_recipe_with_a_yaml_error(root: Path) -> Case:
    bad = root / "recipe.yaml"
    bad.write_text("_base_: x.yaml\nmodel:\n\tarch: faster_rcnn\n")
    return Case(["compare", "--recipes", "prior", str(bad), "--out", str(root / "cmp")],
                ("recipe.yaml", "tabs", "line 3"))


def main(argv: list[str]) -> int:
    """Write the corpus under ``argv[0]`` (one folder per case) and print each command line."""
    out = Path(argv[0]) if argv else Path("bad_inputs_corpus")
    base = make_base(out / "_base")
    for name, make in CASES.items():
        root = out / name
        shutil.copytree(base, root)
        c = make(root)
        print(f"{name}: taildet {' '.join(c.argv)}" + ("  (needs a read-only directory)" if c.patch else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

