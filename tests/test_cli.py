"""The command line: data synth/stats, eval-results, compare with the no-training recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taildet.cli import main
from taildet.compare import RECIPES, prior_baseline_results, resolve_recipe, run_compare
from taildet.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_data_synth_and_stats(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--scale", "0.1", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "rare (r)" in text and "frequent (f)" in text
    assert (out / "annotations" / "train.json").exists()
    assert (out / "long_tail.png").stat().st_size > 1000
    png = tmp_path / "hist.png"
    assert main(["data", "stats", str(out / "annotations" / "val.json"), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_eval_results_cli_perfect_and_bad_input(tmp_path, capsys):
    out = tmp_path / "synth"
    main(["data", "synth", str(out), "--scale", "0.05"])
    val = out / "annotations" / "val.json"
    gt = json.loads(val.read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0} for a in gt["annotations"]]
    res = tmp_path / "res.json"
    res.write_text(json.dumps(perfect))
    capsys.readouterr()
    assert main(["eval-results", str(val), str(res), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["AP"] == pytest.approx(1.0)
    # a result with an unknown category is a one-line error naming the file and the item, exit 2
    perfect[3]["category_id"] = 99999
    res.write_text(json.dumps(perfect))
    assert main(["eval-results", str(val), str(res)]) == 2
    err = capsys.readouterr().err
    assert "res.json" in err and "results[3]" in err


def test_prior_baseline_shows_long_tail(tmp_path):
    summary = run_compare(["prior"], tmp_path / "cmp", progress=False, scale=0.5)
    row = summary["recipes"]["prior"]["runs"]["seed0"]
    # knowing only the label distribution ranks head classes first: APf far above APr
    assert row["APf"] > row["APr"] + 5
    assert 0 < row["AP"] < 100
    saved = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert saved["recipes"]["prior"]["runs"]["seed0"]["AP"] == row["AP"]
    assert saved["recipes"]["prior"]["stats"]["AP"] == {"n": 1, "mean": row["AP"], "std": None, "ci95": None}
    assert (tmp_path / "cmp" / "report.md").read_text().count("| prior |") == 1
    assert (tmp_path / "cmp" / "seed0" / "per_class_ap_prior.png").exists()
    # per-class AP is kept per run; its mean over the rare classes is APr (the bootstrap's basis)
    rare = [c for c, v in saved["classes"].items() if v["group"] == "r"]
    per_class = [row["per_class_AP"][c] for c in rare if row["per_class_AP"].get(c) is not None]
    assert sum(per_class) / len(per_class) == pytest.approx(row["APr"], abs=0.01)


def test_compare_seeds_reach_the_runs_and_the_statistics(tmp_path):
    """Each training seed is its own replicate (different draws), statistics are over them, and
    --reuse picks finished replicates up again without rerunning them."""
    summary = run_compare(["prior"], tmp_path / "cmp", seeds=(0, 1, 2), progress=False, scale=0.5)
    runs = summary["recipes"]["prior"]["runs"]
    assert list(runs) == ["seed0", "seed1", "seed2"]
    aps = [runs[r]["AP"] for r in runs]
    assert len(set(aps)) == 3                             # the seed reached the prior's draws
    stats = summary["recipes"]["prior"]["stats"]["AP"]
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(sum(aps) / 3)
    assert stats["ci95"][0] < stats["mean"] < stats["ci95"][1]
    # a data seed is a replicate of its own, on another generated dataset
    other = run_compare(["prior"], tmp_path / "cmp2", seeds=(0,), data_seeds=(1,), progress=False, scale=0.5)
    assert list(other["recipes"]["prior"]["runs"]) == ["data1_seed0"]
    assert (tmp_path / "data" / "synthetic_seed1_scale0.5").is_dir()
    assert other["recipes"]["prior"]["runs"]["data1_seed0"]["AP"] != runs["seed0"]["AP"]


def test_prior_baseline_is_deterministic(tmp_path):
    main(["data", "synth", str(tmp_path / "s"), "--scale", "0.05"])
    tr, va = tmp_path / "s/annotations/train.json", tmp_path / "s/annotations/val.json"
    assert prior_baseline_results(tr, va, seed=1) == prior_baseline_results(tr, va, seed=1)
    assert prior_baseline_results(tr, va, seed=1) != prior_baseline_results(tr, va, seed=2)


def test_unknown_recipe_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        resolve_recipe("nope")


def test_compare_trains_recipes_in_parallel_processes(tmp_path):
    """Two recipes in two worker processes: both rows land in summary.json and report.md."""
    tiny = ["train.iterations=2", "train.warmup_iters=1", "data.batch_size=2", "train.device=cpu",
            "eval.max_dets=20", "train.checkpoint_period=2"]
    summary = run_compare(["faster_ce", "faster_ce_rfs", "prior"], tmp_path / "cmp",
                          progress=False, scale=0.05, extra_opts=tiny, jobs=2)
    assert set(summary["recipes"]) == {"faster_ce", "faster_ce_rfs", "prior"}
    for name in ("faster_ce", "faster_ce_rfs"):
        assert (tmp_path / "cmp" / "seed0" / name / "model_final.pth").exists()
        ap = summary["recipes"][name]["runs"]["seed0"]["AP"]
        assert ap is not None and 0.0 <= ap <= 100.0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| faster_ce |" in report and "| faster_ce_rfs |" in report
    # RFS is paired with CE (its declared baseline), one row per metric
    assert {(p["recipe"], p["baseline"]) for p in summary["paired"]} == {("faster_ce_rfs", "faster_ce")}


def test_compare_finetune_and_posthoc_rows(tmp_path):
    """Stage 1 is trained once and reused by a fine-tune row and the LogN / LogA rows."""
    tiny = ["train.iterations=2", "train.warmup_iters=1", "data.batch_size=2", "train.device=cpu",
            "eval.max_dets=20", "train.checkpoint_period=2"]
    names = ["faster_ce+bsoftmax", "faster_ce+loce", "faster_ce+logn", "faster_ce+loga"]
    summary = run_compare(names, tmp_path / "cmp", progress=False, scale=0.05, extra_opts=tiny, jobs=1)
    assert set(summary["recipes"]) == set(names)
    rep = tmp_path / "cmp" / "seed0"
    assert (rep / "faster_ce" / "model_final.pth").exists()
    assert (rep / "faster_ce+bsoftmax" / "model_final.pth").exists()
    assert (rep / "mean_score_vs_instances.png").stat().st_size > 1000
    stats = json.loads((rep / "faster_ce+logn" / "logit_stats.json").read_text())
    assert (rep / "faster_ce+logn" / "logit_stats.png").stat().st_size > 1000
    assert stats["num_classes"] > 0
    for name in names:
        assert summary["recipes"][name]["runs"]["seed0"]["AP"] is not None
    # the calibration rows show APpool (pooled over classes: what LogN / LogA change) in the report
    header = next(ln for ln in (tmp_path / "cmp" / "report.md").read_text().splitlines() if ln.startswith("| recipe | n |"))
    assert header.rstrip().endswith("| APpool |")
    for name in ("faster_ce+logn", "faster_ce+loga"):
        assert 0.0 <= summary["recipes"][name]["runs"]["seed0"]["APpool"] <= 100.0
    # --reuse: nothing is trained or calibrated again, the rows are read back unchanged
    stamp = (rep / "faster_ce+bsoftmax" / "model_final.pth").stat().st_mtime_ns
    again = run_compare(names, tmp_path / "cmp", progress=False, scale=0.05, extra_opts=tiny, jobs=1,
                        reuse=True)
    assert (rep / "faster_ce+bsoftmax" / "model_final.pth").stat().st_mtime_ns == stamp
    for name in names:
        assert again["recipes"][name]["runs"]["seed0"]["AP"] == summary["recipes"][name]["runs"]["seed0"]["AP"]


def test_compare_reuse_continues_an_interrupted_run(tmp_path, capsys):
    """--reuse continues a run that stopped after a checkpoint (same config: nothing set aside, the
    result equals the uninterrupted run's); with another config the old files are set aside."""
    tiny = ["train.iterations=4", "train.warmup_iters=1", "data.batch_size=2", "train.device=cpu",
            "eval.max_dets=20", "train.checkpoint_period=2"]
    whole = run_compare(["faster_ce"], tmp_path / "cmp", progress=False, scale=0.05, extra_opts=tiny, jobs=1)
    run = tmp_path / "cmp" / "seed0" / "faster_ce"
    # the state a kill after the iteration-2 checkpoint leaves behind
    for name in ("metrics.json", "model_final.pth", "results_bbox.json", "checkpoint_0000004.pth"):
        (run / name).unlink(missing_ok=True)
    (run / "last_checkpoint").write_text("checkpoint_0000002.pth")
    stamp = (run / "checkpoint_0000002.pth").stat().st_mtime_ns
    capsys.readouterr()
    again = run_compare(["faster_ce"], tmp_path / "cmp", progress=False, scale=0.05, extra_opts=tiny, jobs=1,
                        reuse=True)
    assert "continuing the interrupted run" in capsys.readouterr().out
    assert (run / "checkpoint_0000002.pth").stat().st_mtime_ns == stamp
    assert not list(run.glob("superseded-*"))
    assert again["recipes"]["faster_ce"]["runs"]["seed0"]["AP"] == whole["recipes"]["faster_ce"]["runs"]["seed0"]["AP"]
    # interrupted again, then rerun with a different config: started over, the old files set aside
    (run / "metrics.json").unlink()
    run_compare(["faster_ce"], tmp_path / "cmp", progress=False, scale=0.05,
                extra_opts=[o for o in tiny if not o.startswith("train.warmup")] + ["train.warmup_iters=2"],
                jobs=1, reuse=True)
    assert "continuing" not in capsys.readouterr().out
    assert list(run.glob("superseded-*"))


def test_calibrate_then_eval_with_calibration(tmp_path, capsys):
    """The three-command LogN recipe: train, calibrate, eval --calibration."""
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = os.path.join(repo, "configs", "demo_faster_tiny_ce.yaml")
    opts = ["--opts", f"data.root={tmp_path / 'data'}", "data.synthetic.scale=0.05", "train.iterations=2",
            "train.warmup_iters=1", "data.batch_size=2", "train.device=cpu", "eval.max_dets=20",
            f"output_dir={tmp_path / 'run'}"]
    assert main(["train", cfg, *opts]) == 0
    ckpt = str(tmp_path / "run" / "model_final.pth")
    stats = str(tmp_path / "stats.json")
    assert main(["calibrate", cfg, ckpt, "--out", stats, "--max-batches", "3", *opts]) == 0
    saved = json.loads(open(stats).read())
    assert saved["stages"]["roi_heads"]
    ema = str(tmp_path / "ema.json")
    assert main(["calibrate", cfg, ckpt, "--out", ema, "--max-batches", "2", "--momentum", "5e-5",
                 "--ema-init", "first", *opts]) == 0
    stage = json.loads(open(ema).read())["stages"]["roi_heads"]
    assert stage["momentum"] == 5e-5 and stage["ema_init"] == "first"
    assert main(["calibrate", cfg, ckpt, "--out", ema, "--ema-init", "first", *opts]) == 2  # needs --momentum
    capsys.readouterr()
    assert main(["eval", cfg, ckpt, "--calibration", stats, *opts]) == 0
    assert "model_final.pth (bbox)" in capsys.readouterr().out
    assert (tmp_path / "run" / "eval_calibrated" / "metrics.json").exists()


def test_online_logn_is_a_loss_name():
    from taildet.losses import build_loss

    loss = build_loss("online_logn", 4, base="softmax_ce", momentum=0.1)
    assert loss.num_outputs() == 5


def test_posthoc_logit_adjustment_fits_softmax_and_sigmoid_heads(tmp_path):
    """The compare table's LogA row keeps a softmax head's background column and adjusts every
    column of a sigmoid head (no background)."""
    import os

    from taildet.compare import posthoc_calibration
    from taildet.config import apply_overrides, load_config
    from taildet.models import build_model

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = apply_overrides(load_config(os.path.join(repo, "configs", "demo_faster_tiny_ce.yaml")),
                          [f"data.root={tmp_path / 'data'}", "data.synthetic.scale=0.05"])
    from taildet.engine.builders import build_datasets

    num_classes = len(build_datasets(cfg, need_train=True)[0].class_names)
    adjust = posthoc_calibration("loga", cfg, "unused.pth", tmp_path)
    for loss, background in (("softmax_ce", True), ("sigmoid_bce", False)):
        mc = apply_overrides(cfg, [f"model.loss={loss}"]).model
        model = build_model(mc.arch, num_classes, **mc.kwargs)
        adjust(model)
        assert model.cls_head.logit_transform.background is background


def test_recipe_opts_reach_the_posthoc_evaluation(tmp_path, monkeypatch):
    """A row's own overrides (``Recipe.opts``) reach the config its evaluation reads, and only its."""
    import taildet.engine as engine

    seen = {}
    real = engine.evaluate_checkpoint

    def spy(cfg, checkpoint, calibration=None, out_dir=None, **kw):
        seen[Path(out_dir).name] = (cfg.eval.score_thresh, cfg.model.kwargs["box_score_thresh"], calibration)
        return real(cfg, checkpoint, calibration=calibration, out_dir=out_dir, **kw)

    monkeypatch.setattr(engine, "evaluate_checkpoint", spy)
    tiny = ["train.iterations=2", "train.warmup_iters=1", "data.batch_size=2", "train.device=cpu",
            "eval.max_dets=20", "train.checkpoint_period=2"]
    summary = run_compare(["faster_ce+thr0", "faster_ce+loga"], tmp_path / "cmp", progress=False, scale=0.05,
                          extra_opts=tiny, jobs=1)
    assert seen["faster_ce+thr0"] == (0.0, 0.0, None)          # no method, no threshold
    thr, box_thr, calibration = seen["faster_ce+loga"]
    assert thr > 0 and box_thr > 0 and callable(calibration)   # the config's thresholds
    assert set(summary["recipes"]) == {"faster_ce+thr0", "faster_ce+loga"}


def test_logn_ablation_rows_share_one_statistics_pass(tmp_path, monkeypatch):
    """LogN rows that differ only in mode / beta make one pass; each file equals a direct
    ``calibrate_checkpoint`` with that mode."""
    import taildet.engine as engine
    from taildet.config import apply_overrides, load_config
    from taildet.compare import _config_path

    calls = []
    real = engine.calibrate_checkpoint

    def counting(cfg, checkpoint, out=None, **kw):
        calls.append(kw)
        return real(cfg, checkpoint, out, **kw)

    monkeypatch.setattr(engine, "calibrate_checkpoint", counting)
    tiny = ["train.iterations=2", "train.warmup_iters=1", "data.batch_size=2", "train.device=cpu",
            "eval.max_dets=20", "train.checkpoint_period=2"]
    run_compare(["faster_ce+logn", "faster_ce+logn_mean"], tmp_path / "cmp", progress=False, scale=0.05,
                extra_opts=tiny, jobs=1)
    assert len(calls) == 1 and "mode" not in calls[0]
    rep = tmp_path / "cmp" / "seed0"
    got = json.loads((rep / "faster_ce+logn_mean" / "logit_stats.json").read_text())
    assert got["stages"]["roi_heads"]["mode"] == "mean_only"
    full = json.loads((rep / "faster_ce+logn" / "logit_stats.json").read_text())
    assert full["stages"]["roi_heads"]["mode"] == "all"
    cfg = apply_overrides(load_config(_config_path(RECIPES["faster_ce"])),
                          [f"data.root={tmp_path / 'data' / 'synthetic_seed0_scale0.05'}", "data.synthetic.scale=0.05",
                           "train.seed=0"] + tiny)
    direct = real(cfg, str(rep / "faster_ce" / "model_final.pth"), str(tmp_path / "direct.json"),
                  progress=False, mode="mean_only")
    want = json.loads(Path(direct).read_text())
    assert got["stages"] == want["stages"]


def test_compare_regime_reaches_every_run_and_one_out_holds_one_regime(tmp_path, monkeypatch):
    """A regime's data (vocabulary) and overrides reach each training's options; an output folder
    of one regime refuses another (``--reuse`` would mix them)."""
    import taildet.compare.runner as compare
    from taildet.engine.pretrain import PRETRAINED_REGIME_OVERRIDES

    seen = []

    def fake_train(runs, jobs, progress, resume=False):
        out = {}
        for key, kind, cfg_path, opts, ckpt in runs:
            seen.append(opts)
            out[key] = ({"AP": 0.1, "APr": 0.1, "APc": 0.1, "APf": 0.1, "AP50": 0.2, "per_class_AP": {}}, 0.0)
        return out

    monkeypatch.setattr(compare, "_train_recipes", fake_train)
    import taildet.evaluation.report as report

    monkeypatch.setattr(report, "per_class_table", lambda metrics, gt: [])
    monkeypatch.setattr(report, "plot_per_class_ap", lambda rows, png, image_counts=None: png)
    summary = run_compare(["faster_ce"], tmp_path / "cmp", progress=False, scale=0.05, regime="lvis150_pretrained")
    assert summary["regime"] == "lvis150_pretrained"
    (opts,) = seen
    for o in PRETRAINED_REGIME_OVERRIDES + ("data.synthetic.vocabulary=lvis",):
        assert o in opts
    data_root = [o for o in opts if o.startswith("data.root=")][0]
    assert data_root.endswith("synthetic_seed0_scale0.05_lvis")
    assert json.loads((Path(data_root.split("=", 1)[1]) / "annotations" / "train.json").read_text())[
        "categories"].__len__() == 150
    with pytest.raises(ConfigError, match="regime 'lvis150_pretrained', not 'scratch'"):
        run_compare(["faster_ce"], tmp_path / "cmp", progress=False, scale=0.05)
    with pytest.raises(ConfigError, match="unknown regime"):
        run_compare(["faster_ce"], tmp_path / "other", progress=False, regime="imagenet")


def test_compare_command_line_reaches_run_compare(monkeypatch):
    """Every `taildet compare` option arrives in run_compare; --claims without --recipes runs every
    recipe a claim names (baselines first)."""
    import taildet.compare as compare
    from taildet.evidence import load_claims

    got = {}
    monkeypatch.setattr(compare, "run_compare", lambda recipes, out, **kw: got.update(recipes=recipes, out=out, **kw))
    assert main(["compare", "--recipes", "faster_ce_rfs", "--seeds", "3", "4", "--data-seeds", "1", "2",
                 "--scale", "0.5", "--jobs", "3", "--reuse", "--with-baselines", "--regime", "pretrained",
                 "--opts", "train.iterations=7", "--out", "somewhere"]) == 0
    assert got["recipes"] == ["faster_ce_rfs"] and got["out"] == "somewhere"
    assert got["seeds"] == [3, 4] and got["data_seeds"] == [1, 2] and got["scale"] == 0.5 and got["jobs"] == 3
    assert got["reuse"] and got["with_baselines"] and got["regime"] == "pretrained"
    assert got["extra_opts"] == ["train.iterations=7"] and not got["claims"]
    got.clear()
    assert main(["compare", "--claims"]) == 0
    assert got["claims"] is True
    named = {n for c in load_claims() for n in (c.recipe, c.baseline)}
    assert set(got["recipes"]) == named
    assert got["seeds"] == [0] and got["regime"] == "scratch"


def test_docs_command_checks_and_rewrites(tmp_path, capsys, monkeypatch):
    import taildet.results_docs as rd

    summary = {"title": "t", "recipes": {"a": {"stats": {m: {"n": 1, "mean": 1.0, "std": None, "ci95": None}
                                                        for m in ("AP", "APr", "APc", "APf", "AP50")}}},
               "paired": [], "claims": []}
    (tmp_path / "s.json").write_text(json.dumps(summary))
    doc = tmp_path / "d.md"
    doc.write_text("<!-- BEGIN GENERATED recipes s.json -->\n<!-- END GENERATED -->\n")
    monkeypatch.setattr(rd, "repo_root", lambda: tmp_path)
    assert main(["docs", "--check", str(doc)]) == 1
    assert "d.md" in capsys.readouterr().err
    assert main(["docs", str(doc)]) == 0
    assert "| a | 1 | 1.0 |" in doc.read_text()
    assert main(["docs", "--check", str(doc)]) == 0
