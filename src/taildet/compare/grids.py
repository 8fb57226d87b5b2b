"""Detection grids of ``taildet compare`` / ``taildet demo``: the baseline and the best long-tail
recipe drawn on the same validation images (:func:`taildet.analysis.show.detection_grid`).

Which recipes (:func:`grid_recipes`), among those whose first-replicate run directory holds a
``results_bbox.json`` (the ``prior`` row has none):

* the *baseline* is the first of them, in the comparison's order, that has no baseline of its own
  (``summary["recipes"][name]["baselines"]`` empty): ``faster_ce`` in the demo;
* the *best* is the one of the others with the highest mean APr over the replicates (the first in
  order on a tie; one without an APr comes last): in the demo the better of ``faster_ce_rfs`` and
  ``faster_ce+logn``.

Two grids in all, whatever the number of recipes (about a second each on the embedded dataset).
They show the first replicate's runs on the same :data:`GRID_IMAGES` images of its validation set
(chosen once by :func:`taildet.analysis.show.default_image_ids`: rare classes first) and are
written as ``detections_<recipe>.png`` in the comparison's output directory.
"""

from __future__ import annotations

import math
from pathlib import Path

from taildet.analysis.show import DEFAULT_SCORE_THRESH, DEFAULT_TOP_K, default_image_ids, detection_grid
from taildet.data.lvis import load_lvis

__all__ = ["GRID_IMAGES", "detection_grid_section", "grid_recipes"]

#: Images in each grid (two rows of four).
GRID_IMAGES = 8
GRID_COLS = 4


def _apr(summary: dict, name: str) -> float:
    v = summary["recipes"][name]["stats"].get("APr", {}).get("mean")
    return -math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def grid_recipes(summary: dict, names: list[str], rep_dir: Path) -> list[str]:
    """``[baseline, best]`` (module docstring; fewer when fewer recipes have results)."""
    with_results = [n for n in names if (rep_dir / n / "results_bbox.json").is_file()]
    baseline = next((n for n in with_results if not summary["recipes"][n]["baselines"]), None)
    if baseline is None:
        return with_results[:1]
    others = [n for n in with_results if n != baseline]
    if not others:
        return [baseline]
    best = max(others, key=lambda n: (_apr(summary, n), -others.index(n)))
    return [baseline, best]


def detection_grid_section(summary: dict, names: list[str], out: Path, rep: str, val_json: Path) -> list[str]:
    """Write the grids of :func:`grid_recipes` into ``out`` and return the report's Markdown lines
    (empty when no recipe has results)."""
    rep_dir = out / rep
    chosen = grid_recipes(summary, names, rep_dir)
    if not chosen:
        return []
    ds = load_lvis(val_json)
    ids = default_image_ids(ds, GRID_IMAGES)
    lines = ["## Detections", "",
             f"{rep}'s validation images {', '.join(map(str, ids))} (rare classes first). White: ground truth; "
             f"detections (score >= {DEFAULT_SCORE_THRESH}, the {DEFAULT_TOP_K} best per image) coloured by the frequency group of the predicted "
             "class: magenta rare, orange common, cyan frequent. "
             + ("Baseline and the other recipe with the highest APr." if len(chosen) == 2 else ""), ""]
    for role, name in zip(("baseline", "best APr"), chosen):
        png = out / f"detections_{name}.png"
        detection_grid(ds, rep_dir / name / "results_bbox.json", png, image_ids=ids, cols=GRID_COLS)
        lines += [f"### {name} ({role})", "", f"![detections {name}]({png.name})", ""]
    return lines
