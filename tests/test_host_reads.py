"""benchmarks/host_reads.py (issue 18): the GPU suite's rows, one training step each with the GPU's
code paths forced on the CPU, under HostSyncDetector. No read inside a loss; every long-tail loss
row reads exactly what the CE row reads (the loss adds nothing); taildet's CE step no more than
torchvision's; MFS adds no device read; EFL / QFL / EQFL read what focal reads."""

from __future__ import annotations

import pytest

from helpers import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reads():
    return load_benchmark("host_reads").measure()


def test_no_host_read_inside_a_loss_and_losses_add_none(reads):
    assert set(reads) >= {"torchvision", "ce", "bsoftmax", "bsigmoid", "ebl", "eql", "eqlv2", "seesaw", "fed",
                          "ce_ft", "mfs", "focal", "efl", "qfl", "eqfl"}
    assert all(r["loss"] == 0 for r in reads.values()), {k: r["sites"] for k, r in reads.items() if r["loss"]}
    device = {k: r["total"] - r["host"] for k, r in reads.items()}
    for key in ("bsoftmax", "bsigmoid", "ebl", "eql", "eqlv2", "seesaw", "fed"):
        assert device[key] == device["ce"], (key, reads[key]["sites"])
    assert 0 < device["ce"] <= device["torchvision"]
    assert device["mfs"] == device["ce_ft"] and reads["mfs"]["host"] > 0  # MFS's draws: host tensors
    assert device["efl"] == device["qfl"] == device["eqfl"] == device["focal"] > 0
    # the kernel count (aten ops that are not views): a loss row launches at least what CE launches
    assert all(reads[k]["kernels"] >= reads["ce"]["kernels"] > 0 for k in ("bsoftmax", "ebl", "eqlv2", "seesaw"))


def test_the_sites_name_where_each_read_happens(reads):
    """The detector's attribution: torchvision's reads are in torchvision's detection code."""
    tv = reads["torchvision"]
    assert tv["torchvision"] == tv["total"]
    assert any("torchvision" in site and "nonzero" in site for site, _ in tv["sites"])
