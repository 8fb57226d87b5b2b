"""``taildet demo`` and ``taildet compare``: recipes on the embedded long-tail dataset, one table.

A *recipe* is a named YAML config in ``configs/`` (or any YAML path). Every recipe trains on the
embedded dataset (``taildet.data.synthetic``), is evaluated with LVIS federated AP, and ends up as
one row of a comparison table. The run directory holds, per recipe, the training run (metrics,
checkpoints, results JSON) and, for the whole comparison:

* ``summary.json`` — ``{recipe: {"AP", "APr", "APc", "APf", "AP50", ...}}``, AP values in percent;
* ``report.md`` — the table, the data set's long-tail statistics and links to the plots;
* ``per_class_ap_<recipe>.png`` — per-class AP against training image count, coloured by group;
* ``long_tail.png`` — the training set's class histogram.
* ``detections_<recipe>.png`` — the baseline's and the best-APr recipe's detections on the same
  validation images (:mod:`~taildet.compare.grids`).

The recipe ``prior`` needs no training: it scores the validation ground-truth boxes with class
scores drawn from the training-set class prior. It exercises the whole data -> results JSON ->
LVIS metrics path and shows what a classifier that knows only the label distribution scores.

The package: :mod:`~taildet.recipes` (the data), :mod:`~taildet.compare.runner` (trainings,
post-hoc rows, reuse, the report), :mod:`~taildet.compare.posthoc` (training-free rows) and
:mod:`~taildet.compare.summary` (rows, statistics, the machine).
"""

from taildet.compare.posthoc import _plot_mean_scores, _run_posthoc, _statistics_input, posthoc_calibration
from taildet.recipes import (DEMO_RECIPES, RECIPES, Recipe, _config_path, configs_dir, expand_recipes,
                                     replicate_name, resolve_recipe)
from taildet.compare.runner import _reusable, _run_one, _train_recipes, run_compare, run_demo
from taildet.compare.summary import (SUMMARY_KEYS, _argmax_diagnostic, _bbox, _percent, _run_row, _train_counts,
                                     default_jobs, machine_info, prior_baseline_results, summarize)

__all__ = ["DEMO_RECIPES", "RECIPES", "SUMMARY_KEYS", "Recipe", "configs_dir", "default_jobs", "expand_recipes",
           "machine_info", "posthoc_calibration", "prior_baseline_results", "replicate_name", "resolve_recipe",
           "run_compare", "run_demo", "summarize",
           "_argmax_diagnostic", "_bbox", "_config_path", "_percent", "_plot_mean_scores", "_reusable", "_run_one",
           "_run_posthoc", "_run_row", "_statistics_input", "_train_counts", "_train_recipes"]
