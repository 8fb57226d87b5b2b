"""``taildet classify demo`` / ``make demo-classify``: CE vs Balanced Softmax vs CE + LogN vs cRT
(and CE + logit adjustment, CE + tau-normalisation) on a long-tailed split, over seeds.

Data: scikit-learn's digits (default; 8 x 8 px, 10 classes) or the generator's object crops
(``synthetic``: 48 classes, 32 px), split at imbalance 100 (:func:`taildet.classify.splits.make_split`,
split seed 0, 40 test and 20 val images per class). Per training seed: ResNet-32 with CE (stage 1;
its raw logits, LogN -- statistics of the training split as sampled, class-balanced, and of the val split
(:mod:`taildet.classify.logn_stats`) --, logit adjustment and tau-normalisation are evaluated from the
one run), ResNet-32
with Balanced Softmax, and cRT (the CE run's features frozen, the classifier retrained with
class-balanced sampling). The recipe is fixed (:data:`RECIPE`), not tuned per method.

Outputs in ``out``: each run's directory, ``runs.json`` (every metric of every seed),
``summary.json`` (the table as a measured-tables file, :func:`taildet.results_docs.write_table_summary`,
with the date, machine and command), ``table.md`` and ``per_class_accuracy.png`` (mean per-class
accuracy over seeds vs training count, 95 % t-interval bands). Statistics:
:func:`taildet.evidence.seed_statistics` (mean and 95 % t-interval over seeds) and
:func:`taildet.evidence.paired_difference` (each method minus CE, seeds paired).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from taildet.classify.config import classify_config_from_dict
from taildet.classify.engine import evaluate_classifier, train_classifier
from taildet.classify.report import format_table, plot_per_class
from taildet.classify.splits import make_split, read_manifest
from taildet.engine.pretrain import _threads
from taildet.errors import ConfigError
from taildet.evidence import paired_difference, seed_statistics
from taildet.fileio import atomic_write_text, check_output_path
from taildet.results_docs import write_table_summary

__all__ = ["RECIPE", "DEMO_METHODS", "run_demo", "summarise"]

#: The fixed training recipe of every demo run (stage 1) and of cRT's classifier re-training.
RECIPE = {"epochs": 60, "lr": 0.05, "batch_size": 32, "crt_epochs": 10, "crt_lr": 0.05}

#: Table rows: name -> (run, method of that run's metrics.json).
DEMO_METHODS = {
    "CE": ("ce", "raw"),
    "Balanced Softmax": ("balanced_softmax", "raw"),
    "CE + LogN": ("ce", "logn"),
    "CE + LogN (class-balanced statistics)": ("ce", "logn_balanced"),
    "CE + LogN (val statistics)": ("ce", "logn_val"),
    "cRT": ("crt", "raw"),
    "CE + logit adjustment": ("ce", "logit_adjust"),
    "CE + tau-norm": ("ce", "tau_norm"),
}
_KEYS = ("top1", "many", "medium", "few", "mean_class_acc")


def _config(manifest: str, out: str, seed: int, loss: str, epochs: int, crt_from: str | None = None):
    crt = crt_from is not None
    raw = {"data": {"manifest": manifest, "batch_size": RECIPE["batch_size"],
                    "sampler": "class_balanced" if crt else "random"},
           "model": {"arch": "resnet32", "loss": loss, **({"stage": "crt", "init_from": crt_from} if crt else {})},
           "train": {"epochs": RECIPE["crt_epochs"] if crt else epochs, "lr": RECIPE["crt_lr"] if crt else RECIPE["lr"],
                     "warmup_iters": 20, "schedule": "cosine", "weight_decay": 5e-4, "seed": seed, "device": "cpu",
                     "log_period": 10},
           "eval": {"posthoc": [] if crt or loss != "softmax_ce" else ["logn", "logit_adjust", "tau_norm", "logn_balanced",
                                                                         "logn_val"]},
           "output_dir": out}
    return classify_config_from_dict(raw)


def _run(cfg, progress: bool) -> dict:
    """Train and evaluate ``cfg``, reusing its run directory when that holds a run of the same
    config: its metrics (finished), its final checkpoint (evaluated again) or its last checkpoint
    (resumed). A finished run whose config differs only in ``eval`` is evaluated again with the new
    ``eval`` (its ``config.yaml`` then records it). A run of another config there is set aside
    (:func:`prepare_run_dir`) and redone."""
    final = os.path.join(cfg.output_dir, "model_final.pth")
    metrics = os.path.join(cfg.output_dir, "metrics.json")
    saved = os.path.join(cfg.output_dir, "config.yaml")
    same = same_training = False
    if os.path.isfile(saved):
        with open(saved, encoding="utf-8") as fh:
            old = yaml.safe_load(fh)
        new = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        same = old == new
        same_training = isinstance(old, dict) and {k: v for k, v in old.items() if k != "eval"} == \
            {k: v for k, v in new.items() if k != "eval"}
    if same and os.path.isfile(final):
        if os.path.isfile(metrics):
            with open(metrics, encoding="utf-8") as mf:
                return {"checkpoint": final, "metrics": json.load(mf)}
        return {"checkpoint": final, "metrics": evaluate_classifier(cfg, final)}
    if same_training and os.path.isfile(final):
        out = {"checkpoint": final, "metrics": evaluate_classifier(cfg, final)}
        cfg.save(saved)
        return out
    return train_classifier(cfg, resume=same, progress=progress)


def summarise(runs: dict[int, dict[str, dict]], train_counts: list[int]) -> dict[str, Any]:
    """Per method: mean / 95 % interval of each metric over seeds, the paired difference to CE and
    the mean per-class accuracy. ``runs[seed][run]`` is a run's ``metrics.json``."""
    def values(name: str, key: str) -> dict[str, float]:
        run, method = DEMO_METHODS[name]
        return {f"seed{s}": r[run]["methods"][method][key] for s, r in sorted(runs.items())}

    out: dict[str, Any] = {}
    for name in DEMO_METHODS:
        row = {k: seed_statistics(list(values(name, k).values())) for k in _KEYS}
        row["few_minus_ce"] = paired_difference(values(name, "few"), values("CE", "few"))
        row["mean_class_acc_minus_ce"] = paired_difference(values(name, "mean_class_acc"),
                                                           values("CE", "mean_class_acc"))
        run, method = DEMO_METHODS[name]
        pc = np.array([r[run]["methods"][method]["per_class"] for r in runs.values()], dtype=np.float64)
        stats = [seed_statistics(list(pc[:, c])) for c in range(pc.shape[1])]
        row["per_class_mean"] = [s["mean"] for s in stats]
        row["per_class_half"] = [0.0 if s["ci95"] is None else (s["ci95"][1] - s["ci95"][0]) / 2 for s in stats]
        out[name] = row
    return {"methods": out, "train_counts": list(train_counts), "seeds": sorted(runs)}


def _fmt(stat: dict, signed: bool = False) -> str:
    if stat.get("mean") is None:
        return "-"
    m = f"{stat['mean']:+.1f}" if signed else f"{stat['mean']:.1f}"
    if stat.get("ci95") is None:
        return m
    lo, hi = stat["ci95"]
    return f"{m} [{lo:+.1f}, {hi:+.1f}]" if signed else f"{m} ± {(hi - lo) / 2:.1f}"


def table_rows(summary: dict) -> list[list[str]]:
    rows = []
    for name, r in summary["methods"].items():
        paired = "-" if name == "CE" else _fmt(r["few_minus_ce"], signed=True)
        paired_m = "-" if name == "CE" else _fmt(r["mean_class_acc_minus_ce"], signed=True)
        rows.append([name] + [_fmt(r[k]) for k in _KEYS] + [paired, paired_m])
    return rows


COLUMNS = ["method", "top-1", "many", "medium", "few", "mean per-class", "few - CE (95% CI)",
           "mean per-class - CE (95% CI)"]


def run_demo(out: str | os.PathLike = "runs/demo_classify", *, data: str = "digits", seeds=(0, 1, 2),
             epochs: int | None = None, summary: str | None = None, figure: str | None = None,
             progress: bool = True, threads: int | None = 1) -> dict[str, Any]:
    """Run (or reuse) every run of the demo and write its table, figure and summaries (``summary``,
    ``figure``: extra copies, e.g. under docs/). ``threads``: torch threads of the trainings (one by
    default: the networks are tiny, more threads only contend on a shared machine, and the
    committed table was made with one)."""
    if data not in ("digits", "synthetic"):
        raise ConfigError(f"--data: expected digits or synthetic, got {data!r}")
    out = Path(out)
    check_output_path(out, directory=True, what="demo")
    for extra, what in ((summary, "summary"), (figure, "figure")):
        if extra is not None:
            check_output_path(extra, what=what)
    epochs = int(epochs or RECIPE["epochs"])
    manifest = out / f"{data}_lt100" / "manifest.json"
    if not manifest.is_file():
        make_split(data, manifest.parent, 100.0, seed=0, test_per_class=40, val_per_class=20,
                   per_class=180 if data == "synthetic" else None)
    counts = read_manifest(manifest)["protocol"]["train_counts"]
    runs: dict[int, dict[str, dict]] = {}
    with _threads(threads):
        for seed in seeds:
            base = out / f"seed{seed}"
            ce = _run(_config(str(manifest), str(base / "ce"), seed, "softmax_ce", epochs), progress)
            bs = _run(_config(str(manifest), str(base / "balanced_softmax"), seed, "balanced_softmax", epochs),
                      progress)
            crt = _run(_config(str(manifest), str(base / "crt"), seed, "softmax_ce", epochs, ce["checkpoint"]),
                       progress)
            runs[seed] = {"ce": ce["metrics"], "balanced_softmax": bs["metrics"], "crt": crt["metrics"]}
    summ = summarise(runs, counts)
    atomic_write_text(json.dumps({"recipe": {**RECIPE, "epochs": epochs}, "data": data, "runs": runs,
                                  "summary": summ}, indent=1) + "\n", out / "runs.json")
    table = {"columns": COLUMNS, "formats": ["s"] * len(COLUMNS), "rows": table_rows(summ)}
    command = "taildet classify demo " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["classify", "demo"] else \
        f"taildet classify demo --data {data} --seeds {' '.join(map(str, seeds))}"
    caption = (f"{data} at imbalance 100, ResNet-32, {len(list(seeds))} seeds: accuracy (%) on the balanced test "
             "split, mean ± 95% t-interval half-width over seeds")
    write_table_summary(out / "summary.json", caption, {data: table}, command)
    if summary is not None:
        write_table_summary(summary, caption, {data: table}, command)
    md = format_table({n: {k: (r[k]["mean"], _half(r[k])) for k in _KEYS} for n, r in summ["methods"].items()})
    atomic_write_text(md + "\n", out / "table.md")
    shown = {n: r["per_class_mean"] for n, r in summ["methods"].items()
             if n in ("CE", "Balanced Softmax", "CE + LogN", "cRT")}
    title = f"{data}, imbalance 100: mean of {len(list(seeds))} seeds (bands: 95% t-interval)"
    halves = {n: r["per_class_half"] for n, r in summ["methods"].items()}
    png = plot_per_class(shown, counts, out / "per_class_accuracy.png", title=title, errors=halves)
    if figure is not None:
        plot_per_class(shown, counts, figure, title=title, errors=halves)
    return {"table": md, "summary": str(out / "summary.json"), "png": png, "runs": str(out / "runs.json")}


def _half(stat: dict) -> float:
    return float("nan") if stat.get("ci95") is None else (stat["ci95"][1] - stat["ci95"][0]) / 2
