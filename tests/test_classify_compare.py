"""``taildet compare`` with classification recipes: seeds, cRT from the same seed's stage 1, the table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from taildet.classify.compare import is_classify_recipe
from taildet.classify.splits import make_split
from taildet.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_classification_recipes(tmp_path, capsys):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 12)
    images = (rng.integers(0, 60, (36, 4, 4)) + 90 * labels[:, None, None]).astype(np.uint8)
    np.savez(tmp_path / "src.npz", images=images, labels=labels)
    manifest = make_split(str(tmp_path / "src.npz"), tmp_path / "lt", 4, test_per_class=3, val_per_class=1)["manifest"]
    train = {"iterations": 3, "lr": 0.05, "warmup_iters": 1, "device": "cpu", "log_period": 1}
    ce = {"data": {"manifest": manifest, "batch_size": 4}, "model": {"loss": "softmax_ce"}, "train": train,
          "eval": {"posthoc": ["logit_adjust"]}, "output_dir": str(tmp_path / "ce_run")}
    crt = {**ce, "data": {**ce["data"], "sampler": "class_balanced"}, "eval": {"posthoc": []},
           "model": {"loss": "softmax_ce", "stage": "crt", "init_from": str(tmp_path / "ce_run" / "model_final.pth")},
           "output_dir": str(tmp_path / "crt_run")}
    (tmp_path / "ce.yaml").write_text(yaml.safe_dump(ce))
    (tmp_path / "crt.yaml").write_text(yaml.safe_dump(crt))
    assert is_classify_recipe(str(tmp_path / "ce.yaml")) and not is_classify_recipe("faster_ce")
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", str(tmp_path / "ce.yaml"), str(tmp_path / "crt.yaml"), "--out", str(out),
                 "--seeds", "0", "1"]) == 0
    doc = json.loads((out / "runs.json").read_text())
    assert set(doc["runs"]) == {"ce", "crt"} and set(doc["runs"]["ce"]) == {"seed0", "seed1"}
    rows = json.loads((out / "summary.json").read_text())["tables"]["classify"]["rows"]
    assert [r[0] for r in rows] == ["ce", "ce + logit_adjust", "crt"]
    assert rows[0][6] == "-" and rows[2][6] != "-"
    # each seed's cRT starts from that seed's CE features (frozen), not from one shared checkpoint
    for s in (0, 1):
        a = torch.load(out / "ce" / f"seed{s}" / "model_final.pth", weights_only=False)["model"]
        b = torch.load(out / "crt" / f"seed{s}" / "model_final.pth", weights_only=False)["model"]
        assert torch.equal(a["features.conv1.weight"], b["features.conv1.weight"])
    assert not (tmp_path / "ce_run").exists()
    assert "| ce + logit_adjust |" in capsys.readouterr().out
    assert main(["compare", "--recipes", str(tmp_path / "ce.yaml"), "faster_ce", "--out", str(out)]) == 2


def test_demo_runner_reuses_only_runs_of_the_same_config(tmp_path):
    from taildet.classify.config import classify_config_from_dict
    from taildet.classify.demo import _run

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(2), 10)
    np.savez(tmp_path / "src.npz", images=rng.integers(0, 255, (20, 4, 4), dtype=np.uint8), labels=labels)
    manifest = make_split(str(tmp_path / "src.npz"), tmp_path / "lt", 2, test_per_class=2, val_per_class=0)["manifest"]

    def cfg(iterations):
        return classify_config_from_dict({"data": {"manifest": manifest, "batch_size": 4}, "eval": {"posthoc": []},
                                          "train": {"iterations": iterations, "device": "cpu", "warmup_iters": 1},
                                          "output_dir": str(tmp_path / "run")})

    first = _run(cfg(2), progress=False)
    stamp = (tmp_path / "run" / "model_final.pth").stat().st_mtime_ns
    again = _run(cfg(2), progress=False)  # reused: the metrics file read back, nothing trained or written
    assert (tmp_path / "run" / "model_final.pth").stat().st_mtime_ns == stamp
    assert json.dumps(again["metrics"], sort_keys=True) == json.dumps(first["metrics"], sort_keys=True)
    changed = _run(cfg(3), progress=False)  # another config: trained again (3 iterations)
    assert torch.load(changed["checkpoint"], weights_only=False)["iteration"] == 3
    assert list((tmp_path / "run").glob("superseded-*"))  # the 2-iteration run set aside, not overwritten
