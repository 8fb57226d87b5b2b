"""Training-step and inference time of taildet's Faster R-CNN against plain torchvision.

Both models have the same configuration (backbone, anchors, RoIAlign, box head, RPN and RoI
sampling settings, C + 1 softmax classes) and see the same inputs in the same run; the steps are
interleaved so machine noise hits both alike. Goal: taildet <= 1.05x torchvision.

    python benchmarks/train_step.py                      # tiny backbone, 96 px, batch 8 (CPU)
    python benchmarks/train_step.py --backbone resnet50 --size 800 --batch 2 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from taildet.models import build_faster_rcnn


def plain_torchvision_twin(model, num_classes: int, args) -> FasterRCNN:
    """A stock torchvision FasterRCNN with the same parts and settings as ``model``."""
    rh = model.roi_heads
    rep = rh.box_head.fc7.out_features
    tv = FasterRCNN(
        copy.deepcopy(model.backbone),
        num_classes=None,
        min_size=args.size,
        max_size=args.size,
        rpn_anchor_generator=copy.deepcopy(model.rpn.anchor_generator),
        rpn_head=copy.deepcopy(model.rpn.head),
        box_roi_pool=copy.deepcopy(rh.box_roi_pool),
        box_head=copy.deepcopy(rh.box_head),
        box_predictor=FastRCNNPredictor(rep, num_classes + 1),
        box_batch_size_per_image=args.rois,
        box_detections_per_img=300,
        box_score_thresh=1e-4,
        box_nms_thresh=0.5,
    )
    return tv


def make_inputs(batch: int, size: int, num_classes: int, device, gen, gts_per_image: int = 3):
    images = [torch.rand(3, size, size, generator=gen).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        n = gts_per_image
        xy = torch.rand(n, 2, generator=gen) * size * 0.6
        wh = torch.rand(n, 2, generator=gen) * size * 0.3 + size * 0.1
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def tv_targets(targets):
    return [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=48)
    p.add_argument("--rois", type=int, default=512, help="sampled RoIs per image")
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = build_faster_rcnn(args.classes, backbone=args.backbone, min_size=args.size, max_size=args.size,
                             box_batch_size_per_image=args.rois).to(device)
    theirs = plain_torchvision_twin(ours, args.classes, args).to(device)
    gen = torch.Generator().manual_seed(0)
    images, targets = make_inputs(args.batch, args.size, args.classes, device, gen)
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
            for name, m in (("taildet", ours), ("torchvision", theirs))}
    models = {"taildet": ours, "torchvision": theirs}
    train_t: dict[str, list[float]] = {k: [] for k in models}
    for it in range(args.warmup + args.iters):
        for name, m in models.items():
            m.train()
            tg = targets if name == "taildet" else tv_targets(targets)
            sync(device)
            t0 = time.perf_counter()
            loss = sum(m(images, tg).values())
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            sync(device)
            if it >= args.warmup:
                train_t[name].append(time.perf_counter() - t0)
    infer_t: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for it in range(args.warmup + args.iters):
            for name, m in models.items():
                m.eval()
                sync(device)
                t0 = time.perf_counter()
                m(images)
                sync(device)
                if it >= args.warmup:
                    infer_t[name].append((time.perf_counter() - t0) / args.batch)
    print(f"Faster R-CNN, backbone {args.backbone}, {args.size} px, batch {args.batch}, {args.classes} classes, "
          f"{args.rois} RoIs/img, device {device}, {torch.get_num_threads()} threads; median of {args.iters}")
    print(f"{'':22s}{'taildet':>12s}{'torchvision':>14s}{'ratio':>9s}")
    for label, d, unit in (("train step (s)", train_t, 1.0), ("inference (ms/img)", infer_t, 1000.0)):
        a, b = statistics.median(d["taildet"]) * unit, statistics.median(d["torchvision"]) * unit
        print(f"{label:22s}{a:12.4f}{b:14.4f}{a / b:9.3f}x")
    print("goal: ratio <= 1.05x")


if __name__ == "__main__":
    main()
