"""Cost of LogN: applying it at inference, and the statistics pass, relative to plain inference.

Measures on random images with random GT boxes (a randomly initialised detector; the costs do not
depend on what the weights have learnt, except through the number of boxes surviving the score
threshold, which is why the transform is also timed on its own):

1. ``transform``: time of ``LogitNormalizer.forward`` on the raw RoI logits of one inference batch
   (``roi_heads.last_logits``), as a fraction of that batch's inference time. Goal <= 1 %.
2. ``end-to-end``: inference with ``apply_logit_normalization`` vs without (same images; includes
   any change in the number of boxes the new scores send to NMS, so it is noisier).
3. ``statistics pass``: :func:`collect_logit_statistics` over the images (training-time RPN and
   RoI sampling, 512 RoIs per image, losses computed and discarded) vs a plain eval-mode inference
   pass over the same images. Goal <= 1.3x.

Measured (32 images, trained-like head; random init in brackets):

* CPU, 2 shared cores, tiny 96 px, 48 classes, batch 8: transform 0.007 % of inference [0.006 %];
  statistics pass 0.35x plain inference [0.29x]; end-to-end faster with LogN (fewer boxes pass the
  score threshold: -63 % [-5 %], noisy on a shared machine).
* H100, ResNet-50-FPN 800 px, 1203 classes, batch 2: transform 0.10 % [0.003 %]; end-to-end +0.08 %;
  statistics pass 1.26x plain inference (81.5 img/s plain) [0.05x: random init's NMS dominates].

Usage::

    python benchmarks/calibration.py                      # tiny Faster R-CNN, 96 px, 48 classes, CPU
    python benchmarks/calibration.py --images 32 --batch 4
    python benchmarks/calibration.py --resnet50           # ResNet-50-FPN, 800 px, 1203 classes, CUDA
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from taildet.calibration import apply_logit_normalization, collect_logit_statistics
from taildet.models import build_faster_rcnn


def make_batches(n_images: int, batch: int, size: tuple[int, int], num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    batches = []
    for start in range(0, n_images, batch):
        images, targets = [], []
        for _ in range(min(batch, n_images - start)):
            k = int(torch.randint(1, 5, (1,), generator=g))
            x1 = torch.rand(k, generator=g) * w * 0.6
            y1 = torch.rand(k, generator=g) * h * 0.6
            bw = (0.1 + 0.3 * torch.rand(k, generator=g)) * w
            bh = (0.1 + 0.3 * torch.rand(k, generator=g)) * h
            boxes = torch.stack([x1, y1, (x1 + bw).clamp(max=w - 1), (y1 + bh).clamp(max=h - 1)], 1)
            images.append(torch.rand(3, h, w, generator=g))
            targets.append({"boxes": boxes, "labels": torch.randint(0, num_classes, (k,), generator=g)})
        batches.append((images, targets))
    return batches


def trained_like_head(model, num_classes: int) -> None:
    """Re-initialise the RoI classifier so its logits look like a trained detector's (spread per RoI,
    long-tailed foreground biases -2..-8, background bias +3) instead of random init's near-constant
    logits, which send every class of every RoI past the score threshold into NMS."""
    cls = model.roi_heads.box_predictor.cls_score
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cls.weight.copy_(torch.randn(cls.weight.shape, generator=g))
        cls.bias[:num_classes] = torch.linspace(-2.0, -8.0, num_classes)
        cls.bias[num_classes] = 3.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _on(batches, device):
    return [([im.to(device) for im in ims], [{k: v.to(device) for k, v in t.items()} for t in tgs])
            for ims, tgs in batches]


def time_inference(model, batches, device) -> list[float]:
    model.eval()
    out = []
    with torch.no_grad():
        for images, _ in batches:
            _sync(device)
            t0 = time.perf_counter()
            model(images)
            _sync(device)
            out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=None, help="default 48 (tiny) / 1203 (--resnet50)")
    ap.add_argument("--resnet50", action="store_true", help="ResNet-50-FPN at 800 px (use a GPU)")
    ap.add_argument("--device", default=None, help="default: cuda with --resnet50 if available, else cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--head", choices=["trained", "random"], default="trained",
                    help="RoI classifier: trained-like logits (default) or random init")
    ap.add_argument("--repeats", type=int, default=3, help="passes per measurement (median reported)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if args.resnet50 and torch.cuda.is_available() else "cpu"))

    torch.manual_seed(0)
    if args.resnet50:
        classes = args.classes or 1203
        batch = min(args.batch, 2) if args.batch == 8 else args.batch
        model = build_faster_rcnn(classes, backbone="resnet50", min_size=800, max_size=1333)
        size = (800, 1067)
    else:
        classes = args.classes or 48
        batch = args.batch
        model = build_faster_rcnn(classes, backbone="tiny", min_size=96, max_size=96)
        size = (96, 96)
    if args.head == "trained":
        trained_like_head(model, classes)
    model.to(device)
    batches = _on(make_batches(args.images, batch, size, classes), device)
    print(f"model: Faster R-CNN {'ResNet-50-FPN 800px' if args.resnet50 else 'tiny 96px'}, {classes} classes, "
          f"{args.images} images, batch {batch}, {args.head} head, device {device}, threads {torch.get_num_threads()}")

    time_inference(model, batches[:1], device)  # warm-up
    plain = [sum(time_inference(model, batches, device)) for _ in range(args.repeats)]

    collect_logit_statistics(model, batches[:1], device=device, progress=False)  # warm-up
    stats_times = []
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        norm = collect_logit_statistics(model, batches, device=device, progress=False)
        _sync(device)
        stats_times.append(time.perf_counter() - t0)

    # transform alone, on the real RoI logits of each batch
    model.eval()
    per_batch_inf = time_inference(model, batches, device)
    frac = []
    with torch.no_grad():
        for (images, _), t_inf in zip(batches, per_batch_inf):
            model(images)
            z = model.roi_heads.last_logits
            norm(z)  # warm (builds the cached shift/scale once)
            reps = 20
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                norm(z)
            _sync(device)
            frac.append((time.perf_counter() - t0) / reps / t_inf)
    rows = int(model.roi_heads.last_logits.shape[0])

    apply_logit_normalization(model, norm)
    time_inference(model, batches[:1], device)
    with_logn = [sum(time_inference(model, batches, device)) for _ in range(args.repeats)]
    apply_logit_normalization(model, None)

    t_plain, t_logn, t_stats = statistics.median(plain), statistics.median(with_logn), statistics.median(stats_times)
    print(f"statistics: {int(norm.count)} RoIs ({int(norm.count) / args.images:.0f} per image)")
    print(f"plain inference pass:       {t_plain:8.3f} s  ({args.images / t_plain:.1f} img/s)")
    print(f"LogN transform alone:       {100 * statistics.median(frac):8.3f} % of a batch's inference "
          f"({rows} RoI rows x {norm.num_outputs} columns per batch)  [goal <= 1 %]")
    print(f"inference with LogN:        {t_logn:8.3f} s  ({100 * (t_logn / t_plain - 1):+.2f} % end-to-end, noisy)")
    print(f"statistics pass:            {t_stats:8.3f} s  = {t_stats / t_plain:.2f}x plain inference  [goal <= 1.3x]")


if __name__ == "__main__":
    main()
