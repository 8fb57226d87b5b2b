"""benchmarks/gpu_suite.py (issue 18) on the CPU: its ``--cpu-smoke`` run in-process (every row
timed, the JSON summary complete, each row's model holding the loss the row names, stateful
losses and MFS really at work), the plain torchvision twin, the verdict rule, and the docs block
(``gpu_suite``) rendered from the summary the smoke run writes."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
import torch
from helpers import load_benchmark

import taildet.losses
from taildet.errors import DataError
from taildet.results_docs import render_markdown, update_docs
from taildet.results_docs_gpu import format_gpu_suite, format_gpu_suite_text, load_gpu_suite


@pytest.fixture(scope="module")
def suite():
    return load_benchmark("gpu_suite")


@pytest.fixture(scope="module")
def smoke(suite, tmp_path_factory):
    """``(summary, path of the JSON it wrote)`` of one smoke run, models kept."""
    out = tmp_path_factory.mktemp("gpu_suite") / "bench_gpu_suite.json"
    summary = suite.run(["--cpu-smoke", "--no-progress", "--out", str(out)], keep_models=True)
    return summary, out


def test_every_row_is_timed_against_its_reference(suite, smoke):
    summary, _ = smoke
    rows = {r["key"]: r for r in summary["rows"]}
    assert list(rows) == [r.key for r in suite.ROWS]
    for spec in suite.ROWS:
        r = rows[spec.key]
        assert len(r["samples_ms"]) == summary["rounds"]["timed"] == 2
        assert all(t > 0 for t in r["samples_ms"]) and r["median_ms"] == statistics.median(r["samples_ms"])
        assert (r["ratio"] is None) == (spec.reference is None)
        if spec.reference is not None:
            ref = rows[spec.reference]["samples_ms"]
            assert r["ratio"] == pytest.approx(statistics.median(a / b for a, b in zip(r["samples_ms"], ref)))
        assert r["verdict"] == "smoke: not judged" and r["goal"] == spec.goal
    assert rows["ce"]["reference"] == "torchvision" and rows["mfs"]["reference"] == "ce_ft"
    assert rows["efl"]["reference"] == "focal" and rows["eqfl"]["reference"] == "qfl"
    assert {rows[k]["goal"] for k in ("bsoftmax", "bsigmoid", "eql", "seesaw", "fed")} == {1.02}
    assert rows["ebl"]["goal"] == rows["eqlv2"]["goal"] == 1.05 and rows["mfs"]["goal"] == 1.10


def test_json_summary_has_the_fields(smoke):
    summary, out = smoke
    doc = json.loads(out.read_text())
    assert doc == json.loads(json.dumps({k: v for k, v in summary.items() if k != "models"}))
    assert doc["kind"] == "gpu suite" and doc["mode"] == "cpu-smoke" and doc["goals_met"] is None
    assert doc["device"]["type"] == "cpu" and doc["device"]["name"] and doc["torch"] == torch.__version__
    assert doc["sizes"] == {"backbone": "tiny", "classes": 20, "images": 2, "size": 64, "rois_per_image": 32,
                            "gts_per_image": 3, "input_batches": 2, "amp": False}
    assert doc["rounds"] == {"warmup": 1, "timed": 2}
    assert "--cpu-smoke" in doc["command"] and doc["date"] and doc["machine"]["torch"] == torch.__version__
    assert doc["wall_seconds"] > 0
    assert set(doc["configs"]) == {"mask_rcnn", "mfs", "atss", "logn"}


def test_each_row_model_holds_the_loss_it_names(suite, smoke):
    summary, _ = smoke
    models, rows = summary["models"], {r["key"]: r for r in summary["rows"]}
    for spec in suite.ROWS:
        if spec.loss_class is None:
            continue
        loss = models[spec.key].cls_head.loss
        assert isinstance(loss, getattr(taildet.losses, spec.loss_class)), spec.key
        assert rows[spec.key]["loss_class"] == rows[spec.key]["expected_loss_class"] == spec.loss_class
    # one change at a time: the two-stage rows keep the base config's linear classifier and sizes
    for key in ("ce", "bsoftmax", "bsigmoid", "ebl", "eql", "eqlv2", "seesaw", "fed", "ce_ft", "mfs"):
        rh = models[key].roi_heads
        assert type(rh.box_predictor.cls_score).__name__ == "LinearClassifier", key
        assert rh.fg_bg_sampler.batch_size_per_image == 32
    assert rows["ebl"]["config"] == "lvis_mask_r50_ebl_ft.yaml"
    assert models["eqlv2"].cls_head.loss.gamma == 12.0  # loss_kwargs of its LVIS config
    assert models["fed"].cls_head.loss.num_fed_classes == 50
    tv = models["torchvision"]
    assert type(tv).__name__ == "MaskRCNN" and tv.roi_heads.box_predictor.cls_score.out_features == 21


def test_stateful_losses_moved_during_the_run(smoke):
    summary, _ = smoke
    rows = {r["key"]: r for r in summary["rows"]}
    for key in ("ebl", "eqlv2", "seesaw", "efl", "eqfl"):
        assert rows[key]["state"]["changed"] is True, key
    for key in ("efl", "eqfl"):  # pos_grad starts at zero
        assert float(summary["models"][key].cls_head.loss.pos_grad.sum()) > 0


def test_mfs_row_samples_from_a_prefilled_memory(smoke):
    summary, _ = smoke
    models, rows = summary["models"], {r["key"]: r for r in summary["rows"]}
    mfs = models["mfs"].roi_heads.mfs
    assert models["ce_ft"].roi_heads.mfs is None
    assert int((mfs.memory.count > 0).sum()) == 20  # every class can be drawn
    batch = mfs.last_batch
    assert batch is not None and batch.features.shape[0] > 0 and tuple(batch.features.shape[1:]) == (32, 7, 7)
    assert rows["mfs"]["mfs"]["classes_filled"] == 20 and rows["mfs"]["mfs"]["last_sampled"] > 0
    for key in ("ce_ft", "mfs"):  # the same stage 2: LOCE's freeze
        frozen = [n for n, p in models[key].named_parameters() if not p.requires_grad]
        assert any(n.startswith("backbone.") for n in frozen) and any(n.startswith("roi_heads.box_head.") for n in frozen)


def test_logn_rows(smoke):
    summary, _ = smoke
    rows = {r["key"]: r for r in summary["rows"]}
    assert rows["logn_stats"]["statistics_rows"] > 0
    assert rows["logn_transform"]["logit_columns"] == 21 and rows["logn_transform"]["logit_rows"] > 0
    assert {rows[k]["unit"] for k in ("infer", "logn_stats", "logn_transform", "logn_infer")} == {"ms/image"}
    assert rows["infer"]["detections_per_image"] >= 0 and "detections_per_image" in rows["logn_infer"]


def test_plain_torchvision_twin_detects_as_taildet(suite):
    """Same parts, settings and weights: in eval mode the twin's detections equal taildet's."""
    s = suite.settings_from_args(suite.parse_args(["--cpu-smoke"]))
    stats = suite.long_tail_statistics(s.classes)
    ce_row = next(r for r in suite.ROWS if r.key == "ce")
    ce = suite.build_row_model(suite.group_config(s, "mask_rcnn"), ce_row, s, stats, None)
    suite.trained_like_head(ce, s.classes)
    tv = suite.plain_maskrcnn_twin(ce, s.classes).eval()
    images = suite.make_batches(s, stats)[0][0]
    with torch.no_grad():
        ours, theirs = ce.eval()(images), tv(images)
    for a, b in zip(ours, theirs):
        assert len(a["boxes"]) == len(b["boxes"]) > 0
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
        assert torch.equal(a["labels"] + 1, b["labels"])


def test_statistics_are_long_tailed_and_positive(suite):
    st = suite.long_tail_statistics(1203)
    assert (st.instance_counts >= 1).all() and (st.image_counts >= 1).all()
    assert (st.image_frequency > 0).all() and (st.image_frequency <= 1).all()
    assert (st.instance_counts[:-1] >= st.instance_counts[1:]).all() and st.instance_counts[0] > 1000 * st.instance_counts[-1]


def test_verdicts_of_a_gpu_run(suite):
    s = suite.Settings(mode="gpu", device=torch.device("cpu"), progress=False, **suite.SMOKE_DEFAULTS)
    spec = {r.key: r for r in suite.ROWS}
    ref, ok, bad = spec["ce"], spec["bsoftmax"], spec["ebl"]  # goals: -, 1.02, 1.05
    results = [dict(row=ref, samples=[10.0, 20.0], unit="ms/step", details={}),
               dict(row=ok, samples=[10.1, 20.2], unit="ms/step", details={}),
               dict(row=bad, samples=[11.0, 20.0], unit="ms/step", details={})]
    rows = {r["key"]: r for r in suite.judge(results, s)}
    assert rows["ce"]["verdict"] == "-"  # its reference (torchvision) is not in these results
    assert rows["bsoftmax"]["ratio"] == pytest.approx(1.01) and rows["bsoftmax"]["verdict"] == "PASS"
    assert rows["ebl"]["ratio"] == pytest.approx(1.05) and rows["ebl"]["verdict"] == "PASS"
    results[2]["samples"] = [11.0, 21.2]
    assert suite.judge(results, s)[2]["verdict"] == "MISS"


def test_docs_block_renders_the_summary(smoke, tmp_path):
    summary, out = smoke
    doc = load_gpu_suite(out)
    md = format_gpu_suite(doc, "results/bench_gpu_suite.json")
    lines = md.splitlines()
    assert lines[0].startswith("Measured ") and "cpu-smoke run, not judged" in lines[0]
    assert lines[2] == "| group | row | median | unit | reference | ratio | goal | verdict |"
    assert len(lines) == 4 + len(summary["rows"])
    for r in summary["rows"]:
        assert any(f"| {r['label']} | {r['median_ms']:.2f} |" in line for line in lines[4:]), r["label"]
    text = format_gpu_suite_text(doc).splitlines()
    assert len(text) == 3 + len(summary["rows"]) and text[1].split()[:3] == ["group", "row", "median"]

    (tmp_path / "results").mkdir()
    shutil.copy(out, tmp_path / "results" / "bench_gpu_suite.json")
    page = tmp_path / "page.md"
    page.write_text("x\n<!-- BEGIN GENERATED gpu_suite results/bench_gpu_suite.json -->\n<!-- END GENERATED -->\n")
    assert update_docs([page], root=tmp_path) == [str(page)]
    assert md in page.read_text() and update_docs([page], root=tmp_path, check=True) == []
    missing = render_markdown("<!-- BEGIN GENERATED gpu_suite results/none.json -->\n<!-- END GENERATED -->", tmp_path)
    assert "No GPU run of the suite is committed yet" in missing and len(missing.splitlines()) == 3
    (tmp_path / "results" / "other.json").write_text(json.dumps({"recipes": {}}))
    with pytest.raises(DataError, match="not a GPU suite summary"):
        render_markdown("<!-- BEGIN GENERATED gpu_suite results/other.json -->\n<!-- END GENERATED -->", tmp_path)
