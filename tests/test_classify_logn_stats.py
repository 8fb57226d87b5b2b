"""taildet.classify.logn_stats: where LogN's statistics come from (training split as sampled,
class-balanced, or the val split) -- the moments by hand, the evaluation's use of them, and the
check that a split they need exists before anything is trained."""

from __future__ import annotations

import pytest
import torch

from taildet.classify.config import classify_config_from_dict
from taildet.classify.data import load_split
from taildet.classify.engine import evaluate_classifier, load_data, train_classifier
from taildet.classify.logn_stats import class_balanced_moments, logn_variant, sample_moments
from taildet.classify.models import build_classifier
from taildet.classify.posthoc import extract_features, logn, per_class_accuracy
from taildet.classify.splits import make_split
from taildet.errors import ConfigError
from helpers import write_separable_images

pytestmark = pytest.mark.usefixtures("one_thread")


def test_class_balanced_moments_by_hand():
    # class 0: rows [0, 2], [2, 2] -> mean [1, 2], var [1, 0]; class 1: row [4, -2] -> mean [4, -2], var 0
    z = torch.tensor([[0.0, 2.0], [2.0, 2.0], [4.0, -2.0]])
    mean, var = class_balanced_moments(z, [0, 0, 1], 2)
    # mean = avg of the class means; var = avg class var + avg squared distance of class means to the mean
    assert torch.allclose(mean, torch.tensor([2.5, 0.0], dtype=torch.float64))
    assert torch.allclose(var, torch.tensor([0.5 + 2.25, 0.0 + 4.0], dtype=torch.float64))
    plain_mean, plain_var = sample_moments(z)  # every row once: the head class counts twice
    assert torch.allclose(plain_mean, torch.tensor([2.0, 2 / 3], dtype=torch.float64))
    assert torch.allclose(plain_var, torch.tensor([8 / 3, 32 / 9], dtype=torch.float64))
    # equal class counts: the balanced moments are the plain ones; an absent class is skipped
    g = torch.Generator().manual_seed(0)
    z4 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    for got, want in zip(class_balanced_moments(z4, [0, 0, 2, 2, 1, 1], 4), sample_moments(z4)):
        assert torch.allclose(got, want)
    with pytest.raises(ValueError, match="2 labels"):
        class_balanced_moments(z, [0, 1], 2)


def test_variants_apply_the_logn_formula_and_plain_logn_is_unchanged():
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0] * 8 + [1] * 3 + [2])
    stats = torch.randn(12, 3, generator=g) + 3.0 * torch.nn.functional.one_hot(y, 3)
    test = torch.randn(5, 3, generator=g)
    plain, info = logn_variant("logn", test, stats, y)
    assert torch.equal(plain, logn(test, stats))  # the spec's pass: bit-identical to posthoc.logn
    assert info["split"] == "train" and not info["class_balanced"]
    bal, binfo = logn_variant("logn_balanced", test, stats, y)
    mean, var = class_balanced_moments(stats.double(), y, 3)
    assert torch.allclose(bal.double(), (test.double() - mean) / torch.sqrt(var + 1e-11), atol=1e-6)
    assert binfo["mean"] == pytest.approx(mean.tolist()) and binfo["class_balanced"]
    assert not torch.allclose(bal, plain)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    d = tmp_path_factory.mktemp("clslogn")
    src = write_separable_images(d / "src.npz")
    with_val = make_split(str(src), d / "lt", 4, test_per_class=4, val_per_class=2)["manifest"]
    no_val = make_split(str(src), d / "noval", 4, test_per_class=4, val_per_class=0)["manifest"]
    return with_val, no_val


def _cfg(manifest, out, posthoc):
    return classify_config_from_dict({
        "data": {"manifest": manifest, "batch_size": 4},
        "model": {"arch": "resnet32", "loss": "softmax_ce"},
        "train": {"iterations": 2, "lr": 0.05, "warmup_iters": 1, "device": "cpu", "log_period": 1},
        "eval": {"posthoc": posthoc}, "output_dir": str(out)})


def test_evaluation_takes_each_variants_statistics_from_its_split(manifests, tmp_path):
    cfg = _cfg(manifests[0], tmp_path / "run", ["logn", "logn_balanced", "logn_val"])
    manifest, train = load_data(cfg, augment=False)
    torch.manual_seed(0)
    model = build_classifier("resnet32", 3, "softmax_ce", train_set=train).eval()
    ckpt = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    m = evaluate_classifier(cfg, str(ckpt), out_dir=str(tmp_path / "ev"))
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    cpu = torch.device("cpu")
    val, test = load_split(manifest, "val"), load_split(manifest, "test")
    z_train, z_val, z_test = (extract_features(model, s, cpu) @ w.t() + b for s in (train, val, test))
    stats = m["logn_statistics"]
    assert stats["logn"]["mean"] == pytest.approx(z_train.double().mean(0).tolist(), rel=1e-5)
    assert stats["logn_val"]["mean"] == pytest.approx(z_val.double().mean(0).tolist(), rel=1e-5)
    assert stats["logn_val"]["split"] == "val" and stats["logn_balanced"]["class_balanced"]
    bal_mean, _ = class_balanced_moments(z_train.double(), train.labels, 3)
    assert stats["logn_balanced"]["mean"] == pytest.approx(bal_mean.tolist(), rel=1e-5)
    assert list(train.counts) == [14, 7, 3] and stats["logn_balanced"]["mean"] != pytest.approx(stats["logn"]["mean"])
    mean, var = (torch.tensor(stats["logn_val"][k], dtype=torch.float64) for k in ("mean", "std"))
    want = per_class_accuracy((z_test.double() - mean) / var, test.labels, 3)
    assert m["methods"]["logn_val"]["per_class"] == pytest.approx(want)


def test_logn_val_without_a_val_split_fails_before_training(manifests, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"eval.posthoc: logn_val .*no 'val' split"):
        train_classifier(_cfg(manifests[1], out, ["logn", "logn_val"]), progress=False)
    assert not out.exists()
    cfg = _cfg(manifests[1], out, ["logn_balanced"])  # needs only the training split
    assert cfg.eval.posthoc == ["logn_balanced"]


def test_demo_reevaluates_a_finished_run_whose_config_differs_only_in_eval(manifests, tmp_path, monkeypatch):
    from taildet.classify import demo

    done = train_classifier(_cfg(manifests[0], tmp_path / "run", ["logn"]), progress=False)
    weights = (tmp_path / "run" / "model_final.pth").read_bytes()
    monkeypatch.setattr(demo, "train_classifier", lambda *a, **k: pytest.fail("retrained"))
    again = demo._run(_cfg(manifests[0], tmp_path / "run", ["logn", "logn_val"]), progress=False)
    assert set(again["metrics"]["methods"]) == {"raw", "logn", "logn_val"}
    for key in ("top1", "few", "per_class"):  # the same weights: the same LogN result
        assert again["metrics"]["methods"]["logn"][key] == done["metrics"]["methods"]["logn"][key]
    assert (tmp_path / "run" / "model_final.pth").read_bytes() == weights
    assert "logn_val" in (tmp_path / "run" / "config.yaml").read_text()
    # now the same config: the metrics are read back, nothing is evaluated
    monkeypatch.setattr(demo, "evaluate_classifier", lambda *a, **k: pytest.fail("evaluated"))
    reread = demo._run(_cfg(manifests[0], tmp_path / "run", ["logn", "logn_val"]), progress=False)["metrics"]
    assert reread["methods"]["logn_val"]["per_class"] == again["metrics"]["methods"]["logn_val"]["per_class"]
