"""taildet.classify.demo: the seed statistics of the table by hand, the shipped configs, and (slow)
the demo end to end with the generated README block."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from taildet.classify.config import load_classify_config
from taildet.classify.demo import DEMO_METHODS, summarise, table_rows

REPO = Path(__file__).resolve().parents[1]


def _metrics(raw_few, other=None):
    def m(few):
        return {"top1": few, "many": 90.0, "medium": 50.0, "few": few, "mean_class_acc": few, "per_class": [90.0, few]}
    methods = {"raw": m(raw_few), "logn": m(other or raw_few), "logit_adjust": m(raw_few), "tau_norm": m(raw_few),
               "logn_balanced": m(raw_few), "logn_val": m(raw_few)}
    return {"methods": methods}


def test_summary_means_intervals_and_paired_differences_by_hand():
    runs = {s: {"ce": _metrics(f, f + d), "balanced_softmax": _metrics(f + 2 * d), "crt": _metrics(f)}
            for s, (f, d) in enumerate([(10.0, 4.0), (20.0, 6.0), (30.0, 8.0)])}
    summ = summarise(runs, [150, 5])
    ce = summ["methods"]["CE"]["few"]
    assert ce["mean"] == pytest.approx(20.0) and ce["std"] == pytest.approx(10.0)
    half = 4.302652729911275 * 10.0 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n)
    assert ce["ci95"] == pytest.approx([20.0 - half, 20.0 + half])
    diff = summ["methods"]["CE + LogN"]["few_minus_ce"]  # 4, 6, 8: mean 6, std 2
    assert diff["mean"] == pytest.approx(6.0) and diff["std"] == pytest.approx(2.0)
    assert summ["methods"]["Balanced Softmax"]["few_minus_ce"]["mean"] == pytest.approx(12.0)
    assert summ["methods"]["cRT"]["few_minus_ce"]["std"] == pytest.approx(0.0)
    assert summ["methods"]["CE"]["per_class_mean"] == pytest.approx([90.0, 20.0])
    rows = {r[0]: r for r in table_rows(summ)}
    assert list(rows) == list(DEMO_METHODS)
    assert rows["CE"][4] == f"20.0 ± {half:.1f}" and rows["CE"][6] == "-"
    h2 = 4.302652729911275 * 2.0 / math.sqrt(3)
    assert rows["CE + LogN"][6] == f"+6.0 [{6 - h2:+.1f}, {6 + h2:+.1f}]"


@pytest.mark.parametrize("name", ["digits_ce", "digits_balanced_softmax", "digits_crt"])
def test_shipped_classify_configs_load(name):
    cfg = load_classify_config(REPO / "configs" / "classify" / f"{name}.yaml")
    assert cfg.model.arch == "resnet32" and cfg.train.epochs is not None
    assert (cfg.model.stage == "crt") == (name == "digits_crt")
    assert cfg.data.sampler == ("class_balanced" if name == "digits_crt" else "random")


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    pytest.importorskip("sklearn")
    from taildet.classify.demo import run_demo
    from taildet.results_docs import render_markdown

    out = run_demo(tmp_path / "demo", seeds=(0, 1), epochs=1, summary=str(tmp_path / "s.json"), progress=False)
    doc = json.loads((tmp_path / "s.json").read_text())
    rows = doc["tables"]["digits"]["rows"]
    assert [r[0] for r in rows] == list(DEMO_METHODS) and Path(out["png"]).is_file()
    runs = json.loads(Path(out["runs"]).read_text())
    assert set(runs["runs"]) == {"0", "1"} and runs["summary"]["train_counts"][0] == 114
    md = render_markdown("<!-- BEGIN GENERATED table s.json table=digits -->\n<!-- END GENERATED -->",
                         tmp_path)
    assert "| CE + LogN |" in md and "| cRT |" in md
    again = run_demo(tmp_path / "demo", seeds=(0, 1), epochs=1, progress=False)  # every run reused
    assert json.loads(Path(again["runs"]).read_text())["runs"] == runs["runs"]
