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

import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from taildet import engine, evidence
from taildet.analysis.gradient_ratio import gradient_ratio_report
from taildet.analysis.plots import plot_mean_score_vs_instances
from taildet.calibration import (CALIBRATORS, LogitNormalizer, apply_logit_normalization, build_calibrator,
                                 plot_logit_statistics)
from taildet.calibration.calibrators import LogN
from taildet.config import apply_overrides, load_config
from taildet.data.stats import dataset_stats, format_stats, plot_long_tail
from taildet.data.synthetic import make_dataset
from taildet.engine import finetune, train
from taildet.engine.builders import build_datasets, build_model_for_checkpoint
from taildet.engine.pretrain import REGIMES
from taildet.errors import ConfigError
from taildet.evaluation import evaluate_lvis, report, save_metrics
from taildet.fileio import atomic_write_text, check_not_inputs, check_output_path
from taildet.results_docs import (format_claims_table, format_paired_table, format_recipe_table, plot_claims_forest,
                                  plot_recipe_metrics)
from taildet.sampling.prefill import observe_mean_score

@dataclass(frozen=True)
class Recipe:
    """One row of a comparison table.

    kind:
        ``"prior"`` -- no training (:func:`prior_baseline_results`);
        ``"train"`` -- ``taildet train config``;
        ``"finetune"`` -- ``taildet finetune config --from <stage1 recipe's model_final.pth>``;
        ``"posthoc"`` -- a training-free method (``posthoc``, a name in
        :data:`taildet.calibration.CALIBRATORS`) applied
        to the ``stage1`` recipe's checkpoint and evaluated.
    baselines:
        the recipes this one is compared with in the paired table (one change at a time: the
        same detector, classifier and schedule without the method). Fine-tune and post-hoc rows
        are compared with their ``stage1`` unless ``baselines`` says otherwise.
    opts:
        dotted config overrides of this row only, after the comparison's own (e.g. a longer
        schedule, or an evaluation setting of a post-hoc row: they apply to the stage-1 config
        the post-hoc method and the evaluation read).
    """

    kind: str
    config: str | None = None
    stage1: str | None = None
    posthoc: str | None = None
    posthoc_kwargs: tuple = ()
    about: str = ""
    baselines: tuple[str, ...] = ()
    opts: tuple[str, ...] = ()

    def compared_with(self) -> tuple[str, ...]:
        """The baseline recipes of the paired table (``baselines``, else the stage 1)."""
        if self.baselines:
            return self.baselines
        return (self.stage1,) if self.kind in ("finetune", "posthoc") and self.stage1 else ()


_NO_SCORE_THRESH = ("model.box_score_thresh=0.0", "eval.score_thresh=0.0")

#: Recipe name -> Recipe (configs relative to the repository's ``configs/``). One plain dict.
RECIPES: dict[str, Recipe] = {
    "prior": Recipe("prior", about="GT boxes scored with the training class prior (no training)"),
    "faster_ce": Recipe("train", "demo_faster_tiny_ce.yaml", about="Faster R-CNN, softmax CE, random sampling"),
    "faster_ce_rfs": Recipe("train", "demo_faster_tiny_ce_rfs.yaml", about="+ repeat factor sampling",
                            baselines=("faster_ce",)),
    "faster_sigmoid_rfs": Recipe("train", "demo_faster_tiny_sigmoid_rfs.yaml", about="sigmoid BCE + RFS"),
    # the cosine classifier (temperature 20) of EQL / EQLv2 / Seesaw, with CE and with sigmoid BCE:
    # those losses are compared with the same classifier, one change at a time
    "faster_cos_ce": Recipe("train", "demo_faster_tiny_cos_ce.yaml",
                            about="Faster R-CNN, softmax CE, cosine classifier (T 20)", baselines=("faster_ce",)),
    "faster_cos_sigmoid": Recipe("train", "demo_faster_tiny_cos_sigmoid.yaml",
                                 about="sigmoid BCE, cosine classifier (T 20)", baselines=("faster_cos_ce",)),
    "faster_eql": Recipe("train", "demo_faster_tiny_eql.yaml", about="EQL, cosine classifier",
                         baselines=("faster_cos_sigmoid", "faster_cos_ce")),
    "faster_eqlv2": Recipe("train", "demo_faster_tiny_eqlv2.yaml", about="EQLv2, cosine classifier",
                           baselines=("faster_cos_ce", "faster_cos_sigmoid")),
    "faster_seesaw": Recipe("train", "demo_faster_tiny_seesaw.yaml", about="Seesaw, cosine classifier",
                            baselines=("faster_cos_ce",)),
    "faster_ce+bsoftmax": Recipe("finetune", "demo_faster_tiny_bsoftmax_ft.yaml", "faster_ce",
                                 about="stage 2: Balanced Softmax"),
    "faster_ce+bsigmoid": Recipe("finetune", "demo_faster_tiny_bsigmoid_ft.yaml", "faster_ce",
                                 about="stage 2: Balanced Sigmoid, classifier only, RFS"),
    "faster_ce+crt": Recipe("finetune", "demo_faster_tiny_crt_ft.yaml", "faster_ce",
                            about="stage 2: cRT (CE, class-balanced sampling, classifier only)"),
    "faster_online_logn": Recipe("train", "demo_faster_tiny_online_logn.yaml",
                                 about="LogN online inverse variant (training option)", baselines=("faster_ce",)),
    "retinanet_focal_rfs": Recipe("train", "demo_retinanet_tiny_focal_rfs.yaml", about="RetinaNet, focal, RFS"),
    "retinanet_efl": Recipe("train", "demo_retinanet_tiny_efl.yaml", about="RetinaNet, EFL, RFS",
                            baselines=("retinanet_focal_rfs",)),
    "fcos_focal": Recipe("train", "demo_fcos_tiny_focal.yaml", about="FCOS, focal, RFS"),
    "fcos_efl": Recipe("train", "demo_fcos_tiny_efl.yaml", about="FCOS, EFL, RFS", baselines=("fcos_focal",)),
    "atss_focal": Recipe("train", "demo_atss_tiny_focal.yaml", about="ATSS improved baseline, focal, RFS"),
    "atss_efl": Recipe("train", "demo_atss_tiny_efl.yaml", about="ATSS improved baseline, EFL, RFS",
                       baselines=("atss_focal",)),
    "atss_qfl": Recipe("train", "demo_atss_tiny_qfl.yaml", about="ATSS improved baseline, QFL, RFS"),
    "atss_eqfl": Recipe("train", "demo_atss_tiny_eqfl.yaml", about="ATSS improved baseline, EQFL, RFS",
                        baselines=("atss_qfl",)),
    # the classifier-bias prior alone (each against the same loss at its baseline's prior): the
    # one-stage rows were first run with EFL's / QFL's own default priors, two changes per claim
    "retinanet_efl_prior001": Recipe("train", "demo_retinanet_tiny_efl_prior001.yaml",
                                     about="RetinaNet, EFL, prior 0.001 (EFL's default)", baselines=("retinanet_efl",)),
    "fcos_efl_prior001": Recipe("train", "demo_fcos_tiny_efl_prior001.yaml",
                                about="FCOS, EFL, prior 0.001 (EFL's default)", baselines=("fcos_efl",)),
    "atss_qfl_prior01": Recipe("train", "demo_atss_tiny_qfl_prior01.yaml",
                               about="ATSS improved baseline, QFL, prior 0.01 (QFL's default)", baselines=("atss_qfl",)),
    "faster_ce+ebl": Recipe("finetune", "demo_faster_tiny_ebl_ft.yaml", "faster_ce",
                            about="LOCE stage 2: Equilibrium Loss alone"),
    "faster_ce+mfs": Recipe("finetune", "demo_faster_tiny_mfs_ft.yaml", "faster_ce",
                            about="LOCE stage 2: MFS alone (with CE)"),
    "faster_ce+loce": Recipe("finetune", "demo_faster_tiny_loce_ft.yaml", "faster_ce",
                             about="LOCE: EBL + MFS", baselines=("faster_ce", "faster_ce+ebl", "faster_ce+mfs")),
    "faster_ce+loce_prior": Recipe("finetune", "demo_faster_tiny_loce_prior_ft.yaml", "faster_ce",
                                   about="LOCE with the dataset prior (1/n_c) sampler",
                                   baselines=("faster_ce", "faster_ce+loce")),
    "faster_ce+logn": Recipe("posthoc", stage1="faster_ce", posthoc="logn", about="LogN (no training)"),
    "faster_ce_rfs+logn": Recipe("posthoc", stage1="faster_ce_rfs", posthoc="logn", about="RFS + LogN",
                                 baselines=("faster_ce_rfs", "faster_ce")),
    "faster_ce+loga": Recipe("posthoc", stage1="faster_ce", posthoc="loga", about="logit adjustment, tau 1"),
    "faster_ce+logn_mean": Recipe("posthoc", stage1="faster_ce", posthoc="logn",
                                  posthoc_kwargs=(("mode", "mean_only"),), about="LogN ablation: mean only"),
    "faster_ce+logn_std": Recipe("posthoc", stage1="faster_ce", posthoc="logn",
                                 posthoc_kwargs=(("mode", "std_only"),), about="LogN ablation: std only"),
    "faster_ce+logn_nobeta": Recipe("posthoc", stage1="faster_ce", posthoc="logn",
                                    posthoc_kwargs=(("mode", "no_beta"),), about="LogN ablation: no beta"),
    # LogN's test-time score threshold (the released configs test at score_thr 0): the CE model and
    # its LogN row evaluated with no score threshold, so calibrated scores below 1e-4 survive
    "faster_ce+thr0": Recipe("posthoc", stage1="faster_ce", posthoc="none", opts=_NO_SCORE_THRESH,
                             about="CE evaluated with score threshold 0"),
    "faster_ce+logn_thr0": Recipe("posthoc", stage1="faster_ce", posthoc="logn", opts=_NO_SCORE_THRESH,
                                  about="LogN, score threshold 0", baselines=("faster_ce+thr0", "faster_ce+logn")),
    # LogN post hoc on the cosine-CE detector
    "faster_cos_ce+thr0": Recipe("posthoc", stage1="faster_cos_ce", posthoc="none", opts=_NO_SCORE_THRESH,
                                 about="cosine CE evaluated with score threshold 0"),
    "faster_cos_ce+logn": Recipe("posthoc", stage1="faster_cos_ce", posthoc="logn",
                                 about="cosine CE + LogN (statistics pass)"),
    "faster_cos_ce+logn_nobeta": Recipe("posthoc", stage1="faster_cos_ce", posthoc="logn",
                                        posthoc_kwargs=(("mode", "no_beta"),), about="cosine CE + LogN without beta",
                                        baselines=("faster_cos_ce", "faster_cos_ce+logn")),
    # LogN as its authors release it: stage 1 trains a cosine classifier with BatchNorm on the
    # logits (evaluated raw, score threshold 0); the post-hoc step continues the BN running
    # statistics (the reference's 0-lr fine-tune; momentum scaled to the demo's length)
    "faster_logn_normed": Recipe("train", "demo_faster_tiny_logn_normed.yaml",
                                 about="LogN released recipe, stage 1: cosine + BN on logits, CE (raw logits, thr 0)",
                                 baselines=("faster_cos_ce+thr0",)),
    "faster_logn_normed+logn": Recipe("posthoc", stage1="faster_logn_normed", posthoc="logn",
                                      posthoc_kwargs=(("stats", "running"), ("running_momentum", 0.009)),
                                      about="LogN released recipe: BN running statistics continued (0-lr fine-tune)",
                                      baselines=("faster_logn_normed", "faster_cos_ce+thr0")),
    "faster_logn_normed+logn_nobeta": Recipe("posthoc", stage1="faster_logn_normed", posthoc="logn",
                                             posthoc_kwargs=(("stats", "running"), ("running_momentum", 0.009),
                                                             ("mode", "no_beta")),
                                             about="LogN released recipe without beta",
                                             baselines=("faster_logn_normed", "faster_logn_normed+logn")),
}

def _statistics_input(cfg, checkpoint: str, out_dir: Path, method) -> str:
    """The ``"statistics"`` input of a post-hoc method: the statistics pass over the training set
    with the method's ``pass_options``, written for the row by ``method.write_statistics`` as
    ``out_dir/logit_stats.json`` (with the paper's Fig. 2 beside it); returns its path.

    The pass is made once per checkpoint and pass setting (cached beside the checkpoint as
    ``logit_stats_pass*.json``); rows that differ only in how the statistics are applied (the
    ablations' ``mode``, ``beta``) reuse it.
    """
    pass_kw = method.pass_options
    tag = hashlib.sha1(json.dumps(pass_kw, sort_keys=True, default=str).encode()).hexdigest()[:8] if pass_kw else ""
    cached = Path(checkpoint).parent / f"logit_stats_pass{'-' + tag if tag else ''}.json"
    if not cached.exists():
        engine.calibrate_checkpoint(cfg, checkpoint, str(cached), progress=False, **pass_kw)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = method.write_statistics(cached, out_dir / "logit_stats.json")
    # the paper's Fig. 2: per-class logit mean and std against training instance count
    train_set, _, _ = build_datasets(cfg, need_train=True)
    plot_logit_statistics(LogitNormalizer.load(path), train_set.instance_counts, out_dir / "logit_stats.png",
                          class_names=train_set.class_names)
    return path


def posthoc_calibration(name: str, cfg, checkpoint: str, out_dir: Path, **options):
    """What ``evaluate_checkpoint(calibration=...)`` takes for the post-hoc method ``name`` (a key
    of :data:`taildet.calibration.CALIBRATORS`) with ``options``: None for the identity, else a
    function ``model -> model`` that fits the method on ``model.cls_head`` and installs the
    transform. The method's inputs (statistics pass, training set) are gathered here."""
    method = build_calibrator(name, **options)
    if method.identity:
        return None
    inputs: dict = {}
    if "statistics" in method.inputs:
        inputs["statistics"] = _statistics_input(cfg, checkpoint, out_dir, method)
    if "train_set" in method.inputs:
        inputs["train_set"] = build_datasets(cfg, need_train=True)[0]

    def calibrate(model):
        return apply_logit_normalization(model, method.fit(model.cls_head, **inputs))

    return calibrate


#: What ``taildet demo`` runs: the two-stage CE baseline and the same with repeat factor sampling.
DEMO_RECIPES = ("prior", "faster_ce", "faster_ce_rfs", "faster_ce+logn")

SUMMARY_KEYS = ("AP", "APr", "APc", "APf", "AP50", "AP75", "APs", "APm", "APl", "AR@300")


def configs_dir() -> Path:
    """The repository's ``configs/`` directory (taildet runs from a source checkout)."""
    return Path(__file__).resolve().parents[2] / "configs"


def resolve_recipe(name: str) -> Recipe:
    """The :class:`Recipe` of a recipe name, or a ``train`` recipe for a YAML path."""
    if name in RECIPES:
        return RECIPES[name]
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return Recipe("train", str(path.resolve()))
    raise ConfigError(
        f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)} or an existing YAML file"
    )


def _config_path(recipe: Recipe) -> Path:
    return configs_dir() / recipe.config if recipe.config and not Path(recipe.config).is_absolute() \
        else Path(str(recipe.config))


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


def default_jobs() -> int:
    """One training job per CPU core (``len(os.sched_getaffinity(0))`` where available)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _bbox(metrics: dict) -> dict:
    return metrics["bbox"] if isinstance(metrics.get("bbox"), dict) else metrics


def _run_one(name: str, kind: str, cfg_path: str, opts: list[str], from_checkpoint: str | None,
             threads: int, progress: bool = False) -> tuple[str, dict, float]:
    """Train or fine-tune one recipe (in this process or a worker); returns (name, bbox metrics, s)."""
    if threads > 0:
        torch.set_num_threads(threads)
    t0 = time.time()
    cfg = apply_overrides(load_config(cfg_path), opts)
    if kind == "finetune":
        out = finetune(cfg, from_checkpoint, resume=False, progress=progress)
    else:
        out = train(cfg, resume=False, progress=progress)
    return name, _bbox(out["metrics"]), time.time() - t0


def _last_iteration(metrics_jsonl: Path) -> int:
    try:
        with open(metrics_jsonl, "rb") as fh:
            lines = fh.read().splitlines()
        return int(json.loads(lines[-1])["iteration"]) if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def _planned_iterations(kind: str, cfg) -> int:
    return int(cfg.train.iterations or 0)  # a stage-2 config's own (kind: either)


def _train_recipes(runs: list[tuple], jobs: int, progress: bool) -> dict[str, tuple[dict, float]]:
    """Run ``runs`` ([(name, kind, config, overrides, from_checkpoint)]), ``jobs`` at once.

    With one job each run trains in this process with its own progress bar; with several, each
    in a worker process and one bar follows the iterations of all (read from ``metrics.jsonl``).
    """
    out: dict[str, tuple[dict, float]] = {}
    if not runs:
        return out
    if jobs <= 1:
        for name, kind, cfg_path, opts, ckpt in runs:
            print(f"\n=== recipe {name} ===")
            _, metrics, seconds = _run_one(name, kind, str(cfg_path), opts, ckpt, 0, progress)
            out[name] = (metrics, seconds)
        return out

    from tqdm import tqdm  # optional: tqdm, imported on use

    threads = max(1, default_jobs() // jobs)
    totals, logs = {}, {}
    for name, kind, cfg_path, opts, _ in runs:
        cfg = apply_overrides(load_config(cfg_path), opts)
        totals[name] = _planned_iterations(kind, cfg)
        logs[name] = Path(cfg.output_dir) / "metrics.jsonl"
        if logs[name].exists():
            logs[name].unlink()  # a fresh run: do not read an old run's progress
    bar = tqdm(total=sum(totals.values()) or None, desc=f"training {len(runs)} recipes", unit="it",
               disable=not progress)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        pending = {pool.submit(_run_one, n, k, str(c), o, ck, threads) for n, k, c, o, ck in runs}
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


def _run_posthoc(name: str, recipe: Recipe, stage1_cfg_path: Path, opts: list[str], checkpoint: str,
                 out_dir: Path) -> dict:
    """Apply a training-free method (:data:`taildet.calibration.CALIBRATORS`) to a checkpoint and
    evaluate it."""
    if recipe.posthoc not in CALIBRATORS:
        raise ConfigError(f"recipe {name}: unknown post-hoc method {recipe.posthoc!r} "
                          f"(known: {', '.join(CALIBRATORS) or 'none'})")
    cfg = apply_overrides(load_config(stage1_cfg_path), opts)
    calibration = posthoc_calibration(recipe.posthoc, cfg, checkpoint, out_dir, **dict(recipe.posthoc_kwargs))
    return _bbox(engine.evaluate_checkpoint(cfg, checkpoint, calibration=calibration, out_dir=str(out_dir)))


def _plot_mean_scores(out: Path, ce: str, loce: str, specs: dict, run_opts, train_json: Path) -> None:
    """LOCE's Fig. 4: per-class mean classification score vs training instances, CE and LOCE.

    LOCE's scores are its Equilibrium Loss buffer; the CE model's are observed with the same EMA
    rule over the training set (no training).
    """
    state = torch.load(out / loce / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    loce_score = next((v for k, v in state.items() if k.endswith("mean_score")), None)
    if loce_score is None:
        return
    cfg = apply_overrides(load_config(_config_path(specs[ce])), run_opts(ce))
    train_set, _, _ = build_datasets(cfg, need_train=True)
    model = build_model_for_checkpoint(cfg, train_set.num_classes, train_set)
    model.load_state_dict(torch.load(out / ce / "model_final.pth", map_location="cpu",
                                     weights_only=False)["model"])
    ce_score = observe_mean_score(model, train_set, progress=False)
    png = plot_mean_score_vs_instances({ce: ce_score, loce: loce_score}, train_set.instance_counts,
                                       out / "mean_score_vs_instances.png",
                                       title="mean classification score (LOCE Fig. 4)")
    print(f"mean classification score plot: {png}")


def replicate_name(data_seed: int, seed: int) -> str:
    """Directory name of one replicate: ``seed<s>`` on data seed 0, ``data<d>_seed<s>`` otherwise."""
    return f"seed{seed}" if data_seed == 0 else f"data{data_seed}_seed{seed}"


def expand_recipes(names: Iterable[str], with_baselines: bool = False) -> tuple[list[str], dict[str, Recipe]]:
    """The recipe list to run and every recipe's spec, stage-1 dependencies included.

    ``with_baselines``: add each recipe's baselines (:meth:`Recipe.compared_with`) as rows too.
    Returns ``(rows, specs)``: ``rows`` are the table rows in order (requested first, then added
    baselines), ``specs`` also holds stage-1 recipes that are trained but not shown.
    """
    rows = list(dict.fromkeys(names))
    specs = {n: resolve_recipe(n) for n in rows}  # fail fast on a bad name
    if with_baselines:
        for n in list(rows):
            for b in specs[n].compared_with():
                if b not in specs:
                    rows.append(b)
                    specs[b] = resolve_recipe(b)
    for n in list(specs):
        dep = specs[n].stage1
        if specs[n].kind in ("finetune", "posthoc"):
            if dep not in RECIPES or RECIPES[dep].kind != "train":
                raise ConfigError(f"recipe {n}: stage1 {dep!r} is not a training recipe")
            specs.setdefault(dep, RECIPES[dep])
    return rows, specs


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


def _reusable(run_dir: Path, kind: str) -> dict | None:
    """The bbox metrics of a finished run in ``run_dir`` (``metrics.json``, and ``model_final.pth``
    for trained rows), or ``None``."""
    mfile = run_dir / "metrics.json"
    if not mfile.exists() or (kind in ("train", "finetune") and not (run_dir / "model_final.pth").exists()):
        return None
    with open(mfile) as fh:
        return _bbox(json.load(fh))


def run_compare(recipes: Iterable[str] | None, out_dir: str | Path, seeds: Iterable[int] = (0,),
                data_seeds: Iterable[int] = (0,), extra_opts: list[str] | None = None,
                progress: bool = True, title: str = "taildet compare", scale: float | None = None,
                jobs: int | None = None, reuse: bool = False, with_baselines: bool = False,
                claims: str | Path | bool | None = None, regime: str = "scratch",
                bootstrap_resamples: int | None = None) -> dict:
    """Run ``recipes`` x replicates on the embedded dataset; write ``summary.json`` + ``report.md``.

    A *replicate* is one (data seed, training seed) pair: the embedded dataset generated with
    ``data.synthetic.seed = d`` and every recipe trained with ``train.seed = s``; its runs live in
    ``out_dir/<replicate>/<recipe>/`` (:func:`replicate_name`). Summary statistics are over the
    replicates (:mod:`taildet.evidence`): per recipe and metric the mean, std and 95 % t
    interval; per recipe and each of its baselines (:meth:`Recipe.compared_with`, when both ran)
    the paired difference with its t interval and class-bootstrap interval and a verdict; and,
    when ``claims`` is given (``True`` for the built-in ``configs/evidence/claims.yaml``, or a path), each
    claim whose recipes ran.

    ``regime``: a name in :data:`taildet.engine.pretrain.REGIMES` -- the embedded benchmark's
    vocabulary, size and the overrides every run gets (``scratch``: random init, the demo;
    ``pretrained``: the tiny backbone pretrained on balanced crops, first stages frozen; ``lvis150``
    and ``lvis150_pretrained``: 150 classes with LVIS v1's r/c/f shares). ``scale`` overrides the
    regime's size. An output directory holds one regime: reusing it under another is an error.

    ``jobs`` trainings run at once, each in its own process with ``torch`` limited to
    ``cpu_count // jobs`` threads (default: one job per core). Trainings of all replicates are
    scheduled together. ``reuse``: a run whose directory already holds ``metrics.json`` (and
    ``model_final.pth`` for trained rows) is not run again; fine-tune and post-hoc rows are
    reused only when their stage 1 was. ``with_baselines`` adds every recipe's baselines.
    Returns the summary (see ``summary.json``: ``recipes[name]["runs"][replicate]``,
    ``recipes[name]["stats"][metric]``, ``paired``, ``claims``).
    """
    start = time.time()
    out = Path(out_dir)
    seeds, data_seeds = [int(s) for s in seeds], [int(d) for d in data_seeds]
    if not seeds or not data_seeds:
        raise ConfigError("compare: give at least one seed and one data seed")
    if len(set(seeds)) != len(seeds) or len(set(data_seeds)) != len(data_seeds):
        raise ConfigError("compare: a seed is given twice")
    names, specs = expand_recipes(recipes if recipes else list(RECIPES), with_baselines)
    claim_list = None
    if claims:
        claim_list = evidence.load_claims(None if claims is True else claims)
    if regime not in REGIMES:
        raise ConfigError(f"compare: unknown regime {regime!r}: expected one of {', '.join(REGIMES)}")
    reg = REGIMES[regime]
    scale = float(reg.scale if scale is None else scale)
    vocab = "" if reg.vocabulary == "default" else f"_{reg.vocabulary}"
    reps = [(d, s, replicate_name(d, s)) for d in data_seeds for s in seeds]
    data: dict[int, dict] = {d: {"root": out.parent / "data" / f"synthetic_seed{d}_scale{scale:g}{vocab}"}
                             for d in data_seeds}

    def run_opts(d: int, s: int, n: str) -> list[str]:
        return [f"data.root={data[d]['root']}", f"data.synthetic.seed={d}", f"data.synthetic.scale={scale}",
                f"data.synthetic.vocabulary={reg.vocabulary}", f"train.seed={s}"] + list(reg.overrides) + \
            list(extra_opts or []) + list(specs[n].opts) + [f"output_dir={out / replicate_name(d, s) / n}"]

    stage1 = [n for n in specs if specs[n].kind == "train"]
    stage2 = [n for n in specs if specs[n].kind == "finetune"]
    posthoc = [n for n in names if specs[n].kind == "posthoc"]

    # Before anything is written: every recipe's config with the options it will run with, and
    # the output folder (a bad --opts or a recipe YAML the report would overwrite fails at once).
    d0, s0 = data_seeds[0], seeds[0]
    for n in specs:
        if specs[n].kind in ("train", "finetune"):
            apply_overrides(load_config(_config_path(specs[n])), run_opts(d0, s0, n))
        elif specs[n].kind == "posthoc":
            apply_overrides(load_config(_config_path(specs[specs[n].stage1])),
                            run_opts(d0, s0, specs[n].stage1) + list(specs[n].opts))
    check_output_path(out, directory=True, what="compare output")
    check_not_inputs({f"compare output {f}": out / f for f in ("summary.json", "report.md", "long_tail.png")},
                     {f"recipe {n}": _config_path(specs[n]) for n in stage1 + stage2})
    marker = out / "regime.txt"
    if marker.exists() and marker.read_text().strip() != regime:
        raise ConfigError(f"compare: {out} holds runs of regime {marker.read_text().strip()!r}, not {regime!r} "
                          f"(--reuse would mix them): use another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        atomic_write_text(regime + "\n", marker)

    # the data of every data seed (deterministic, cached by make_dataset)
    for d in data_seeds:
        info = make_dataset(data[d]["root"], seed=d, scale=scale, progress=progress, vocabulary=reg.vocabulary)
        data[d].update(train=Path(info["train_json"]), val=Path(info["val_json"]))
    stats = dataset_stats(data[data_seeds[0]]["train"])
    stats_text = format_stats(stats)
    print(stats_text)
    long_tail_png = plot_long_tail(stats, out / "long_tail.png")
    print(f"long-tail histogram: {long_tail_png}")
    jobs = max(1, int(jobs or default_jobs()))
    print(f"\nrecipes: {', '.join(names)}; replicates: {', '.join(r for _, _, r in reps)} "
          f"({jobs} parallel training job{'s' if jobs > 1 else ''})")

    done: dict[str, tuple[dict, float]] = {}   # "<replicate>/<recipe>" -> (bbox metrics, seconds)
    reused: set[str] = set()
    if reuse:
        for d, s, rep in reps:
            for n in stage1:
                m = _reusable(out / rep / n, "train")
                if m is not None:
                    done[f"{rep}/{n}"] = (m, 0.0)
                    reused.add(f"{rep}/{n}")
            for n in stage2 + posthoc:
                m = _reusable(out / rep / n, specs[n].kind)
                if m is not None and f"{rep}/{specs[n].stage1}" in reused:
                    done[f"{rep}/{n}"] = (m, 0.0)
        if done:
            print(f"reusing {len(done)} finished run(s): {', '.join(sorted(done))}")

    def todo(kind_names: list[str], kind: str) -> list[tuple]:
        runs = []
        for d, s, rep in reps:
            for n in kind_names:
                if f"{rep}/{n}" in done:
                    continue
                ckpt = str(out / rep / specs[n].stage1 / "model_final.pth") if kind == "finetune" else None
                runs.append((f"{rep}/{n}", kind, _config_path(specs[n]), run_opts(d, s, n), ckpt))
        return runs

    for kind, kind_names in (("train", stage1), ("finetune", stage2)):
        runs = todo(kind_names, kind)
        done.update(_train_recipes(runs, jobs=min(jobs, max(1, len(runs))), progress=progress))

    for d, s, rep in reps:
        for n in names:
            key, spec, t0 = f"{rep}/{n}", specs[n], time.time()
            if key in done:
                continue
            if spec.kind == "prior":
                metrics = evaluate_lvis(data[d]["val"], prior_baseline_results(data[d]["train"], data[d]["val"],
                                                                              seed=s))
                save_metrics(metrics, out / rep / n / "metrics.json")
            elif spec.kind == "posthoc":
                print(f"\n=== {rep}: recipe {n} ({spec.posthoc} on {spec.stage1}) ===")
                metrics = _run_posthoc(n, spec, _config_path(specs[spec.stage1]),
                                       run_opts(d, s, spec.stage1) + list(spec.opts),
                                       str(out / rep / spec.stage1 / "model_final.pth"), out / rep / n)
            else:  # pragma: no cover - every trained row is in ``done``
                raise AssertionError(key)
            done[key] = (metrics, time.time() - t0)

    # per-class plots and the class table (frequency groups as the evaluation uses them)
    classes: dict[str, dict] = {}
    for d, s, rep in reps:
        counts = _train_counts(data[d]["train"])
        for n in names:
            table_rows = report.per_class_table(done[f"{rep}/{n}"][0], data[d]["val"])
            report.plot_per_class_ap(table_rows, out / rep / f"per_class_ap_{n}.png", image_counts=counts)
            for r in table_rows:
                classes.setdefault(str(r["id"]), {"name": r["name"], "group": r["frequency"],
                                                  "train_images": counts.get(r["id"])})
        if "faster_ce+loce" in names and "faster_ce" in specs:
            _plot_mean_scores(out / rep, "faster_ce", "faster_ce+loce", specs,
                              lambda n, d=d, s=s: run_opts(d, s, n), data[d]["train"])

    runs = {n: {rep: _run_row(f"{rep}/{n}", done) for _, _, rep in reps} for n in names}
    for n in names:  # LogN rows: the background-argmax diagnostic their statistics pass measured
        # (measured with the default transform: rows that change mode / beta would misreport it)
        if specs[n].kind == "posthoc" and specs[n].posthoc == "logn" and \
                not any(k in LogN.TRANSFORM_ONLY for k, _ in specs[n].posthoc_kwargs):
            for _, _, rep in reps:
                diag = _argmax_diagnostic(out / rep / n / "logit_stats.json")
                if diag:
                    runs[n][rep]["background_argmax_share"] = diag
    class_groups = [classes[k]["group"] for k in sorted(classes, key=int)]
    for n in names:  # EFL / EQFL (and EQLv2) rows: the gradient ratio their loss accumulated
        if specs[n].kind == "train":
            for _, _, rep in reps:
                ratio = gradient_ratio_report(out / rep / n, class_groups)
                if ratio:
                    runs[n][rep]["gradient_ratio"] = ratio
    summary = summarize(
        runs,
        {n: specs[n] for n in names}, classes, claim_list, regime=regime,
        resamples=bootstrap_resamples or evidence.BOOTSTRAP_RESAMPLES)
    summary.update({"title": title, "regime": regime, "seeds": seeds, "data_seeds": data_seeds,
                    "machine": machine_info(),
                    "scale": scale, "extra_opts": list(extra_opts or []),
                    "dataset": {k: stats[k] for k in ("num_images", "num_classes", "groups") if k in stats}})
    summary = {k: summary[k] for k in ("title", "regime", "seeds", "data_seeds", "machine", "scale", "extra_opts",
                                       "dataset", "classes", "recipes", "paired", "claims")}
    atomic_write_text(json.dumps(summary, indent=1) + "\n", out / "summary.json")
    plot_recipe_metrics(summary, out / "metrics_by_recipe.png")
    recipe_table = format_recipe_table(summary)
    print("\n" + recipe_table)
    lines = [f"# {title}", "", f"Embedded long-tail dataset (data seeds {data_seeds}, training seeds {seeds}, "
             f"regime {regime}): `{data[data_seeds[0]]['train']}`", "",
             "```", stats_text, "```", "", "![long tail](long_tail.png)", "",
             "## Results (LVIS federated AP, percent; mean and 95 % t interval over replicates)", "",
             recipe_table, "", "![metrics by recipe](metrics_by_recipe.png)", ""]
    if summary["paired"]:
        lines += ["## Paired differences to each recipe's baseline", "", format_paired_table(summary), ""]
    if summary["claims"]:
        plot_claims_forest(summary, out / "claims_forest.png")
        lines += ["## Claims", "", format_claims_table(summary), "", "![claims](claims_forest.png)", ""]
    first = reps[0][2]
    for name in names:
        lines += [f"### {name}", "", f"![per-class AP {name}]({first}/per_class_ap_{name}.png)", ""]
    lines += [f"Total time: {time.time() - start:.0f} s.", ""]
    atomic_write_text("\n".join(lines), out / "report.md")
    print(f"\nreport: {out / 'report.md'}\nsummary: {out / 'summary.json'}")
    return summary


def machine_info() -> dict:
    """What a run's numbers depend on beyond seeds: torch, its CPU kernel level, threads.

    Trainings are deterministic on one machine type, but CPU kernels of another instruction set
    (e.g. AVX2 vs AVX512) round differently and a long training diverges from there, so single
    runs on two machine types differ by about as much as two seeds.
    """
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "cpus": default_jobs()}


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


def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0, progress: bool = True,
             jobs: int | None = None) -> dict:
    """The main job: CE baseline vs repeat factor sampling on the embedded dataset."""
    return run_compare(DEMO_RECIPES, out_dir, seeds=(seed,), progress=progress, jobs=jobs,
                       title="taildet demo: the long-tail problem on the embedded dataset")
