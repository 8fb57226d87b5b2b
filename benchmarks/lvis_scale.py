"""Memory and time of taildet's data and evaluation steps at LVIS v1 size, on one machine.

Generates LVIS-v1-shaped files at ``--fraction`` of the real sizes (``lvis_scale_data.py``:
train 100,170 images / 1.27 M annotations with ``--points``-point polygons, val 19,809 images,
300 detections per val image), then runs each step in its own process and records its wall
time and peak RSS (``os.wait4``: the child's own maximum resident set):

============  ==========================================================  =====================
step          what runs                                                   goal at full size
============  ==========================================================  =====================
eval_bbox     ``taildet eval-results val.json results.json``              <= 6 GB, <= 120 s
eval_fixed    the same with ``--fixed`` (AP-fixed)                        <= 6 GB, <= 120 s
eval_segm     ``--iou-type segm`` on RLE results (``--segm``)             <= 10 GB
load_lvis     ``taildet.data.load_lvis(train.json)``                      <= 6 GB, <= 90 s
workers       a full epoch of targets through a DataLoader (2 workers);  <= 200 MB private
              each worker's private memory (USS) at the end of the epoch  per worker
data_stats    ``taildet data stats train.json``                           <= 60 s
errors        ``taildet errors val.json results.json`` (error analysis:   <= 6 GB, <= 300 s
              TIDE types, 6 oracle fixes, confusion pairs)
lvis_api      the official lvis-api on eval_bbox's inputs, when installed  (reference)
============  ==========================================================  =====================

Goals apply at ``--fraction 1`` (the default). Usage::

    python benchmarks/lvis_scale.py                          # full size: ~3 GB of JSON in --data
    python benchmarks/lvis_scale.py --fraction 0.05 --steps eval_bbox load_lvis workers
    python benchmarks/lvis_scale.py --segm --json ../docs/results/bench_lvis_scale.json

The files are generated once per (fraction, points, dets, segm) into ``--data`` (default
``/tmp/taildet_lvis_scale``) and reused. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lvis_scale_data  # noqa: E402  (the generator beside this file)

GB = 1024 ** 3
# step -> (peak RSS goal in bytes or None, wall time goal in s or None); at fraction 1.
GOALS = {"eval_bbox": (6 * GB, 120.0), "eval_fixed": (6 * GB, 120.0), "eval_segm": (10 * GB, None),
         "load_lvis": (6 * GB, 90.0), "workers": (None, None), "data_stats": (None, 60.0),
         "lvis_api": (None, None), "errors": (6 * GB, 300.0)}
WORKER_GOAL = 200 * 1024 ** 2

_WORKERS = r"""
import json, sys, time
import torch
from taildet.data.lvis import load_lvis

class Targets(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds
    def __len__(self):
        return len(self.ds)
    def __getitem__(self, i):
        return self.ds.get_target(i)

def uss(pid):
    out = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                out += int(line.split()[1]) * 1024
    return out

ds = load_lvis(sys.argv[1])
loader = torch.utils.data.DataLoader(Targets(ds), batch_size=16, num_workers=2, shuffle=True,
                                     collate_fn=list, persistent_workers=True, prefetch_factor=2)
it = iter(loader)
first = next(it)
pids = [w.pid for w in it._workers]
start = [uss(p) for p in pids]
n = len(first)
for batch in it:
    n += len(batch)
end = [uss(p) for p in pids]
print(json.dumps({"images": n, "worker_uss_start": start, "worker_uss_end": end}))
"""

_LVIS_API = r"""
import sys
import numpy as np
if not hasattr(np, "float"):
    np.float = float  # lvis 0.5.3 uses np.float, which numpy 2 removed
from lvis import LVIS, LVISEval, LVISResults
gt = LVIS(sys.argv[1])
ev = LVISEval(gt, LVISResults(gt, sys.argv[2]), "bbox")
ev.run()
ev.print_results()
"""


def _rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_step(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; wall time, peak RSS of the process (kernel's ru_maxrss), exit code, stdout."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - t0, "peak_rss": usage.ru_maxrss * 1024, "rc": p.returncode,
            "stdout": out, "cmd": " ".join(shlex.quote(c) for c in cmd), "log": str(log)}


def commands(paths: dict, py: str, taildet: list[str]) -> dict[str, list[str]]:
    cmds = {
        "eval_bbox": taildet + ["eval-results", str(paths["val"]), str(paths["results"])],
        "eval_fixed": taildet + ["eval-results", str(paths["val"]), str(paths["results"]), "--fixed"],
        "load_lvis": [py, "-c", "import sys; from taildet.data.lvis import load_lvis; "
                      "ds = load_lvis(sys.argv[1]); print(ds)", str(paths["train"])],
        "workers": [py, "-c", _WORKERS, str(paths["train"])],
        "data_stats": taildet + ["data", "stats", str(paths["train"]), "--out",
                                 str(Path(tempfile.gettempdir()) / "taildet_lvis_scale_stats.png")],
        "lvis_api": [py, "-c", _LVIS_API, str(paths["val"]), str(paths["results"])],
        "errors": taildet + ["errors", str(paths["val"]), str(paths["results"]), "--out",
                             str(Path(tempfile.gettempdir()) / "taildet_lvis_scale_errors")],
    }
    if "results_segm" in paths:
        cmds["eval_segm"] = taildet + ["eval-results", str(paths["val"]), str(paths["results_segm"]),
                                       "--iou-type", "segm"]
    return cmds


def _have_lvis_api(py: str) -> bool:
    return subprocess.run([py, "-c", "import lvis"], capture_output=True).returncode == 0


def prepare(root: str, fraction: float, points: int, dets: int, segm: bool) -> tuple[Path, dict[str, Path]]:
    """The generated files at ``fraction`` under ``root`` (written on first use): their folder and paths."""
    data = Path(root) / f"f{fraction:g}_p{points}_d{dets}{'_segm' if segm else ''}"
    done = data / "done.json"
    if not done.exists():
        t0 = time.perf_counter()
        paths = lvis_scale_data.write_lvis_pair(data, fraction, points, dets, segm)
        done.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
        print(f"generated in {time.perf_counter() - t0:.0f} s")
    paths = {k: Path(v) for k, v in json.loads(done.read_text()).items()}
    for k, v in paths.items():
        print(f"  {k}: {v} ({v.stat().st_size / 1e6:.0f} MB)")
    return data, paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fraction", type=float, default=1.0, help="of LVIS v1's numbers of images and annotations")
    p.add_argument("--points", type=int, default=50, help="points per polygon (real LVIS train: about 1.1 GB JSON)")
    p.add_argument("--dets", type=int, default=300, help="detections per val image")
    p.add_argument("--segm", action="store_true", help="also write RLE results and run eval_segm")
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "taildet_lvis_scale"))
    p.add_argument("--steps", nargs="+", default=None, choices=sorted(GOALS),
                   help="default: every step (lvis_api only when the lvis package imports)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the table as a measured-tables summary")
    args = p.parse_args(argv)
    if not 0 < args.fraction <= 1:
        p.error(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.points < 3 or args.dets < 1:
        p.error(f"--points must be >= 3 and --dets >= 1, got {args.points} and {args.dets}")

    data, paths = prepare(args.data, args.fraction, args.points, args.dets, args.segm)

    py = sys.executable
    taildet = [py, "-m", "taildet"]
    cmds = commands(paths, py, taildet)
    steps = args.steps or [s for s in GOALS if s in cmds and (s != "lvis_api" or _have_lvis_api(py))]
    rows = []
    full = args.fraction >= 1.0
    for step in steps:
        if step not in cmds:
            p.error(f"step {step} needs --segm")
        shown = cmds[step][2:] if cmds[step][1] == "-m" else ["python -c <script>", cmds[step][-1]]
        print(f"== {step}: {' '.join(shown)}", flush=True)
        r = run_step(cmds[step], data / f"{step}.log")
        if r["rc"] != 0:
            print(f"   FAILED (exit {r['rc']}); see {r['log']}")
        rss_goal, time_goal = GOALS[step]
        note = ""
        ok = r["rc"] == 0
        if step == "workers" and r["rc"] == 0:
            w = json.loads(r["stdout"].strip().splitlines()[-1])
            worst = max(w["worker_uss_end"])
            note = (f"worker private memory {max(w['worker_uss_start']) / 2**20:.0f} MB after the first batch, "
                    f"{worst / 2**20:.0f} MB after the epoch ({w['images']} images)")
            ok = ok and (not full or worst <= WORKER_GOAL)
            r["worker_uss_mb"] = worst / 2 ** 20
        if full:
            ok = ok and (rss_goal is None or r["peak_rss"] <= rss_goal) and (time_goal is None or r["wall_s"] <= time_goal)
        goal = " / ".join(g for g in ((f"<= {rss_goal / GB:.0f} GB" if rss_goal else ""),
                                      (f"<= {time_goal:.0f} s" if time_goal else ""),
                                      ("<= 200 MB per worker" if step == "workers" else "")) if g) or "reference"
        print(f"   {r['wall_s']:.1f} s, peak RSS {r['peak_rss'] / GB:.2f} GB  {note}", flush=True)
        rows.append([step, round(r["wall_s"], 1), round(r["peak_rss"] / GB, 2),
                     round(r["worker_uss_mb"]) if "worker_uss_mb" in r else None, goal if full else "(fraction < 1)",
                     ("yes" if ok else "NO") if full else "-"])

    print(f"\n{'step':<12}{'wall s':>9}{'peak GB':>9}{'worker MB':>11}  goal (full size)  met")
    for s, t, m, w, g, ok in rows:
        print(f"{s:<12}{t:>9.1f}{m:>9.2f}{'' if w is None else w:>11}  {g:<17} {ok}")
    if args.json:
        sys.path.insert(0, str(HERE.parent / "src"))
        from taildet.results_docs import write_table_summary  # the docs' table format
        command = "python benchmarks/lvis_scale.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        table = {"columns": ["step", "wall s", "peak RSS GB", "worker private MB", "goal", "met"],
                 "formats": ["s", ".1f", ".2f", "d", "s", "s"], "rows": rows}
        sizes = {"columns": ["file", "MB"], "formats": ["s", ".0f"],
                 "rows": [[k, v.stat().st_size / 1e6] for k, v in paths.items()]}
        print("wrote", write_table_summary(args.json, f"LVIS v1 at fraction {args.fraction:g} on one machine",
                                           {"steps": table, "files": sizes}, command))
    return 0 if all(r[-1] != "NO" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
