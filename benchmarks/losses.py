"""Forward + backward time of the long-tail classification losses against their plain counterparts.

    python benchmarks/losses.py                 # CPU, default repeats (< 1 minute)
    python benchmarks/losses.py --device cuda   # GPU
    python benchmarks/losses.py --sizes 1024 --repeats 10
    python benchmarks/losses.py --retain-memory # CPU without page-fault cost (compute only)

LVIS scale: ``C = 1203`` foreground classes (softmax width 1204), two batch sizes: 1,024 RoIs (2
images x 512) and 8,192 RoIs (16 images x 512); 25 % foreground RoIs as the RoI sampler gives.
Each entry is timed against a reference in the *same run*: every round times the reference and
the entry back to back, and the ratio is the median of the per-round ratios (machine noise and
the allocator's state hit both alike); the times shown are medians.

CPU time at this size is largely *memory allocation*: every fresh ``[8192, 1204]`` float tensor
(39 MB) is above glibc's ``mmap`` threshold and costs page faults when first written (on this
project's VMs about 3/4 of ``F.cross_entropy``'s time). taildet's softmax/sigmoid losses run
row-blocked (``taildet.ops.rowwise``) and allocate one such tensor (the gradient) where
``F.cross_entropy`` allocates three. ``--retain-memory`` removes that cost for every entry alike
(glibc keeps freed memory), which shows the compute-only ratios -- the regime of the CUDA caching
allocator.

One timed step = the loss's forward and backward, including the state updates that happen inside
them (EQLv2's accumulators, Seesaw's counts). EBL's mean-score update is a separate call the RoI
head makes before the loss: the row "EBL + update" times both (no goal; the goal row is the loss). The references
are ``F.cross_entropy`` over ``C + 1`` logits and ``F.binary_cross_entropy_with_logits`` over
``C`` logits with the one-hot target built in the timed region (any sigmoid loss needs it).

Adding a loss: append ``Entry(name, make_fn, reference_name, goal)`` to :data:`ENTRIES`.
``make_fn(batch)`` gets a :class:`Batch` (labels ``[N]`` in the two-stage convention, foreground
``0..C-1`` / background ``C``, batch-unique ``gt_index``, ``num_classes``, ``device``) and returns
``(K, step)``; the harness makes ``logits [N, K]`` (``requires_grad``) and times
``step(logits).backward()``. A one-stage loss can derive its own labels from the batch (e.g. add
ignored anchors) inside ``make_fn``. ``reference_name`` is a key of :data:`REFERENCES`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from taildet.losses import (
    BalancedSigmoidLoss,
    BalancedSoftmaxLoss,
    EQLLoss,
    EQLv2Loss,
    EquilibriumLoss,
    SeesawLoss,
)

NUM_CLASSES = 1203


@dataclass
class Batch:
    num_classes: int
    labels: Tensor  # [N] int64, 0..C-1 foreground, C background
    gt_index: Tensor  # [N] int64, batch-unique GT id of positives, -1 for background
    device: torch.device


Step = Callable[[Tensor], Tensor]
MakeFn = Callable[[Batch], "tuple[int, Step]"]


@dataclass
class Entry:
    name: str
    make: MakeFn
    reference: str
    goal: float | None = None  # maximum ratio to the reference; None: no goal


def make_batch(n: int, num_classes: int, device: torch.device, fg_fraction: float = 0.25, seed: int = 0) -> Batch:
    """RoI labels as the sampler gives them: ``fg_fraction`` positives on GTs of long-tailed classes."""
    g = torch.Generator().manual_seed(seed)
    num_pos = int(n * fg_fraction)
    num_gt = max(num_pos // 8, 1)  # about 8 positive RoIs per GT
    # long-tailed GT classes: Zipf-like class probabilities
    p = 1.0 / torch.arange(1, num_classes + 1, dtype=torch.float64)
    gt_cls = torch.multinomial(p / p.sum(), num_gt, replacement=True, generator=g)
    gt = torch.full((n,), -1, dtype=torch.int64)
    gt[:num_pos] = torch.randint(0, num_gt, (num_pos,), generator=g)
    gt[:num_gt] = torch.arange(num_gt)
    labels = torch.where(gt >= 0, gt_cls[gt.clamp(min=0)], torch.full_like(gt, num_classes))
    return Batch(num_classes, labels.to(device), gt.to(device), device)


def _long_tail_stats(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    rank = np.arange(1, num_classes + 1, dtype=np.float64)
    instance_counts = np.maximum(np.round(100000.0 / rank**1.2), 1.0)
    image_frequency = np.clip(0.5 / rank, 1e-5, 0.5)
    return instance_counts, image_frequency


# ------------------------------------------------------------------------------------------------
# References


def _ref_ce(b: Batch) -> tuple[int, Step]:
    return b.num_classes + 1, lambda z: F.cross_entropy(z, b.labels)


def _ref_bce(b: Batch) -> tuple[int, Step]:
    C, n = b.num_classes, b.labels.shape[0]

    def step(z: Tensor) -> Tensor:
        t = torch.zeros(n, C + 1, dtype=z.dtype, device=z.device)
        t[torch.arange(n, device=z.device), b.labels] = 1.0
        return F.binary_cross_entropy_with_logits(z, t[:, :C], reduction="sum") / n

    return C, step


REFERENCES: dict[str, MakeFn] = {"ce": _ref_ce, "bce": _ref_bce}


# ------------------------------------------------------------------------------------------------
# Losses


def _module_step(loss: torch.nn.Module, b: Batch) -> tuple[int, Step]:
    loss = loss.to(b.device).train()
    return loss.num_outputs(), lambda z: loss(z, b.labels)


def _balanced_softmax(b: Batch):
    counts, _ = _long_tail_stats(b.num_classes)
    return _module_step(BalancedSoftmaxLoss(b.num_classes, counts), b)


def _balanced_sigmoid(b: Batch):
    _, freq = _long_tail_stats(b.num_classes)
    return _module_step(BalancedSigmoidLoss(b.num_classes, freq), b)


def _ebl_scores(b: Batch) -> EquilibriumLoss:
    """EBL with a long-tailed mean score (as after some training), so the log s shift is not uniform."""
    loss = EquilibriumLoss(b.num_classes).to(b.device).train()
    rank = torch.arange(1, b.num_classes + 2, dtype=torch.float64)
    loss.mean_score.copy_((0.9 / rank.sqrt()).clamp(min=1e-3).to(loss.mean_score))
    return loss


def _ebl(b: Batch):
    loss = _ebl_scores(b)
    return loss.num_outputs(), lambda z: loss(z, b.labels)


def _ebl_with_update(b: Batch):
    loss = _ebl_scores(b)

    def step(z: Tensor) -> Tensor:
        loss.update(z.detach(), b.labels, b.gt_index)
        return loss(z, b.labels)

    return loss.num_outputs(), step


def _eql(b: Batch):
    _, freq = _long_tail_stats(b.num_classes)
    return _module_step(EQLLoss(b.num_classes, freq), b)


def _eqlv2(b: Batch):
    return _module_step(EQLv2Loss(b.num_classes), b)


def _seesaw(b: Batch):
    return _module_step(SeesawLoss(b.num_classes), b)


ENTRIES: list[Entry] = [
    Entry("balanced_softmax", _balanced_softmax, "ce", 1.1),
    Entry("equilibrium (EBL)", _ebl, "ce", 1.5),
    Entry("EBL + update", _ebl_with_update, "ce", None),
    Entry("seesaw", _seesaw, "ce", 2.0),
    Entry("balanced_sigmoid", _balanced_sigmoid, "bce", None),
    Entry("eql", _eql, "bce", None),
    Entry("eqlv2", _eqlv2, "bce", 2.0),
]


# ------------------------------------------------------------------------------------------------
# Harness


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(k: int, step: Step, n: int, device: torch.device, base: dict[int, Tensor]) -> float:
    if k not in base:
        base[k] = torch.randn(n, k, generator=torch.Generator().manual_seed(k)).to(device)
    z = base[k].clone().requires_grad_(True)
    _sync(device)
    t0 = time.perf_counter()
    step(z).backward()
    _sync(device)
    return time.perf_counter() - t0


def run(sizes: list[int], repeats: int, warmup: int, device: torch.device, entries: list[Entry]) -> list[dict]:
    """Per size and entry: ``warmup + repeats`` rounds of (reference, entry) timed back to back
    (so machine noise and allocator state hit both alike); the ratio is the median of the
    per-round ratios, the times are medians."""
    rows = []
    for n in sizes:
        batch = make_batch(n, NUM_CLASSES, device)
        refs = {r: REFERENCES[r](batch) for r in sorted({e.reference for e in entries})}
        base: dict[int, Tensor] = {}
        for e in entries:
            k, step = e.make(batch)
            rk, rstep = refs[e.reference]
            t_ref, t_e = [], []
            for it in range(warmup + repeats):
                tr = _time_once(rk, rstep, n, device, base)
                te = _time_once(k, step, n, device, base)
                if it >= warmup:
                    t_ref.append(tr)
                    t_e.append(te)
            ratio = statistics.median([a / b for a, b in zip(t_e, t_ref)])
            rows.append(
                dict(n=n, name=e.name, ms=1e3 * statistics.median(t_e), ref=e.reference,
                     ref_ms=1e3 * statistics.median(t_ref), ratio=ratio,
                     goal=e.goal, ok=None if e.goal is None else ratio <= e.goal)
            )
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'RoIs':>6}  {'loss':<18} {'ms':>9}  {'reference':<10} {'ref ms':>9}  {'ratio':>6}  {'goal':>6}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        goal = f"<={r['goal']:.1f}" if r["goal"] is not None else "-"
        ok = "-" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        ref = {"ce": "CE", "bce": "BCE"}.get(r["ref"], r["ref"])
        lines.append(
            f"{r['n']:>6}  {r['name']:<18} {r['ms']:>9.2f}  {ref:<10} {r['ref_ms']:>9.2f}  {r['ratio']:>6.2f}  {goal:>6}  {ok}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192], help="numbers of RoIs")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 15 on CPU, 50 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 1 on CPU, 10 on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--retain-memory", action="store_true",
                    help="CPU: make glibc malloc keep freed memory and never mmap (M_MMAP_MAX=0, "
                         "M_TRIM_THRESHOLD=1 GiB), so large temporaries cost no page faults -- the "
                         "compute-only regime, like the CUDA caching allocator")
    ap.add_argument("--json", metavar="PATH", default=None,
                    help="also write the table as a measured-tables file for the docs "
                         "(e.g. docs/results/bench_losses.json; `taildet docs` renders it)")
    args = ap.parse_args(argv)
    if args.retain_memory:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if not (libc.mallopt(-4, 0) and libc.mallopt(-1, 1 << 30)):  # M_MMAP_MAX, M_TRIM_THRESHOLD
            print("mallopt failed (not glibc?)", file=sys.stderr)
            return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    repeats = args.repeats if args.repeats is not None else (50 if cuda else 15)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# taildet loss benchmark: C={NUM_CLASSES} (+1 background), device {name}, torch {torch.__version__}, "
          f"median of {repeats} (after {warmup} warm-up), forward + backward incl. state updates"
          + (", malloc retains memory" if args.retain_memory else ", system malloc"))
    t0 = time.perf_counter()
    rows = run(args.sizes, repeats, warmup, device, ENTRIES)
    print(format_table(rows))
    print(f"# {time.perf_counter() - t0:.1f} s")
    if args.json:
        from taildet.results_docs import write_table_summary

        table = {"columns": ["RoIs", "loss", "ms", "reference", "ref ms", "ratio", "goal"],
                 "formats": ["d", "s", ".2f", "s", ".2f", ".2f", "s"],
                 "rows": [[r["n"], r["name"], r["ms"], {"ce": "CE", "bce": "BCE"}.get(r["ref"], r["ref"]),
                           r["ref_ms"], r["ratio"], "-" if r["goal"] is None else f"<= {r['goal']:.1f}"]
                          for r in rows]}
        command = "python benchmarks/losses.py" + " ".join([""] + (argv if argv is not None else sys.argv[1:]))
        print("wrote", write_table_summary(args.json, f"loss cost on {name}", {"losses": table}, command))
    return 0  # a benchmark reports; goals missed show as "NO" in the table, they do not fail `make bench`


if __name__ == "__main__":
    raise SystemExit(main())
