"""EFL's gradient-ratio diagnostic: by hand, from a real EFL loss's checkpointed state, into the docs table."""

from __future__ import annotations

import pytest
import torch

from taildet.analysis.gradient_ratio import gradient_ratio_by_group, gradient_ratio_report
from taildet.losses import build_loss
from taildet.results_docs import format_gradient_ratio_table


def test_gradient_ratio_by_group_by_hand():
    pos = torch.tensor([1.0, 3.0, 2.0, 8.0, 0.0])
    neg = torch.tensor([2.0, 1.0, 2.0, 4.0, 5.0])       # r = 0.5, 3, 1, 2, 0
    out = gradient_ratio_by_group(pos, neg, ["r", "r", "c", "f", "f"])
    assert out["r"] == {"min": 0.5, "median": 0.5, "below_1": 50.0}     # torch's median: the lower middle
    assert out["c"] == {"min": 1.0, "median": 1.0, "below_1": 0.0}
    assert out["f"] == {"min": 0.0, "median": 0.0, "below_1": 50.0}
    assert out["all"]["below_1"] == 40.0 and out["all"]["min"] == 0.0 and out["all"]["median"] == 1.0
    with pytest.raises(ValueError, match="must all be"):
        gradient_ratio_by_group(pos, neg, ["r", "c"])


def _efl_steps(loss, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        logits = torch.randn(64, loss.num_classes, generator=g, requires_grad=True)
        labels = torch.full((64,), loss.num_classes)                   # background anchors
        labels[:6] = torch.randint(0, 2, (6,), generator=g)           # classes 0-1 positive, 2-3 never
        loss(logits, labels).backward()


def test_report_reads_a_real_efl_state_from_every_checkpoint(tmp_path):
    """The report reads G+ / G- as the loss accumulated them: classes never positive have r = 0
    (below 1, so EFL raises their focusing factor), and it returns None for a loss without them."""
    efl = build_loss("equalized_focal", num_classes=4)
    _efl_steps(efl, 2)
    torch.save({"model": {f"cls_head.loss.{k}": v for k, v in efl.state_dict().items()}, "iteration": 2},
               tmp_path / "checkpoint_0000002.pth")
    _efl_steps(efl, 3, seed=1)
    torch.save({"model": {f"cls_head.loss.{k}": v for k, v in efl.state_dict().items()}}, tmp_path / "model_final.pth")
    report = gradient_ratio_report(tmp_path, {1: "f", 2: "c", 3: "r", 4: "r"})   # class index order = sorted ids
    assert list(report) == ["2", "final"]
    expected = (efl.pos_grad / (efl.neg_grad + 1e-10)).double()
    assert report["final"]["f"]["min"] == round(float(expected[0]), 4)
    assert report["final"]["r"] == {"min": 0.0, "median": 0.0, "below_1": 100.0}      # never positive
    assert float(efl.pos_grad[2:].sum()) == 0.0 and float(efl.neg_grad[2:].min()) > 0.0
    plain = tmp_path / "ce"
    plain.mkdir()
    torch.save({"model": {"cls_head.loss.weight": torch.ones(3)}}, plain / "model_final.pth")
    assert gradient_ratio_report(plain, ["r", "c", "f"]) is None


def test_gradient_ratio_reaches_the_docs_table():
    def diag(scale):
        return {"500": {"r": {"min": 0.5 * scale, "median": 1.0 * scale, "below_1": 50.0},
                        "c": {"min": 1.0, "median": 2.0, "below_1": 0.0},
                        "f": {"min": 1.0, "median": 1.5, "below_1": 0.0},
                        "all": {"min": 0.5, "median": 1.5, "below_1": 20.0 * scale}}}
    summary = {"recipes": {"retinanet_efl": {"runs": {"seed0": {"gradient_ratio": diag(1)},
                                                      "seed1": {"gradient_ratio": diag(2)}}},
                           "retinanet_focal_rfs": {"runs": {"seed0": {}}}}}
    table = format_gradient_ratio_table(summary)
    assert "| retinanet_efl | 500 | 2 | 0.75 / 1.50 | 1.00 / 2.00 | 1.00 / 1.50 | 30.0 |" in table
    assert "retinanet_focal_rfs" not in table
