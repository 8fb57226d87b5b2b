"""The numbers of ``taildet compare``: the class-prior baseline's detections, one run's summary row
(metrics in percent, per-class AP, the LogN diagnostic), the machine the numbers were measured on,
and :func:`summarize` (statistics over replicates, paired differences, claims; pure)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from taildet import evidence
from taildet.data.stats import dataset_stats
from taildet.recipes import Recipe
from taildet.utils.machine import default_jobs, machine_info  # noqa: F401  (re-exported by taildet.compare)


SUMMARY_KEYS = ("AP", "APr", "APc", "APf", "AP50", "AP75", "APs", "APm", "APl", "AR@300", "APpool")


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
    return {c["id"]: c["image_count"] for c in dataset_stats(train_json)["classes"]}


def _bbox(metrics: dict) -> dict:
    return metrics["bbox"] if isinstance(metrics.get("bbox"), dict) else metrics


def _run_row(rep: str, rows: dict) -> dict:
    """One run's summary row: metrics in percent, seconds, per-class AP (percent, ``None`` undefined)."""
    metrics, seconds = rows[rep]
    row = _percent(metrics)
    row["seconds"] = round(seconds, 1)
    row["per_class_AP"] = {str(k): (None if v is None or math.isnan(float(v)) else round(100.0 * float(v), 3))
                           for k, v in (metrics.get("per_class_AP") or {}).items()}
    return row


def _argmax_diagnostic(stats_file: Path) -> dict | None:
    """``{variant: {group: percent}}`` from a LogN statistics file's background-argmax report
    (:mod:`taildet.calibration.diagnostics`), or ``None`` when the file has none."""
    try:
        report = json.loads(stats_file.read_text()).get("extra", {}).get("background_argmax_share")
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict):
        return None
    return {variant: {g: (None if v.get("share") is None else round(100.0 * v["share"], 2))
                      for g, v in groups.items()}
            for variant, groups in report.items() if isinstance(groups, dict)}


def summarize(runs: dict[str, dict[str, dict]], specs: dict[str, Recipe], classes: dict[str, dict],
              claims=None, regime: str | None = None, resamples: int | None = None) -> dict:
    """Statistics over replicates of per-run summary rows (pure; ``run_compare`` writes the result).

    ``runs[recipe][replicate]``: a row as :func:`_run_row` makes it. Returns ``{"classes",
    "recipes": {name: {"about", "kind", "baselines", "runs", "stats": {metric: seed_statistics}}},
    "paired": [...], "claims": [...]}``.
    """
    resamples = resamples or evidence.BOOTSTRAP_RESAMPLES
    groups = {c: v.get("group") for c, v in classes.items()}
    out_recipes = {}
    for n, reps in runs.items():
        out_recipes[n] = {
            "about": specs[n].about if n in specs else "", "kind": specs[n].kind if n in specs else "train",
            "baselines": [b for b in (specs[n].compared_with() if n in specs else ()) if b in runs],
            "runs": reps,
            "stats": {m: evidence.seed_statistics([r.get(m) for r in reps.values()]) for m in evidence.METRICS},
        }
    paired = [evidence.compare_pair(runs, n, b, m, groups, resamples=resamples)
              for n in runs for b in out_recipes[n]["baselines"] for m in evidence.METRICS]
    claim_rows = evidence.evaluate_claims(claims, runs, groups, regime=regime, resamples=resamples) if claims else []
    return {"classes": classes, "recipes": out_recipes, "paired": paired, "claims": claim_rows}
