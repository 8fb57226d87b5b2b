"""Running ``taildet compare`` and ``taildet demo``: trainings (in this process or ``jobs`` worker
processes, one progress bar), reuse of finished runs, post-hoc rows, and the summary / report files."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Iterable

import torch
import yaml

from taildet import evidence
from taildet.analysis.gradient_ratio import gradient_ratio_report
from taildet.analysis.error_report import compare_error_sections
from taildet.calibration.calibrators import LogN
from taildet.config import apply_overrides, load_config
from taildet.data.stats import dataset_stats, format_stats, plot_long_tail
from taildet.data.synthetic import make_dataset
from taildet.engine import finetune, train
from taildet.engine.checkpoint import last_checkpoint
from taildet.engine.pretrain import REGIMES
from taildet.engine.rundir import check_resume_config
from taildet.errors import ConfigError
from taildet.evaluation import evaluate_lvis, report, save_metrics
from taildet.fileio import atomic_write_text, check_not_inputs, check_output_path
from taildet.results_docs import (format_claims_table, format_paired_table, format_recipe_table, plot_claims_forest,
                                  plot_recipe_metrics)
from taildet.compare.posthoc import _plot_mean_scores, _run_posthoc
from taildet.compare.grids import detection_grid_section
from taildet.recipes import DEMO_RECIPES, RECIPES, _config_path, expand_recipes, replicate_name
from taildet.compare.summary import (_argmax_diagnostic, _bbox, _run_row, _train_counts, default_jobs, machine_info,
                                     prior_baseline_results, summarize)


def _resumable(run_dir: Path, cfg) -> bool:
    """True when ``run_dir`` holds an interrupted run of exactly ``cfg`` (a checkpoint and the same
    config): ``--reuse`` continues it instead of starting over."""
    if (run_dir / "metrics.json").exists() or last_checkpoint(str(run_dir)) is None:
        return False
    try:
        with open(run_dir / "config.yaml") as fh:
            check_resume_config(yaml.safe_load(fh), cfg, str(run_dir))
    except (OSError, yaml.YAMLError, ConfigError):
        return False
    return True


def _run_one(name: str, kind: str, cfg_path: str, opts: list[str], from_checkpoint: str | None,
             threads: int, progress: bool = False, resume: bool = False) -> tuple[str, dict, float]:
    """Train or fine-tune one recipe (in this process or a worker); returns (name, bbox metrics, s).
    ``resume``: continue an interrupted run in the recipe's directory when it is one of this exact
    config (:func:`_resumable`), else start it over."""
    if threads > 0:
        torch.set_num_threads(threads)
    t0 = time.time()
    cfg = apply_overrides(load_config(cfg_path), opts)
    resume = resume and _resumable(Path(cfg.output_dir), cfg)
    if resume:
        print(f"recipe {name}: continuing the interrupted run in {cfg.output_dir}", flush=True)
    if kind == "finetune":
        out = finetune(cfg, from_checkpoint, resume=resume, progress=progress)
    else:
        out = train(cfg, resume=resume, progress=progress)
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


def _train_recipes(runs: list[tuple], jobs: int, progress: bool, resume: bool = False) -> dict[str, tuple[dict, float]]:
    """Run ``runs`` ([(name, kind, config, overrides, from_checkpoint)]), ``jobs`` at once;
    ``resume``: interrupted runs of the same config continue (``--reuse``).

    With one job each run trains in this process with its own progress bar; with several, each
    in a worker process and one bar follows the iterations of all (read from ``metrics.jsonl``).
    """
    out: dict[str, tuple[dict, float]] = {}
    if not runs:
        return out
    if jobs <= 1:
        for name, kind, cfg_path, opts, ckpt in runs:
            print(f"\n=== recipe {name} ===")
            _, metrics, seconds = _run_one(name, kind, str(cfg_path), opts, ckpt, 0, progress, resume)
            out[name] = (metrics, seconds)
        return out

    from tqdm import tqdm  # optional: tqdm, imported on use

    threads = max(1, default_jobs() // jobs)
    totals, logs = {}, {}
    for name, kind, cfg_path, opts, _ in runs:
        cfg = apply_overrides(load_config(cfg_path), opts)
        totals[name] = _planned_iterations(kind, cfg)
        logs[name] = Path(cfg.output_dir) / "metrics.jsonl"
        if logs[name].exists() and not (resume and _resumable(logs[name].parent, cfg)):
            logs[name].unlink()  # a fresh run: do not read an old run's progress
    bar = tqdm(total=sum(totals.values()) or None, desc=f"training {len(runs)} recipes", unit="it",
               disable=not progress)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        pending = {pool.submit(_run_one, n, k, str(c), o, ck, threads, False, resume) for n, k, c, o, ck in runs}
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


def _reusable(run_dir: Path, kind: str, val_json: Path | None = None) -> dict | None:
    """The bbox metrics of a finished run in ``run_dir`` (``metrics.json``, and ``model_final.pth``
    for trained rows), or ``None``. A run evaluated before APpool existed gets it computed here
    from its ``results_bbox.json`` against ``val_json`` (in memory: the run's files are not changed)."""
    mfile = run_dir / "metrics.json"
    if not mfile.exists() or (kind in ("train", "finetune") and not (run_dir / "model_final.pth").exists()):
        return None
    with open(mfile) as fh:
        metrics = _bbox(json.load(fh))
    results = run_dir / "results_bbox.json"
    if "APpool" not in metrics and val_json is not None and results.exists():
        metrics = dict(metrics, APpool=evaluate_lvis(val_json, results)["APpool"])
    return metrics


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
                m = _reusable(out / rep / n, "train", data[d]["val"])
                if m is not None:
                    done[f"{rep}/{n}"] = (m, 0.0)
                    reused.add(f"{rep}/{n}")
            for n in stage2 + posthoc:
                m = _reusable(out / rep / n, specs[n].kind, data[d]["val"])
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
        done.update(_train_recipes(runs, jobs=min(jobs, max(1, len(runs))), progress=progress, resume=reuse))

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
    recipe_table = format_recipe_table(summary, metrics=evidence.METRICS)  # with APpool (cross-class ranking)
    print("\n" + recipe_table)
    lines = [f"# {title}", "", f"Embedded long-tail dataset (data seeds {data_seeds}, training seeds {seeds}, "
             f"regime {regime}): `{data[data_seeds[0]]['train']}`", "",
             "```", stats_text, "```", "", "![long tail](long_tail.png)", "",
             "## Results (LVIS federated AP, percent; mean and 95 % t interval over replicates)", "",
             recipe_table, "", "APpool: every class's detections ranked together into one precision / recall "
             "curve (Dave et al. 2021), so it also scores how comparable the scores are across classes.", "",
             "![metrics by recipe](metrics_by_recipe.png)", ""]
    if summary["paired"]:
        lines += ["## Paired differences to each recipe's baseline", "",
                  format_paired_table(summary, metrics=evidence.METRICS), ""]
    if summary["claims"]:
        plot_claims_forest(summary, out / "claims_forest.png")
        lines += ["## Claims", "", format_claims_table(summary), "", "![claims](claims_forest.png)", ""]
    first = reps[0][2]
    for name in names:
        lines += [f"### {name}", "", f"![per-class AP {name}]({first}/per_class_ap_{name}.png)", ""]
    lines += compare_error_sections(out, first, names, data[reps[0][0]]["val"])  # issue 15: error analysis
    lines += detection_grid_section(summary, names, out, first, data[reps[0][0]]["val"])
    lines += [f"Total time: {time.time() - start:.0f} s.", ""]
    atomic_write_text("\n".join(lines), out / "report.md")
    print(f"\nreport: {out / 'report.md'}\nsummary: {out / 'summary.json'}")
    return summary


def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0, progress: bool = True,
             jobs: int | None = None) -> dict:
    """The main job: CE baseline vs repeat factor sampling on the embedded dataset."""
    return run_compare(DEMO_RECIPES, out_dir, seeds=(seed,), progress=progress, jobs=jobs,
                       title="taildet demo: the long-tail problem on the embedded dataset")
