"""Time and peak memory of the error analysis (``taildet errors``) at fractions of LVIS v1 val.

Runs ``lvis_scale.py``'s ``errors`` step (and its ``eval_bbox`` step, one evaluation, for
scale) on the LVIS-shaped files ``lvis_scale_data.py`` writes at each ``--fractions`` (val
19,809 images x fraction, 300 detections per image), each in its own process, and extrapolates
time and peak RSS to fraction 1 with a least-squares line through the measured fractions (both
grow linearly with the number of images: every step is per image or per class). Two result
files per fraction: the generated one, where most random-class detections are of classes the
federated protocol does not evaluate on their image (so they are not analysed), and the same
with each such detection moved to a class the image has (``write_all_evaluated``): every
detection analysed, the most work per detection a 300-per-image submission can ask. Usage::

    python benchmarks/errors_scale.py --fractions 0.01 0.02 0.05 0.1 --json ../docs/results/bench_errors_scale.json

The full-size run is ``lvis_scale.py --steps errors`` (about 3 GB of generated JSON).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lvis_scale  # noqa: E402  (the LVIS-size benchmark beside this file)

GB = lvis_scale.GB
VAL_IMAGES = 19_809


def extrapolate(fractions, values, at: float = 1.0) -> float:
    """The least-squares line through (fraction, value), evaluated at ``at``."""
    return float(np.polyval(np.polyfit(np.asarray(fractions, float), np.asarray(values, float), 1), at))


def write_all_evaluated(val: Path, results: Path, out: Path, seed: int = 0) -> Path:
    """``results`` with every detection of a class the federated protocol does not evaluate on its
    image given one it does (random among the image's annotated and negative classes; images with
    neither keep theirs): every detection is then analysed, the most work per detection."""
    gt = json.loads(val.read_text())
    known = sorted({(a["image_id"], a["category_id"]) for a in gt["annotations"]}
                   | {(im["id"], c) for im in gt["images"] for c in im.get("neg_category_ids", [])})
    k_img = np.array([i for i, _ in known], dtype=np.int64)
    k_cat = np.array([c for _, c in known], dtype=np.int64)
    dets = json.loads(results.read_text())
    img = np.array([d["image_id"] for d in dets], dtype=np.int64)
    cat = np.array([d["category_id"] for d in dets], dtype=np.int64)
    key, k_key = img * (1 << 31) + cat, k_img * (1 << 31) + k_cat
    at = np.minimum(np.searchsorted(k_key, key), max(len(k_key) - 1, 0))
    unknown = k_key[at] != key
    lo, hi = np.searchsorted(k_img, img, "left"), np.searchsorted(k_img, img, "right")
    move = np.flatnonzero(unknown & (hi > lo))
    pick = lo[move] + (np.random.default_rng(seed).uniform(size=len(move)) * (hi - lo)[move]).astype(np.int64)
    for i, c in zip(move.tolist(), k_cat[pick].tolist()):
        dets[i]["category_id"] = c
    out.write_text(json.dumps(dets))
    return out


def _measure(data: Path, val: Path, results: Path, py: str, tag: str) -> dict:
    """Wall time and peak RSS of eval_bbox and errors on ``results`` (each its own process)."""
    cmds = lvis_scale.commands({"val": val, "results": results, "train": val}, py, [py, "-m", "taildet"])
    r = {s: lvis_scale.run_step(cmds[s], data / f"{s}{tag}.log") for s in ("eval_bbox", "errors")}
    for s, x in r.items():
        if x["rc"] != 0:
            raise SystemExit(f"{s} on {results} FAILED (exit {x['rc']}); see {x['log']}")
    found = re.search(r"(\d+) detections analysed", r["errors"]["stdout"])
    r["analysed"] = int(found.group(1)) if found else None
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1],
                   help="of LVIS v1's numbers of images and annotations (at least two, each in (0, 1])")
    p.add_argument("--segm", action="store_true",
                   help="use (or generate) the files with RLE results too (shares lvis_scale.py --segm's folders)")
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "taildet_lvis_scale"),
                   help="folder of the generated files (lvis_scale.py's)")
    p.add_argument("--points", type=int, default=50, help="points per polygon of the generated train file")
    p.add_argument("--json", metavar="PATH", default=None, help="write the table as a measured-tables summary")
    args = p.parse_args(argv)
    if len(args.fractions) < 2 or not all(0 < f <= 1 for f in args.fractions):
        p.error(f"--fractions needs at least two values in (0, 1], got {args.fractions}")
    py = sys.executable
    rows = []
    for variant in ("as generated", "all evaluated"):
        mine = []
        for f in sorted(args.fractions):
            data, paths = lvis_scale.prepare(args.data, f, args.points, 300, args.segm)
            results = paths["results"]
            if variant == "all evaluated":
                results = data / "results_all_evaluated.json"
                if not results.exists():
                    write_all_evaluated(paths["val"], paths["results"], results)
            r = _measure(data, paths["val"], results, py, "" if variant == "as generated" else "_all")
            mine.append([f"{f:g}", variant, round(VAL_IMAGES * f), r["analysed"], round(r["eval_bbox"]["wall_s"], 1),
                         round(r["eval_bbox"]["peak_rss"] / GB, 2), round(r["errors"]["wall_s"], 1),
                         round(r["errors"]["peak_rss"] / GB, 2)])
            print(f"fraction {f:g}, {variant}: {r['analysed']} detections analysed; eval_bbox "
                  f"{r['eval_bbox']['wall_s']:.1f} s; errors {r['errors']['wall_s']:.1f} s, "
                  f"peak RSS {r['errors']['peak_rss'] / GB:.2f} GB", flush=True)
        x = [float(r[0]) for r in mine]
        fit = [extrapolate(x, [r[k] for r in mine]) for k in (4, 5, 6, 7)]
        mine.append(["1 (extrapolated)", variant, VAL_IMAGES, None, round(fit[0], 1), round(fit[1], 2),
                     round(fit[2], 1), round(fit[3], 2)])
        print(f"extrapolated to fraction 1, {variant}: eval_bbox {fit[0]:.0f} s, {fit[1]:.2f} GB; "
              f"errors {fit[2]:.0f} s, peak RSS {fit[3]:.2f} GB")
        rows += mine
    if args.json:
        sys.path.insert(0, str(HERE.parent / "src"))
        from taildet.results_docs import write_table_summary  # the docs' table format

        command = "python benchmarks/errors_scale.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        table = {"columns": ["fraction", "results", "val images", "detections analysed", "eval_bbox s",
                             "eval_bbox peak RSS GB", "errors s", "errors peak RSS GB"],
                 "formats": ["s", "s", "d", "d", ".1f", ".2f", ".1f", ".2f"], "rows": rows}
        print("wrote", write_table_summary(args.json, "Error analysis at fractions of LVIS v1 val",
                                           {"errors": table}, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
