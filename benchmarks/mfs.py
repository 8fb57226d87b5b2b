"""Cost of LOCE's memory-augmented feature sampling (MFS): step time, memory, pre-fill.

* fine-tune step time (forward + backward + SGD step, LOCE freeze policy, EBL) of the same model
  with and without MFS attached, interleaved so machine noise hits both alike. Goal: <= 1.10x;
* bytes per class entry of the memory (this model, and LVIS v1's 256 x 7 x 7 features) and the
  LVIS v1 total at M = 80;
* pre-fill time per class: the class-balanced pass (M / 16 images per class) on the embedded
  synthetic dataset.

    python benchmarks/mfs.py                          # tiny demo model (96 px, batch 8, 3 GTs/image),
                                                      # then ResNet-50 FPN (320 px, batch 4, 12 GTs/image)
    python benchmarks/mfs.py --backbone resnet50 --size 800 --batch 2 --classes 1203 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from taildet.engine.finetune import freeze_parameters
from taildet.models import build_faster_rcnn
from taildet.sampling import ClassMemory, MemoryAugmentedSampling, attach_mfs, prefill_memory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import make_inputs, sync  # noqa: E402  (same random detection inputs)

LOCE_FREEZE = [r"^backbone\.", r"^roi_heads\.box_head\."]
# the demo recipe's detector (configs/demo_faster_tiny_ce.yaml)
DEMO = dict(box_batch_size_per_image=128, representation_size=256, rpn_pre_nms_top_n_train=600,
            rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=600, rpn_post_nms_top_n_test=300)


def build(args, device, num_classes):
    torch.manual_seed(0)
    kw = dict(DEMO) if args.backbone == "tiny" else {}
    model = build_faster_rcnn(num_classes, backbone=args.backbone, loss="equilibrium", min_size=args.size,
                              max_size=args.size, **kw)
    freeze_parameters(model, LOCE_FREEZE)
    return model.to(device)


def step_times(args, device):
    gen = torch.Generator().manual_seed(0)
    plain, with_mfs = build(args, device, args.classes), build(args, device, args.classes)
    mfs = attach_mfs(with_mfs, MemoryAugmentedSampling.from_model(
        with_mfs, capacity=args.capacity, dtype=args.dtype, device=device if args.memory == "auto" else "cpu"))
    batches = [make_inputs(args.batch, args.size, args.classes, device, gen, args.gts) for _ in range(4)]
    models = {"without MFS": plain, "with MFS": with_mfs}
    opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
            for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for it in range(args.warmup + args.iters):
        images, targets = batches[it % len(batches)]
        order = list(models) if it % 2 == 0 else list(models)[::-1]
        for name in order:
            m = models[name]
            m.train()
            sync(device)
            t0 = time.perf_counter()
            loss = sum(m(images, targets).values())
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            sync(device)
            if it >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    return times, mfs


class RandomDetSet(torch.utils.data.Dataset):
    """Fallback when the synthetic generator's dependencies are missing: random 96 px images,
    1-4 boxes each, ``num_classes`` classes, a long-tailed label draw."""

    def __init__(self, n=600, num_classes=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        w = 1.0 / torch.arange(1, num_classes + 1, dtype=torch.float64)
        self.items = []
        for _ in range(n):
            k = int(torch.randint(1, 5, (1,), generator=g))
            xy = torch.rand(k, 2, generator=g) * 50
            wh = 12 + torch.rand(k, 2, generator=g) * 30
            labels = torch.multinomial(w, k, replacement=True, generator=g)
            self.items.append((torch.cat([xy, xy + wh], 1), labels))
        self.labels_per_image = [sorted(set(l.tolist())) for _, l in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        boxes, labels = self.items[i]
        return torch.rand(3, 96, 96), {"boxes": boxes.clone(), "labels": labels.clone()}


def prefill_time(args, device):
    try:
        from taildet.data.lvis import load_lvis
        from taildet.data.synthetic import make_dataset
        from taildet.data.transforms import build_transforms
    except ImportError as e:  # e.g. pycocotools missing on a bare GPU machine
        print(f"  (synthetic dataset unavailable: {e}; pre-fill timed on random images instead)")
        ds = RandomDetSet()
    else:
        root = args.data_root or os.path.join(tempfile.gettempdir(), f"taildet_bench_mfs_{args.scale}")
        info = make_dataset(root, seed=0, scale=args.scale, progress=False)
        ds = load_lvis(info["train_json"], info["image_dir"], transforms=build_transforms(True, [96], 96, 0.5))
    model = build(argparse.Namespace(**{**vars(args), "backbone": "tiny", "size": 96}), device, ds.num_classes)
    mfs = attach_mfs(model, MemoryAugmentedSampling.from_model(model, capacity=args.capacity, dtype=args.dtype,
                                                              device=device))
    out = prefill_memory(model, ds, batch_size=args.batch, device=device, progress=False)
    return out, ds.num_classes, mfs


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=48)
    p.add_argument("--gts", type=_positive_int, default=3, help="GT boxes per image (LVIS v1 train averages ~12)")
    p.add_argument("--capacity", type=int, default=80)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--memory", default="auto", choices=["auto", "cpu"], help="memory on the device or the host")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--scale", type=float, default=0.2, help="synthetic dataset scale for the pre-fill timing")
    p.add_argument("--data-root", default=None)
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--lvis-like", action=argparse.BooleanOptionalAction, default=True,
                   help="also time ResNet-50 FPN, 320 px, batch 4, 12 GTs/image (default: on)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the tables as a measured-tables file for the docs (`taildet docs` renders it)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    runs = [args]
    if args.lvis_like:
        # LOCE's own detector (ResNet-50 FPN, 256-channel RoI features) at the LVIS v1 training
        # set's average of ~12 GT boxes per image, at a CPU-sized input
        runs.append(argparse.Namespace(**{**vars(args), "backbone": "resnet50", "size": 320, "batch": 4, "gts": 12,
                                          "iters": max(4, args.iters // 2), "warmup": 2}))
    step_rows, memory_rows, prefill_rows = [], [], []
    for run in runs:
        times, mfs = step_times(run, device)
        a, b = statistics.median(times["with MFS"]), statistics.median(times["without MFS"])
        step_rows.append(["tiny (demo)" if run.backbone == "tiny" else {"resnet50": "ResNet-50 FPN"}.get(run.backbone, run.backbone),
                          f"{run.size} px, batch {run.batch}", run.gts, run.iters, b, a, a / b])
        print(f"Faster R-CNN fine-tune step (EBL, backbone + box FCs frozen), backbone {run.backbone}, "
              f"{run.size} px, batch {run.batch}, {run.gts} GTs/image, {run.classes} classes, device {device}, "
              f"{torch.get_num_threads()} threads; median of {run.iters}")
        print(f"  without MFS {b:.4f} s   with MFS {a:.4f} s   ratio {a / b:.3f}x   (goal <= 1.10x)")
        print(f"  memory after {run.warmup + run.iters} steps: {len(mfs.memory)} entries, "
              f"{int((mfs.memory.count > 0).sum())} classes")
        print(f"  bytes per class entry: {mfs.memory.entry_nbytes} (feature {mfs.memory.feature_shape} {run.dtype} "
              f"+ label + target); this memory {mfs.memory.nbytes / 1e6:.2f} MB")
        memory_rows.append([f"{step_rows[-1][0]} ({run.classes} classes, {tuple(mfs.memory.feature_shape)} features, "
                            f"M = {run.capacity}, {run.dtype})", mfs.memory.entry_nbytes, mfs.memory.nbytes / 1e6])
    for name, d in (("fp16", torch.float16), ("fp32", torch.float32)):
        per = ClassMemory.estimate_nbytes(1, 1, (256, 7, 7), d)
        tot = ClassMemory.estimate_nbytes(1203, 80, (256, 7, 7), d)
        print(f"  LVIS v1 (1,203 classes, 256x7x7, M=80) {name}: {per} bytes per entry, {tot / 1e9:.2f} GB")
        memory_rows.append([f"LVIS v1 (1,203 classes, 256x7x7 features, M = 80, {name})", per, tot / 1e6])
    if not args.no_prefill:
        out, C, pmfs = prefill_time(args, device)
        print(f"Pre-fill (tiny demo model, {C} classes, "
              f"{max(1, -(-args.capacity // 16))} images per class, batch {args.batch}): {out['images']} images, "
              f"{out['entries']} entries, {out['seconds']:.2f} s = {1000 * out['seconds'] / C:.1f} ms per class, "
              f"{1000 * out['seconds'] / max(out['images'], 1):.1f} ms per image; "
              f"{int((pmfs.memory.count > 0).sum())}/{C} classes filled")
        prefill_rows.append([f"tiny (demo), {C} classes", out["images"], out["entries"], out["seconds"],
                             1000 * out["seconds"] / C])
    if args.json:
        from taildet.results_docs import write_table_summary

        tables = {
            "step": {"columns": ["model", "input", "GTs / image", "iterations", "without MFS (s)", "with MFS (s)", "ratio"],
                     "formats": ["s", "s", "d", "d", ".3f", ".3f", ".3f"], "rows": step_rows},
            "memory": {"columns": ["memory", "bytes per entry", "total (MB)"], "formats": ["s", "d", ".1f"],
                       "rows": memory_rows}}
        if prefill_rows:
            tables["prefill"] = {"columns": ["pre-fill", "images", "entries", "seconds", "ms per class"],
                                 "formats": ["s", "d", "d", ".2f", ".1f"], "rows": prefill_rows}
        command = "python benchmarks/mfs.py" + " ".join([""] + sys.argv[1:])
        print("wrote", write_table_summary(args.json, f"MFS fine-tune step cost, device {device}", tables, command))


if __name__ == "__main__":
    main()
