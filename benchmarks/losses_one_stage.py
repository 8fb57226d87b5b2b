"""Speed and memory of the one-stage long-tail losses at LVIS scale, against torchvision's focal loss.

Cases, each one forward + backward of the classification loss on ``[N, 1203]`` logits:

* ``tv_focal``  -- ``torchvision.ops.sigmoid_focal_loss(..., reduction="sum") / num_pos`` on a
  dense one-hot target matrix built *before* timing (the reference; the ratios are against it);
* ``focal``     -- taildet's :class:`~taildet.losses.focal.SigmoidFocalLoss` (label form, builds
  its targets inside);
* ``efl``       -- :class:`~taildet.losses.equalized_focal.EqualizedFocalLoss`, including the
  state update of its backward (accumulators, ratio);
* ``eqfl``      -- :class:`~taildet.losses.equalized_focal.EqualizedQualityFocalLoss`, likewise;
* ``qfl``       -- :class:`~taildet.losses.quality_focal.QualityFocalLoss` (plain autograd).

Labels: 1 % positive anchors (random classes), 5 % ignored, the rest negatives; EFL/EQFL start
from a random, non-uniform gradient ratio so every class has its own focusing factor.

Time: the median of ``--repeat`` runs after one warm-up. Memory: each case runs once more in a
fresh subprocess; reported is the peak memory *added* by the forward + backward over the inputs
already allocated -- on CUDA ``torch.cuda.max_memory_allocated`` (exact, torch's allocator), on the
CPU the growth of the process's resident high-water mark (``VmHWM`` in /proc/self/status; large
tensors are mmap-ed by the allocator, so this tracks the live tensors within a few MB). Both include
the ``[N, C]`` gradient of the logits, which every case must produce.

Usage::

    python benchmarks/losses_one_stage.py                          # CPU, 20,000 x 1,203 (make bench)
    python benchmarks/losses_one_stage.py --device cuda            # 100,000 x 1,203
    python benchmarks/losses_one_stage.py --anchors 5000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

CASES = ("tv_focal", "focal", "efl", "eqfl", "qfl")
NUM_CLASSES = 1203


def make_inputs(n: int, c: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g) * 2 - 4).to(device)
    u = torch.rand(n, generator=g)
    labels = torch.full((n,), c, dtype=torch.int64)
    pos = u < 0.01
    labels[pos] = torch.randint(0, c, (int(pos.sum()),), generator=g)
    labels[(u >= 0.01) & (u < 0.06)] = -1
    quality = torch.rand(n, generator=g)
    ratio = torch.rand(c, generator=g)
    valid = labels >= 0
    onehot = torch.zeros(int(valid.sum()), c + 1)
    onehot[torch.arange(onehot.shape[0]), labels[valid]] = 1.0
    return {
        "logits": logits,
        "labels": labels.to(device),
        "quality": quality.to(device),
        "ratio": ratio.to(device),
        "valid": valid.to(device),
        "onehot": onehot[:, :c].contiguous().to(device),
        "num_pos": max(1, int(pos.sum())),
    }


def make_case(name: str, data: dict, device: str):
    """A closure running one forward + backward of case ``name`` on ``data``."""
    from torchvision.ops import sigmoid_focal_loss

    from taildet.losses.equalized_focal import EqualizedFocalLoss, EqualizedQualityFocalLoss
    from taildet.losses.focal import SigmoidFocalLoss
    from taildet.losses.quality_focal import QualityFocalLoss

    c = data["logits"].shape[1]
    labels, quality = data["labels"], data["quality"]
    if name == "tv_focal":
        valid, onehot, num_pos = data["valid"], data["onehot"], data["num_pos"]

        def fn(x):
            return sigmoid_focal_loss(x[valid], onehot, reduction="sum") / num_pos

    elif name == "focal":
        loss = SigmoidFocalLoss(c).to(device)

        def fn(x):
            return loss(x, labels)

    elif name in ("efl", "eqfl"):
        loss = (EqualizedFocalLoss(c) if name == "efl" else EqualizedQualityFocalLoss(c)).to(device)
        loss.pos_grad.copy_(data["ratio"])
        loss.neg_grad.fill_(1.0)
        loss.pos_neg_ratio.copy_(data["ratio"])
        kw = {"quality": quality} if name == "eqfl" else {}

        def fn(x):
            return loss(x, labels, **kw)

    elif name == "qfl":
        loss = QualityFocalLoss(c).to(device)

        def fn(x):
            return loss(x, labels, quality=quality)

    else:
        raise ValueError(name)

    def step():
        x = data["logits"].detach().requires_grad_(True)
        fn(x).backward()
        return x.grad

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_case(name: str, data: dict, device: str, repeat: int) -> float:
    step = make_case(name, data, device)
    step()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        grad = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        del grad
    return statistics.median(times)


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM not found in /proc/self/status")


def memory_case(name: str, n: int, device: str) -> float:
    """Peak memory added by one forward + backward, MiB (run in a fresh process for the CPU)."""
    data = make_inputs(n, NUM_CLASSES, device)
    step = make_case(name, data, device)
    if device.startswith("cuda"):
        step()  # warm-up (allocator caches, kernels)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _vm_hwm_kb()
    step()
    return (_vm_hwm_kb() - base) / 1024


def memory_in_subprocess(name: str, n: int, device: str) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-case", name, "--anchors", str(n), "--device", device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--anchors", type=int, default=None, help="N (default 20,000 on CPU, 100,000 on CUDA)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    n = args.anchors or (100_000 if args.device.startswith("cuda") else 20_000)
    if args.memory_case:
        print(json.dumps({"peak_mib": memory_case(args.memory_case, n, args.device)}))
        return 0

    cases = [c for c in args.cases.split(",") if c]
    data = make_inputs(n, NUM_CLASSES, args.device)
    print(
        f"one-stage losses, forward + backward: {n:,} anchors x {NUM_CLASSES} classes on {args.device} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}), median of {args.repeat}"
    )
    times = {c: time_case(c, data, args.device, args.repeat) for c in cases}
    del data
    mems = {} if args.no_memory else {c: memory_in_subprocess(c, n, args.device) for c in cases}
    ref_t = times.get("tv_focal")
    ref_m = mems.get("tv_focal")
    print(f"{'case':10s} {'time ms':>9s} {'x tv_focal':>10s} {'peak +MiB':>10s} {'x tv_focal':>10s}")
    for c in cases:
        t_ratio = f"{times[c] / ref_t:10.2f}" if ref_t else f"{'-':>10s}"
        m = f"{mems[c]:10.0f}" if c in mems else f"{'-':>10s}"
        m_ratio = f"{mems[c] / ref_m:10.2f}" if c in mems and ref_m else f"{'-':>10s}"
        print(f"{c:10s} {times[c] * 1e3:9.1f} {t_ratio} {m} {m_ratio}")
    if ref_t and "efl" in times:
        verdict = "meets" if times["efl"] <= 1.3 * ref_t else "MISSES"
        print(f"EFL time / torchvision focal = {times['efl'] / ref_t:.2f} ({verdict} the <= 1.3x goal)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
