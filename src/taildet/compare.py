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
from dataclasses import dataclass
from typing import Iterable

import numpy as np

@dataclass(frozen=True)
class Recipe:
    """One row of a comparison table.

    kind:
        ``"prior"`` -- no training (:func:`prior_baseline_results`);
        ``"train"`` -- ``taildet train config``;
        ``"finetune"`` -- ``taildet finetune config --from <stage1 recipe's model_final.pth>``;
        ``"posthoc"`` -- a training-free method (``posthoc``, a name in :data:`POSTHOC`) applied
        to the ``stage1`` recipe's checkpoint and evaluated.
    """

    kind: str
    config: str | None = None
    stage1: str | None = None
    posthoc: str | None = None
    posthoc_kwargs: tuple = ()
    about: str = ""


#: Recipe name -> Recipe (configs relative to the repository's ``configs/``). One plain dict.
RECIPES: dict[str, Recipe] = {
    "prior": Recipe("prior", about="GT boxes scored with the training class prior (no training)"),
    "faster_ce": Recipe("train", "demo_faster_tiny_ce.yaml", about="Faster R-CNN, softmax CE, random sampling"),
    "faster_ce_rfs": Recipe("train", "demo_faster_tiny_ce_rfs.yaml", about="+ repeat factor sampling"),
    "faster_sigmoid_rfs": Recipe("train", "demo_faster_tiny_sigmoid_rfs.yaml", about="sigmoid BCE + RFS"),
    "faster_eql": Recipe("train", "demo_faster_tiny_eql.yaml", about="EQL, cosine classifier"),
    "faster_eqlv2": Recipe("train", "demo_faster_tiny_eqlv2.yaml", about="EQLv2, cosine classifier"),
    "faster_seesaw": Recipe("train", "demo_faster_tiny_seesaw.yaml", about="Seesaw, cosine classifier"),
    "faster_ce+bsoftmax": Recipe("finetune", "demo_faster_tiny_bsoftmax_ft.yaml", "faster_ce",
                                 about="stage 2: Balanced Softmax"),
    "faster_ce+bsigmoid": Recipe("finetune", "demo_faster_tiny_bsigmoid_ft.yaml", "faster_ce",
                                 about="stage 2: Balanced Sigmoid, classifier only, RFS"),
    "faster_ce+crt": Recipe("finetune", "demo_faster_tiny_crt_ft.yaml", "faster_ce",
                            about="stage 2: cRT (CE, class-balanced sampling, classifier only)"),
    "faster_online_logn": Recipe("train", "demo_faster_tiny_online_logn.yaml",
                                 about="LogN online inverse variant (training option)"),
    "retinanet_focal_rfs": Recipe("train", "demo_retinanet_tiny_focal_rfs.yaml", about="RetinaNet, focal, RFS"),
    "retinanet_efl": Recipe("train", "demo_retinanet_tiny_efl.yaml", about="RetinaNet, EFL, RFS"),
    "fcos_focal": Recipe("train", "demo_fcos_tiny_focal.yaml", about="FCOS, focal, RFS"),
    "fcos_efl": Recipe("train", "demo_fcos_tiny_efl.yaml", about="FCOS, EFL, RFS"),
    "atss_focal": Recipe("train", "demo_atss_tiny_focal.yaml", about="ATSS improved baseline, focal, RFS"),
    "atss_efl": Recipe("train", "demo_atss_tiny_efl.yaml", about="ATSS improved baseline, EFL, RFS"),
    "atss_qfl": Recipe("train", "demo_atss_tiny_qfl.yaml", about="ATSS improved baseline, QFL, RFS"),
    "atss_eqfl": Recipe("train", "demo_atss_tiny_eqfl.yaml", about="ATSS improved baseline, EQFL, RFS"),
    "faster_ce+ebl": Recipe("finetune", "demo_faster_tiny_ebl_ft.yaml", "faster_ce",
                            about="LOCE stage 2: Equilibrium Loss alone"),
    "faster_ce+mfs": Recipe("finetune", "demo_faster_tiny_mfs_ft.yaml", "faster_ce",
                            about="LOCE stage 2: MFS alone (with CE)"),
    "faster_ce+loce": Recipe("finetune", "demo_faster_tiny_loce_ft.yaml", "faster_ce",
                             about="LOCE: EBL + MFS"),
    "faster_ce+loce_prior": Recipe("finetune", "demo_faster_tiny_loce_prior_ft.yaml", "faster_ce",
                                   about="LOCE with the dataset prior (1/n_c) sampler"),
    "faster_ce+logn": Recipe("posthoc", stage1="faster_ce", posthoc="logn", about="LogN (no training)"),
    "faster_ce_rfs+logn": Recipe("posthoc", stage1="faster_ce_rfs", posthoc="logn", about="RFS + LogN"),
    "faster_ce+loga": Recipe("posthoc", stage1="faster_ce", posthoc="loga", about="logit adjustment, tau 1"),
    "faster_ce+logn_mean": Recipe("posthoc", stage1="faster_ce", posthoc="logn",
                                  posthoc_kwargs=(("mode", "mean_only"),), about="LogN ablation: mean only"),
    "faster_ce+logn_std": Recipe("posthoc", stage1="faster_ce", posthoc="logn",
                                 posthoc_kwargs=(("mode", "std_only"),), about="LogN ablation: std only"),
    "faster_ce+logn_nobeta": Recipe("posthoc", stage1="faster_ce", posthoc="logn",
                                    posthoc_kwargs=(("mode", "no_beta"),), about="LogN ablation: no beta"),
}

def _posthoc_logn(cfg, checkpoint: str, out_dir: Path, **normalizer_kwargs) -> str:
    """LogN: the statistics pass over the training set; returns the statistics file."""
    from taildet.calibration import LogitNormalizer, plot_logit_statistics
    from taildet.engine import calibrate_checkpoint
    from taildet.engine.train import build_datasets

    path = calibrate_checkpoint(cfg, checkpoint, str(out_dir / "logit_stats.json"), progress=False,
                                **normalizer_kwargs)
    # the paper's Fig. 2: per-class logit mean and std against training instance count
    train_set, _, _ = build_datasets(cfg, need_train=True)
    plot_logit_statistics(LogitNormalizer.load(path), train_set.instance_counts, out_dir / "logit_stats.png",
                          class_names=train_set.class_names)
    return path


def _posthoc_loga(cfg, checkpoint: str, out_dir: Path, prior_from: str = "image", tau: float = 1.0):
    """Post-hoc logit adjustment with the training prior; returns a ``model -> model`` function."""
    from taildet.calibration import LogitAdjuster, apply_logit_normalization
    from taildet.engine.train import build_datasets

    from taildet.calibration.statistics import _unwrap, model_kind

    train_set, _, _ = build_datasets(cfg, need_train=True)

    def adjust(model):
        # softmax heads (C + 1 outputs): the background column stays; sigmoid heads: every column
        m = _unwrap(model)
        loss = m.roi_heads.loss if model_kind(m) == "two_stage" else m.cls_loss
        background = loss.num_outputs() == loss.num_classes + 1
        adjuster = LogitAdjuster.from_dataset(train_set, prior_from=prior_from, tau=tau, background=background)
        return apply_logit_normalization(model, adjuster)

    return adjust


#: Training-free methods applied to a trained checkpoint: name -> function(cfg, checkpoint,
#: out_dir, **kwargs) returning what ``evaluate_checkpoint(calibration=...)`` takes.
POSTHOC: dict[str, object] = {"logn": _posthoc_logn, "loga": _posthoc_loga}

#: What ``taildet demo`` runs: the two-stage CE baseline and the same with repeat factor sampling.
DEMO_RECIPES = ("prior", "faster_ce", "faster_ce_rfs", "faster_ce+logn")

SUMMARY_KEYS = ("AP", "APr", "APc", "APf", "AP50", "AP75", "APs", "APm", "APl", "AR@300")


def configs_dir() -> Path:
    """The repository's ``configs/`` directory (taildet runs from a source checkout)."""
    return Path(__file__).resolve().parents[2] / "configs"


def resolve_recipe(name: str) -> Recipe:
    """The :class:`Recipe` of a recipe name, or a ``train`` recipe for a YAML path."""
    from taildet.errors import ConfigError

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
    from taildet.data.stats import dataset_stats

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
    import torch

    from taildet.config import apply_overrides, load_config
    from taildet.engine import finetune, train

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
    if kind == "finetune" and cfg.finetune.train.get("iterations"):
        return int(cfg.finetune.train["iterations"])
    return int(cfg.train.iterations or 0)


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

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm import tqdm

    from taildet.config import apply_overrides, load_config

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
    """Apply a training-free method (:data:`POSTHOC`) to a checkpoint and evaluate it."""
    from taildet.config import apply_overrides, load_config
    from taildet.engine import evaluate_checkpoint
    from taildet.errors import ConfigError

    method = POSTHOC.get(recipe.posthoc or "")
    if method is None:
        raise ConfigError(f"recipe {name}: unknown post-hoc method {recipe.posthoc!r} "
                          f"(known: {', '.join(POSTHOC) or 'none'})")
    cfg = apply_overrides(load_config(stage1_cfg_path), opts)
    kwargs = dict(recipe.posthoc_kwargs)
    calibration = method(cfg, checkpoint, out_dir, **kwargs)
    return _bbox(evaluate_checkpoint(cfg, checkpoint, calibration=calibration, out_dir=str(out_dir)))


def _plot_mean_scores(out: Path, ce: str, loce: str, specs: dict, run_opts, train_json: Path) -> None:
    """LOCE's Fig. 4: per-class mean classification score vs training instances, CE and LOCE.

    LOCE's scores are its Equilibrium Loss buffer; the CE model's are observed with the same EMA
    rule over the training set (no training).
    """
    import torch

    from taildet.config import apply_overrides, load_config
    from taildet.engine.calibrate import build_model_for_checkpoint
    from taildet.engine.train import build_datasets
    from taildet.sampling.memory import observe_mean_score, plot_mean_score_vs_instances

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


def run_compare(recipes: Iterable[str] | None, out_dir: str | Path, seed: int = 0,
                extra_opts: list[str] | None = None, progress: bool = True,
                title: str = "taildet compare", scale: float = 1.0, jobs: int | None = None,
                reuse: bool = False) -> dict:
    """Run ``recipes`` on the embedded dataset and write ``summary.json`` + ``report.md``.

    ``jobs`` trainings run at once, each in its own process with ``torch`` limited to
    ``cpu_count // jobs`` threads (default: one job per core, at most one per recipe). On a
    2-core machine two single-threaded trainings finish sooner than two 2-threaded ones in a row:
    the small detector gains little from a second thread.
    ``reuse``: a stage-1 recipe whose run directory already holds ``model_final.pth`` and
    ``metrics.json`` is not trained again (its fine-tune and post-hoc rows use that checkpoint).
    Returns the summary ``{recipe: {metric: percent}}``.
    """
    from taildet.data.stats import dataset_stats, format_stats, plot_long_tail
    from taildet.data.synthetic import make_dataset
    from taildet.evaluation import evaluate_lvis, format_metrics_table, save_metrics
    from taildet.errors import ConfigError
    from taildet.evaluation.report import per_class_table, plot_per_class_ap

    start = time.time()
    out = Path(out_dir)
    names = list(recipes) if recipes else list(RECIPES)
    specs = {n: resolve_recipe(n) for n in names}  # fail fast on a bad name

    data_root = out.parent / "data" / f"synthetic_seed{seed}_scale{scale:g}"
    common_opts = [f"data.root={data_root}", f"data.synthetic.seed={seed}",
                   f"data.synthetic.scale={scale}", f"train.seed={seed}"] + list(extra_opts or [])
    # stage 1 runs: every requested train recipe and every stage 1 a fine-tune or post-hoc row needs
    stage1 = [n for n in names if specs[n].kind == "train"]
    for n in names:
        dep = specs[n].stage1
        if specs[n].kind in ("finetune", "posthoc") and dep not in stage1:
            if dep not in RECIPES or RECIPES[dep].kind != "train":
                raise ConfigError(f"recipe {n}: stage1 {dep!r} is not a training recipe")
            stage1.append(dep)
            specs[dep] = RECIPES[dep]
    stage2 = [n for n in names if specs[n].kind == "finetune"]

    def run_opts(n: str) -> list[str]:
        return common_opts + [f"output_dir={out / n}"]

    # Before anything is written: every recipe's config with the options it will run with, and
    # the output folder (a bad --opts or a recipe YAML the report would overwrite fails at once).
    from taildet.config import apply_overrides, load_config
    from taildet.fileio import check_not_inputs, check_output_path

    for n in stage1 + stage2:
        apply_overrides(load_config(_config_path(specs[n])), run_opts(n))
    check_output_path(out, directory=True, what="compare output")
    check_not_inputs({f"compare output {f}": out / f for f in ("summary.json", "report.md", "long_tail.png")},
                     {f"recipe {n}": _config_path(specs[n]) for n in stage1 + stage2})
    out.mkdir(parents=True, exist_ok=True)

    info = make_dataset(data_root, seed=seed, scale=scale, progress=progress)
    train_json, val_json = Path(info["train_json"]), Path(info["val_json"])
    stats = dataset_stats(train_json)
    stats_text = format_stats(stats)
    print(stats_text)
    long_tail_png = plot_long_tail(stats, out / "long_tail.png")
    print(f"long-tail histogram: {long_tail_png}")
    counts = _train_counts(train_json)

    jobs = max(1, min(int(jobs or default_jobs()), max(len(stage1), len(stage2), 1)))
    print(f"\nrecipes: {', '.join(names)} ({jobs} parallel training job{'s' if jobs > 1 else ''})")

    done: dict[str, tuple[dict, float]] = {}
    if reuse:  # stage-1 runs already finished in this directory (model_final.pth + metrics.json)
        for n in list(stage1):
            final_ckpt, mfile = out / n / "model_final.pth", out / n / "metrics.json"
            if final_ckpt.exists() and mfile.exists():
                with open(mfile) as fh:
                    done[n] = (_bbox(json.load(fh)), 0.0)
                print(f"recipe {n}: reusing {final_ckpt}")
    todo = [n for n in stage1 if n not in done]
    done.update(_train_recipes([(n, "train", _config_path(specs[n]), run_opts(n), None) for n in todo],
                               jobs=min(jobs, max(1, len(todo))), progress=progress))
    final = {n: str(out / n / "model_final.pth") for n in stage1}
    done.update(_train_recipes(
        [(n, "finetune", _config_path(specs[n]), run_opts(n), final[specs[n].stage1]) for n in stage2],
        jobs=min(jobs, max(1, len(stage2))), progress=progress))

    all_metrics: dict[str, dict] = {}
    summary: dict[str, dict] = {}
    for name in names:
        spec = specs[name]
        t0 = time.time()
        if spec.kind == "prior":
            metrics = evaluate_lvis(val_json, prior_baseline_results(train_json, val_json, seed=seed))
            save_metrics(metrics, out / name / "metrics.json")
            seconds = time.time() - t0
        elif spec.kind == "posthoc":
            print(f"\n=== recipe {name} ({spec.posthoc} on {spec.stage1}) ===")
            metrics = _run_posthoc(name, spec, _config_path(specs[spec.stage1]), run_opts(spec.stage1),
                                   final[spec.stage1], out / name)
            seconds = time.time() - t0
        else:
            metrics, seconds = done[name]
        all_metrics[name] = metrics
        summary[name] = _percent(metrics)
        summary[name]["seconds"] = round(seconds, 1)
        rows = per_class_table(metrics, val_json)
        plot_per_class_ap(rows, out / f"per_class_ap_{name}.png", image_counts=counts)

    if "faster_ce+loce" in names:
        _plot_mean_scores(out, "faster_ce", "faster_ce+loce", specs, run_opts, train_json)

    table = format_metrics_table(all_metrics)
    print("\n" + table)
    from taildet.fileio import atomic_write_text

    atomic_write_text(json.dumps(summary, indent=2), out / "summary.json")
    lines = [f"# {title}", "", f"Embedded long-tail dataset (seed {seed}): `{train_json}`", "",
             "```", stats_text, "```", "", "![long tail](long_tail.png)", "",
             "## Results (LVIS federated AP, percent)", "", table, ""]
    for name in names:
        lines += [f"### {name}", "", f"![per-class AP {name}](per_class_ap_{name}.png)", ""]
    lines += [f"Total time: {time.time() - start:.0f} s.", ""]
    atomic_write_text("\n".join(lines), out / "report.md")
    print(f"\nreport: {out / 'report.md'}\nsummary: {out / 'summary.json'}")
    return summary


def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0, progress: bool = True,
             jobs: int | None = None) -> dict:
    """The main job: CE baseline vs repeat factor sampling on the embedded dataset."""
    return run_compare(DEMO_RECIPES, out_dir, seed=seed, progress=progress, jobs=jobs,
                       title="taildet demo: the long-tail problem on the embedded dataset")
