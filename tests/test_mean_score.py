"""MeanScoreTracker (taildet.losses.mean_score): LOCE's mean-score EMA shared by EBL and MFS."""

from __future__ import annotations

import math

import pytest
import torch

from taildet.losses.equilibrium import EquilibriumLoss
from taildet.losses.mean_score import MeanScoreTracker

C = 3


def _p(row: list[float], c: int) -> float:
    e = [math.exp(v) for v in row]
    return e[c] / sum(e)


def test_update_rule_by_hand_against_the_spec():
    """methods.md section 2: one observation per GT with a positive RoI (mean probability of its
    class over its RoIs), one per class among the memory samples; s_c <- a^n s_c + (1 - a^n) mean;
    background reset to s_hat; classes without observations unchanged."""
    t = MeanScoreTracker(C, alpha=0.5, bg_score=0.02, init_score=0.1)
    assert t.mean_score.tolist() == pytest.approx([0.1] * (C + 1))
    z = [[2.0, 0.0, 0.0, 1.0],   # GT 0 (class 0)
         [1.0, 0.0, 0.0, 0.0],   # GT 0
         [0.0, 3.0, 0.0, 0.0],   # GT 1 (class 1)
         [0.0, 0.0, 1.0, 0.0],   # GT 2 (class 1)
         [0.0, 0.0, 0.0, 5.0]]   # background
    labels = torch.tensor([0, 0, 1, 1, C])
    gt = torch.tensor([0, 0, 1, 2, -1])
    mem_z = [[0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    mem_y = torch.tensor([2, 2, 1])
    t.update(torch.tensor(z), labels, gt, extra_logits=torch.tensor(mem_z), extra_labels=mem_y)

    obs = {0: [(_p(z[0], 0) + _p(z[1], 0)) / 2],
           1: [_p(z[2], 1), _p(z[3], 1), _p(mem_z[2], 1)],
           2: [(_p(mem_z[0], 2) + _p(mem_z[1], 2)) / 2]}
    want = []
    for c in range(C):
        a = 0.5 ** len(obs[c])
        want.append(a * 0.1 + (1 - a) * sum(obs[c]) / len(obs[c]))
    want.append(0.02)
    assert t.mean_score.tolist() == pytest.approx(want, rel=1e-6)

    # no foreground observation: every foreground class keeps its value, background reset again
    before = t.mean_score.clone()
    t.update(torch.zeros(2, C + 1), torch.tensor([C, C]), torch.tensor([-1, -1]))
    torch.testing.assert_close(t.mean_score, before)


def test_observe_memory_queue_equals_extra_arguments():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, C + 1, generator=g)
    y = torch.tensor([0, 2, 2, C, 1, C])
    gt = torch.tensor([0, 1, 1, -1, 2, -1])
    mz, my = torch.randn(4, C + 1, generator=g), torch.tensor([1, 1, 0, 2])
    a, b = MeanScoreTracker(C), MeanScoreTracker(C)
    a.update(z, y, gt, extra_logits=mz, extra_labels=my)
    b.observe_memory(mz, my)
    b.update(z, y, gt)
    assert torch.equal(a.mean_score, b.mean_score) and b.pending == []


def test_ebl_uses_the_tracker_and_keeps_its_update():
    g = torch.Generator().manual_seed(1)
    ebl, t = EquilibriumLoss(C, alpha=0.8, bg_score=0.03), MeanScoreTracker(C, alpha=0.8, bg_score=0.03)
    assert isinstance(ebl.tracker, MeanScoreTracker) and ebl.mean_score is ebl.tracker.mean_score
    for _ in range(3):
        z = torch.randn(8, C + 1, generator=g)
        y = torch.tensor([0, 0, 1, 2, C, C, 1, C])
        gt = torch.tensor([0, 0, 1, 2, -1, -1, 3, -1])
        ebl.update(z, y, gt)
        t.update(z, y, gt)
    assert torch.equal(ebl.mean_score, t.mean_score)
    with pytest.raises(ValueError, match="EquilibriumLoss.update: gt_index is required"):
        ebl.update(torch.zeros(1, C + 1), torch.tensor([0]))
    with pytest.raises(ValueError, match="MeanScoreTracker.update: gt_index is required"):
        t.update(torch.zeros(1, C + 1), torch.tensor([0]))


def test_checkpoint_keys_unchanged_and_old_state_dicts_load():
    """EBL's state_dict keeps the pre-tracker key ``mean_score``; a state dict of the code before
    the tracker (``{"mean_score": s}``) loads strictly, into the tracker's buffer."""
    ebl = EquilibriumLoss(C)
    assert list(ebl.state_dict()) == ["mean_score"]
    head = torch.nn.Module()
    head.loss = EquilibriumLoss(C)
    head.mfs_observer = MeanScoreTracker(C)
    assert sorted(head.state_dict()) == ["loss.mean_score", "mfs_observer.mean_score"]

    old = {"loss.mean_score": torch.tensor([0.3, 0.2, 0.1, 0.01]),
           "mfs_observer.mean_score": torch.tensor([0.4, 0.5, 0.6, 0.01])}
    fresh = torch.nn.Module()
    fresh.loss = EquilibriumLoss(C)
    fresh.mfs_observer = MeanScoreTracker(C)
    result = fresh.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh.loss.tracker.mean_score, old["loss.mean_score"])
    assert torch.equal(fresh.mfs_observer.mean_score, old["mfs_observer.mean_score"])
    # the nested name loads as well, and a round trip is exact
    ebl2 = EquilibriumLoss(C)
    ebl2.load_state_dict({"tracker.mean_score": torch.tensor([0.5, 0.4, 0.3, 0.01])})
    assert ebl2.mean_score.tolist() == pytest.approx([0.5, 0.4, 0.3, 0.01])
    ebl.load_state_dict(ebl2.state_dict())
    assert torch.equal(ebl.mean_score, ebl2.mean_score)


def test_tracker_moves_with_to_and_rejects_bad_arguments():
    t = MeanScoreTracker(C).to(torch.float64)
    assert t.mean_score.dtype == torch.float64
    with pytest.raises(ValueError, match="alpha must be in"):
        MeanScoreTracker(C, alpha=1.0)
    with pytest.raises(ValueError, match="bg_score must be in"):
        MeanScoreTracker(C, bg_score=0.0)
    with pytest.raises(ValueError, match=r"expected logits of shape \[N, 4\]"):
        MeanScoreTracker(C).update(torch.zeros(2, C), torch.tensor([0, 1]), torch.tensor([0, 1]))
