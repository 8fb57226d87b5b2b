"""Speed of taildet's LVIS evaluation against a reference evaluator on the same synthetic data.

Generates an LVIS-like GT (long-tailed classes with r/c/f groups, neg_category_ids,
not_exhaustive_category_ids) and results (jittered GT boxes plus random boxes of annotated,
negative and arbitrary classes, ``--dets`` per image), writes them as JSON to a temp folder, then
times, each from the JSON files:

* ``taildet.evaluation.evaluate_lvis`` (faster-coco-eval underneath), and
* the official lvis-api (``lvis`` package) when it can be imported, else pycocotools' COCOeval
  with LVIS-like settings (maxDets=[300], each image's 300 best detections, detections of
  unverified classes dropped). pycocotools has no not-exhaustive rule, so its AP differs a little:
  it is a timing reference only. ``--reference none`` skips it.

Usage::

    python benchmarks/eval_speed.py                              # make bench default, ~25 s
    python benchmarks/eval_speed.py --images 500 --classes 200   # quick
    python benchmarks/eval_speed.py --images 5000 --classes 1000 --dets 300 --reference none
        # LVIS-val-sized (1.5 M detections). Not run on the dev machine: extrapolating from the
        # default size (300 k detections: 5.5 s, 0.75 GB peak), taildet alone needs roughly
        # 4-6 GB and well under the 24 GB budget; the reference evaluators are several times
        # slower at this size, hence --reference none.

Prints the times, their ratio, the AP of each, and the peak memory of the process.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def make_data(n_images: int, n_classes: int, dets_per_image: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    # Long tail: class c appears with probability ~ 1/(c+1); image_count as a training set of
    # 20x the images would see it, which spreads classes over r/c/f.
    p = 1.0 / np.arange(1, n_classes + 1)
    p /= p.sum()
    train_counts = np.maximum(1, np.round(p * 20 * n_images * 3)).astype(int)
    cats = []
    for c in range(n_classes):
        n = int(train_counts[c])
        freq = "r" if n <= 10 else "c" if n <= 100 else "f"
        cats.append({"id": c + 1, "name": f"class{c + 1}", "frequency": freq, "image_count": n})
    images, anns, results = [], [], []
    W = H = 640
    for i in range(1, n_images + 1):
        k = int(rng.integers(1, 16))
        classes = rng.choice(n_classes, size=k, p=p) + 1
        pos = sorted(set(int(c) for c in classes))
        neg = [int(c) for c in rng.choice(n_classes, size=8, replace=False) + 1 if int(c) not in pos][:6]
        nel = [pos[0]] if rng.random() < 0.1 else []
        images.append({"id": i, "width": W, "height": H, "neg_category_ids": neg,
                       "not_exhaustive_category_ids": nel})
        wh = rng.uniform(8, 300, size=(k, 2))
        xy = rng.uniform(0, 1, size=(k, 2)) * (np.array([W, H]) - wh)
        for j in range(k):
            x, y = xy[j]
            w, h = wh[j]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(classes[j]),
                         "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h)})
            if rng.random() < 0.85 and len(results) < i * dets_per_image:
                jit = rng.normal(0, 0.1, 4) * np.array([w, h, w, h])
                results.append({"image_id": i, "category_id": int(classes[j]),
                                "bbox": [float(x + jit[0]), float(y + jit[1]),
                                         float(max(1.0, w + jit[2])), float(max(1.0, h + jit[3]))],
                                "score": float(rng.uniform(0.3, 1.0))})
        n_rand = max(0, i * dets_per_image - len(results))
        pools = np.concatenate([np.array(pos * 20), np.array(neg * 5, dtype=int),
                                rng.integers(1, n_classes + 1, size=40)])
        cls = rng.choice(pools, size=n_rand)
        wh = rng.uniform(4, 320, size=(n_rand, 2))
        xy = rng.uniform(0, 1, size=(n_rand, 2)) * (np.array([W, H]) - wh)
        sc = rng.uniform(0, 0.8, size=n_rand)
        for j in range(n_rand):
            results.append({"image_id": i, "category_id": int(cls[j]),
                            "bbox": [float(xy[j, 0]), float(xy[j, 1]), float(wh[j, 0]), float(wh[j, 1])],
                            "score": float(sc[j])})
    return {"images": images, "annotations": anns, "categories": cats}, results


def run_taildet(gt_path: Path, res_path: Path) -> tuple[float, float]:
    from taildet.evaluation import evaluate_lvis

    t = time.perf_counter()
    m = evaluate_lvis(gt_path, res_path, iou_type="bbox")
    return time.perf_counter() - t, m["AP"]


def run_lvis_api(gt_path: Path, res_path: Path) -> tuple[float, float]:
    np.float = float  # lvis 0.5.3 uses the removed alias
    from lvis import LVIS, LVISEval, LVISResults

    t = time.perf_counter()
    gt = LVIS(str(gt_path))
    ev = LVISEval(gt, LVISResults(gt, str(res_path)), "bbox")
    ev.run()
    return time.perf_counter() - t, float(ev.results["AP"])


def run_pycocotools(gt_path: Path, res_path: Path) -> tuple[float, float]:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        for a in gt.dataset["annotations"]:
            a.setdefault("iscrowd", 0)
        with open(res_path) as f:
            res = json.load(f)
        known = {im["id"]: set(im["neg_category_ids"]) for im in gt.dataset["images"]}
        for a in gt.dataset["annotations"]:
            known[a["image_id"]].add(a["category_id"])
        by_img = defaultdict(list)
        for r in res:
            by_img[r["image_id"]].append(r)
        kept = []
        for rs in by_img.values():
            rs = sorted(rs, key=lambda r: r["score"], reverse=True)[:300]
            kept += [r for r in rs if r["category_id"] in known[r["image_id"]]]
        ev = COCOeval(gt, gt.loadRes(kept), "bbox")
        ev.params.maxDets = [300]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]
    return time.perf_counter() - t, float(prec[prec > -1].mean())


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=400)
    ap.add_argument("--dets", type=int, default=300, help="detections per image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", choices=("auto", "lvis", "pycocotools", "none"), default="auto")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    gt, results = make_data(args.images, args.classes, args.dets, args.seed)
    print(f"data: {len(gt['images'])} images, {len(gt['categories'])} classes, "
          f"{len(gt['annotations'])} GT boxes, {len(results)} detections "
          f"({time.perf_counter() - t:.1f}s to generate)")
    with tempfile.TemporaryDirectory(prefix="taildet_bench_") as tmp:
        gt_path, res_path = Path(tmp) / "gt.json", Path(tmp) / "results.json"
        gt_path.write_text(json.dumps(gt))
        res_path.write_text(json.dumps(results))
        del gt, results

        t_ours, ap_ours = run_taildet(gt_path, res_path)
        print(f"taildet evaluate_lvis: {t_ours:7.2f}s  AP {100 * ap_ours:.2f}  "
              f"(peak RSS so far {peak_rss_gb():.2f} GB)")

        ref = args.reference
        if ref == "auto":
            try:
                np.float = float
                import lvis  # noqa: F401

                ref = "lvis"
            except Exception:
                ref = "pycocotools"
        if ref == "none":
            return 0
        runner = run_lvis_api if ref == "lvis" else run_pycocotools
        name = "official lvis-api" if ref == "lvis" else "pycocotools COCOeval (LVIS-like)"
        t_ref, ap_ref = runner(gt_path, res_path)
        print(f"{name}: {t_ref:7.2f}s  AP {100 * ap_ref:.2f}  (peak RSS {peak_rss_gb():.2f} GB)")
        print(f"speed-up: {t_ref / t_ours:.1f}x   AP difference: {100 * abs(ap_ref - ap_ours):.3f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
