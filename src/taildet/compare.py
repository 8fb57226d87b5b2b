"""``taildet demo`` and ``taildet compare``: recipes on the embedded long-tail dataset, one table.

A *recipe* is a named YAML config in ``configs/`` (or any YAML path). Every recipe trains on the
embedded dataset (``taildet.data.synthetic``), is evaluated with LVIS federated AP, and ends up as
one row of a comparison table. The run directory holds, per recipe, the training run (metrics,
checkpoints, results JSON) and, for the whole comparison:

* ``summary.json`` — ``{recipe: {"AP", "APr", "APc", "APf", "AP50", ...}}``, AP values in percent;
* ``report.md`` — the table, the data set's long-tail statistics and links to the plots;
* ``per_class_ap_<recipe>.png`` — per-class AP against training image count, coloured by group;
* ``long_tail.png`` — the training set's class histogram.

The recipe ``prior`` needs no training: it scores the validation ground-truth boxes with class
scores drawn from the training-set class prior. It exercises the whole data -> results JSON ->
LVIS metrics path and shows what a classifier that knows only the label distribution scores.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Iterable

import numpy as np

#: Recipe name -> config file (relative to the repository's ``configs/``). One plain dict.
RECIPES: dict[str, str | None] = {
    "prior": None,
    "faster_ce": "demo_faster_tiny_ce.yaml",
    "faster_ce_rfs": "demo_faster_tiny_ce_rfs.yaml",
}

#: What ``taildet demo`` runs: the two-stage CE baseline and the same with repeat factor sampling.
DEMO_RECIPES = ("prior",)

SUMMARY_KEYS = ("AP", "APr", "APc", "APf", "AP50", "AP75", "APs", "APm", "APl", "AR@300")


def configs_dir() -> Path:
    """The repository's ``configs/`` directory (taildet runs from a source checkout)."""
    return Path(__file__).resolve().parents[2] / "configs"


def resolve_recipe(name: str) -> Path | None:
    """Config path of a recipe name or YAML path (``None`` for the no-training ``prior``)."""
    from taildet.errors import ConfigError

    if name in RECIPES:
        rel = RECIPES[name]
        return None if rel is None else configs_dir() / rel
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    raise ConfigError(
        f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)} or an existing YAML file"
    )


def prior_baseline_results(train_json: str | Path, val_json: str | Path, seed: int = 0,
                           per_box: int = 20) -> list[dict]:
    """Detections that know the boxes but only the class prior.

    Every validation GT box is reported ``per_box`` times, with classes drawn from the training
    image-count prior (without replacement) and score ``prior_c * u``, ``u ~ U(0, 1)``. Head
    classes therefore get confident, frequent guesses and tail classes rare, weak ones.
    """
    with open(train_json) as fh:
        train = json.load(fh)
    with open(val_json) as fh:
        val = json.load(fh)
    cat_ids = np.array(sorted(c["id"] for c in train["categories"]))
    index = {c: i for i, c in enumerate(cat_ids.tolist())}
    counts = np.zeros(len(cat_ids))
    seen: set[tuple[int, int]] = set()
    for a in train["annotations"]:
        key = (a["image_id"], a["category_id"])
        if key not in seen:
            seen.add(key)
            counts[index[a["category_id"]]] += 1
    prior = (counts + 1e-3) / (counts + 1e-3).sum()
    rng = np.random.default_rng(seed)
    k = min(per_box, len(cat_ids))
    results = []
    for a in sorted(val["annotations"], key=lambda a: a["id"]):
        classes = rng.choice(len(cat_ids), size=k, replace=False, p=prior)
        u = rng.uniform(size=k)
        for c, s in zip(classes.tolist(), u.tolist()):
            results.append({"image_id": a["image_id"], "category_id": int(cat_ids[c]),
                            "bbox": [float(v) for v in a["bbox"]], "score": float(prior[c] * s)})
    return results


def _percent(metrics: dict) -> dict:
    out = {}
    for k in SUMMARY_KEYS:
        v = metrics.get(k)
        if v is None:
            continue
        v = float(v)
        out[k] = None if math.isnan(v) else round(100.0 * v, 2)
    return out


def _train_counts(train_json: Path) -> dict[int, int]:
    from taildet.data.stats import dataset_stats

    return {c["id"]: c["image_count"] for c in dataset_stats(train_json)["classes"]}


def default_jobs() -> int:
    """One training job per CPU core (``len(os.sched_getaffinity(0))`` where available)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _train_one(name: str, cfg_path: str, opts: list[str], threads: int) -> tuple[str, dict, float]:
    """Train one recipe (runs in a worker process); returns (name, bbox metrics, seconds)."""
    import torch

    from taildet.config import apply_overrides, load_config
    from taildet.engine import train

    if threads > 0:
        torch.set_num_threads(threads)
    t0 = time.time()
    cfg = apply_overrides(load_config(cfg_path), opts)
    metrics = train(cfg, resume=False, progress=False)["metrics"]
    if isinstance(metrics.get("bbox"), dict):
        metrics = metrics["bbox"]
    return name, metrics, time.time() - t0


def _last_iteration(metrics_jsonl: Path) -> int:
    try:
        with open(metrics_jsonl, "rb") as fh:
            lines = fh.read().splitlines()
        return int(json.loads(lines[-1])["iteration"]) if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def _train_recipes(runs: list[tuple[str, Path, list[str]]], jobs: int,
                   progress: bool) -> dict[str, tuple[dict, float]]:
    """Train ``runs`` ([(name, config, overrides)]) with ``jobs`` processes at once.

    With one job the training runs in this process with its own progress bar; with several, one
    bar follows the iterations of all of them (read from each run's ``metrics.jsonl``).
    """
    out: dict[str, tuple[dict, float]] = {}
    if not runs:
        return out
    if jobs <= 1:
        for name, cfg_path, opts in runs:
            print(f"\n=== recipe {name} ===")
            from taildet.config import apply_overrides, load_config
            from taildet.engine import train

            t0 = time.time()
            cfg = apply_overrides(load_config(cfg_path), opts)
            metrics = train(cfg, resume=False, progress=progress)["metrics"]
            if isinstance(metrics.get("bbox"), dict):
                metrics = metrics["bbox"]
            out[name] = (metrics, time.time() - t0)
        return out

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm import tqdm

    from taildet.config import apply_overrides, load_config

    threads = max(1, default_jobs() // jobs)
    totals, logs = {}, {}
    for name, cfg_path, opts in runs:
        cfg = apply_overrides(load_config(cfg_path), opts)
        totals[name] = int(cfg.train.iterations or 0)
        logs[name] = Path(cfg.output_dir) / "metrics.jsonl"
        if logs[name].exists():
            logs[name].unlink()  # a fresh run: do not read an old run's progress
    bar = tqdm(total=sum(totals.values()) or None, desc=f"training {len(runs)} recipes", unit="it",
               disable=not progress)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        pending = {pool.submit(_train_one, n, str(c), o, threads) for n, c, o in runs}
        while pending:
            done, pending = wait(pending, timeout=2.0, return_when=FIRST_COMPLETED)
            for fut in done:
                name, metrics, seconds = fut.result()
                out[name] = (metrics, seconds)
                print(f"recipe {name}: AP {100 * metrics.get('AP', float('nan')):.1f} "
                      f"({seconds:.0f} s)", flush=True)
            if progress:
                now = sum(totals[n] if n in out else min(_last_iteration(logs[n]), totals[n]) for n in totals)
                bar.update(max(0, now - bar.n))
    bar.close()
    return out


def run_compare(recipes: Iterable[str] | None, out_dir: str | Path, seed: int = 0,
                extra_opts: list[str] | None = None, progress: bool = True,
                title: str = "taildet compare", scale: float = 1.0, jobs: int | None = None) -> dict:
    """Run ``recipes`` on the embedded dataset and write ``summary.json`` + ``report.md``.

    ``jobs`` trainings run at once, each in its own process with ``torch`` limited to
    ``cpu_count // jobs`` threads (default: one job per core, at most one per recipe). On a
    2-core machine two single-threaded trainings finish sooner than two 2-threaded ones in a row:
    the small detector gains little from a second thread.
    Returns the summary ``{recipe: {metric: percent}}``.
    """
    from taildet.data.stats import dataset_stats, format_stats, plot_long_tail
    from taildet.data.synthetic import make_dataset
    from taildet.evaluation import evaluate_lvis, format_metrics_table, save_metrics
    from taildet.evaluation.report import per_class_table, plot_per_class_ap

    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(recipes) if recipes else list(RECIPES)
    paths = {n: resolve_recipe(n) for n in names}  # fail fast on a bad name

    data_root = out.parent / "data" / f"synthetic_seed{seed}_scale{scale:g}"
    info = make_dataset(data_root, seed=seed, scale=scale, progress=progress)
    train_json, val_json = Path(info["train_json"]), Path(info["val_json"])
    stats = dataset_stats(train_json)
    stats_text = format_stats(stats)
    print(stats_text)
    long_tail_png = plot_long_tail(stats, out / "long_tail.png")
    print(f"long-tail histogram: {long_tail_png}")
    counts = _train_counts(train_json)

    common_opts = [f"data.root={data_root}", f"data.synthetic.seed={seed}",
                   f"data.synthetic.scale={scale}", f"train.seed={seed}"] + list(extra_opts or [])
    trained = [n for n in names if paths[n] is not None]
    jobs = max(1, min(int(jobs or default_jobs()), len(trained) or 1))
    print(f"\nrecipes: {', '.join(names)} ({jobs} parallel training job{'s' if jobs > 1 else ''})")
    trained_metrics = _train_recipes([(n, paths[n], common_opts + [f"output_dir={out / n}"]) for n in trained],
                                     jobs=jobs, progress=progress)
    all_metrics: dict[str, dict] = {}
    summary: dict[str, dict] = {}
    for name in names:
        if paths[name] is None:
            t0 = time.time()
            results = prior_baseline_results(train_json, val_json, seed=seed)
            metrics = evaluate_lvis(val_json, results)
            save_metrics(metrics, out / name / "metrics.json")
            seconds = time.time() - t0
        else:
            metrics, seconds = trained_metrics[name]
        all_metrics[name] = metrics
        summary[name] = _percent(metrics)
        summary[name]["seconds"] = round(seconds, 1)
        rows = per_class_table(metrics, val_json)
        plot_per_class_ap(rows, out / f"per_class_ap_{name}.png", image_counts=counts)

    table = format_metrics_table(all_metrics)
    print("\n" + table)
    with open(out / "summary.json", "w") as fh:
        json.dump(summary, fh, indent=2)
    lines = [f"# {title}", "", f"Embedded long-tail dataset (seed {seed}): `{train_json}`", "",
             "```", stats_text, "```", "", "![long tail](long_tail.png)", "",
             "## Results (LVIS federated AP, percent)", "", table, ""]
    for name in names:
        lines += [f"### {name}", "", f"![per-class AP {name}](per_class_ap_{name}.png)", ""]
    lines += [f"Total time: {time.time() - start:.0f} s.", ""]
    (out / "report.md").write_text("\n".join(lines))
    print(f"\nreport: {out / 'report.md'}\nsummary: {out / 'summary.json'}")
    return summary


def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0, progress: bool = True,
             jobs: int | None = None) -> dict:
    """The main job: CE baseline vs repeat factor sampling on the embedded dataset."""
    return run_compare(DEMO_RECIPES, out_dir, seed=seed, progress=progress, jobs=jobs,
                       title="taildet demo: the long-tail problem on the embedded dataset")
