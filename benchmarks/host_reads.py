"""Host reads per training step of every row of the GPU suite, and how many happen inside a loss.

On CUDA every read of a device value on the host (``.item()``, ``bool(t)``, ``nonzero``,
boolean-mask indexing, ``bincount``, ``unique``) makes the CPU wait for the GPU (issue 18). The
count does not depend on the device, so it is measured here on the CPU: the suite's rows
(``benchmarks/gpu_suite.py``: the same configs, models and training step, at its smoke sizes) run
with the GPU's code paths forced (``taildet.utils.host_sync.sync_free_paths``), and one training
step after the warm-up runs under ``HostSyncDetector``. Each read is attributed to the innermost
Python frame outside torch: in a loss (``taildet/losses``, ``taildet/ops``), elsewhere in taildet,
or in torchvision (its detection code: anchor matching, samplers, RoI pooling).

Goal (issue 18): no host read inside a loss; taildet's CE step no more reads than torchvision's.

    python benchmarks/host_reads.py [--json ../docs/results/bench_host_reads.json]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_suite  # noqa: E402

from taildet.utils.host_sync import HostSyncDetector, sync_free_paths  # noqa: E402

GROUPS = ("mask_rcnn", "mfs", "atss")
_LOSS_DIRS = (os.path.join("taildet", "losses") + os.sep, os.path.join("taildet", "ops") + os.sep)
_SAMPLING_DIR = os.path.join("taildet", "sampling") + os.sep
_KINDS = ("loss", "host", "taildet", "torchvision", "other")


def where(site: str) -> str:
    """``loss``, ``host`` (MFS: its memory and draws live on the host by design, no device read
    on a GPU), ``taildet``, ``torchvision`` or ``other`` (the training step itself: gradient
    clipping) for a ``file:line`` site."""
    if any(d in site for d in _LOSS_DIRS):
        return "loss"
    if _SAMPLING_DIR in site:
        return "host"
    if f"{os.sep}taildet{os.sep}" in site:
        return "taildet"
    if f"{os.sep}torchvision{os.sep}" in site:
        return "torchvision"
    return "other"


def measure(argv: list[str] | None = None) -> dict[str, dict]:
    """Row key -> ``{"label", "group", "total", "loss", "host", "taildet", "torchvision", "other",
    "kernels", "reference", "sites"}`` (``kernels``: aten operators that are not views or bare
    allocations, about the kernels a GPU launches; ``reference``: the row's reference in the suite) for the last training step of each row (the suite at smoke sizes, one warm-up
    step and one measured step per row)."""
    records: dict[int, HostSyncDetector] = {}
    step = gpu_suite.training_step

    def recorded_step(t, images, targets):
        with HostSyncDetector() as det:
            step(t, images, targets)
        records[id(t.model)] = det

    gpu_suite.training_step = recorded_step
    try:
        with sync_free_paths():
            out = gpu_suite.run(["--cpu-smoke", "--no-progress", "--warmup", "1", "--rounds", "1",
                                 "--groups", ",".join(GROUPS), *(argv or [])], keep_models=True)
    finally:
        gpu_suite.training_step = step
    labels = {r.key: (r.label, r.group, r.reference) for r in gpu_suite.ROWS}
    result = {}
    for key, model in out["models"].items():
        det = records[id(model)]
        kinds = collections.Counter(where(s) for s in det.sites)
        result[key] = {"label": labels[key][0], "group": labels[key][1], "reference": labels[key][2],
                       "total": len(det.calls),
                       **{k: kinds.get(k, 0) for k in _KINDS}, "kernels": det.kernels,
                       "sites": sorted(collections.Counter(f"{c} @ {s}" for c, s in zip(det.calls, det.sites)).items())}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the table for the docs (taildet docs)")
    p.add_argument("--verbose", action="store_true", help="print every read's operator and site")
    args = p.parse_args()
    torch.manual_seed(0)
    result = measure()
    def extra_kernels(r: dict) -> int | None:
        return None if r["reference"] is None else r["kernels"] - result[r["reference"]]["kernels"]

    rows = [[r["group"], r["label"], r["total"] - r["host"], *(r[k] for k in _KINDS), r["kernels"], extra_kernels(r)]
            for r in result.values()]
    head = ["group", "row", "device reads", "in a loss", "host data", "taildet", "torchvision", "step", "kernels",
            "vs reference"]
    print(f"{head[0]:10s}{head[1]:28s}" + "".join(f"{h:>13s}" for h in head[2:]))
    for r in rows:
        print(f"{r[0]:10s}{r[1]:28s}" + "".join(f"{'-' if v is None else v:>13}" for v in r[2:]))
    if args.verbose:
        for key, r in result.items():
            print(f"== {r['label']}")
            for site, n in r["sites"]:
                print(f"  {n:3d}  {site}")
    bad = [r["label"] for r in result.values() if r["loss"]]
    print("goal: no host read inside a loss --", "MISS: " + ", ".join(bad) if bad else "PASS")
    if args.json:
        from taildet.results_docs import write_table_summary

        tables = {"reads": {"columns": ["group", "row", "device reads / step", "in a loss", "MFS host data (no read on GPU)",
                                        "elsewhere in taildet", "in torchvision", "step (clipping)", "kernels / step",
                                        "kernels vs reference"],
                            "formats": ["s", "s", "d", "d", "d", "d", "d", "d", "d", "+d"], "rows": rows}}
        command = "python benchmarks/host_reads.py" + " ".join([""] + sys.argv[1:])
        print("wrote", write_table_summary(args.json, "Host reads per training step (GPU code paths)", tables, command))


if __name__ == "__main__":
    main()
