"""``taildet compare --recipes A.yaml B.yaml ...`` with classification configs.

A recipe is classification when its YAML has ``data.manifest`` (:func:`is_classify_recipe`);
``taildet compare`` hands a list of them to :func:`run_classify_compare`, which trains each config
once per seed (``train.seed``; run directories ``OUT/<recipe>/seed<s>``, finished runs reused,
interrupted ones resumed) and writes one table: a row per recipe and per post-hoc method it
evaluates (``<recipe> + logn`` ...), mean ± 95 % t-interval over seeds and the paired difference
of few-shot and mean per-class accuracy to the first recipe's raw row
(:mod:`taildet.evidence`). A cRT recipe whose ``model.init_from`` is another listed recipe's
``<output_dir>/model_final.pth`` starts, in each seed, from that recipe's run of the same seed.

Outputs: ``OUT/runs.json`` (every metric of every run), ``OUT/summary.json`` (a measured-tables
file, as ``taildet classify demo`` writes) and ``OUT/table.md``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from taildet.classify.config import load_classify_config
from taildet.classify.demo import _fmt, _run
from taildet.config.loading import _read_yaml
from taildet.errors import ConfigError
from taildet.evidence import paired_difference, seed_statistics
from taildet.fileio import atomic_write_text, check_output_path
from taildet.results_docs import write_table_summary

__all__ = ["is_classify_recipe", "run_classify_compare"]

_KEYS = ("top1", "many", "medium", "few", "mean_class_acc")
COLUMNS = ["recipe", "top-1", "many", "medium", "few", "mean per-class", "few - first (95% CI)",
           "mean per-class - first (95% CI)"]


def is_classify_recipe(recipe: str) -> bool:
    """True for a YAML file whose ``data:`` has a ``manifest`` (a ``taildet classify`` config)."""
    if not str(recipe).endswith((".yaml", ".yml")) or not os.path.isfile(recipe):
        return False
    try:
        raw = _read_yaml(recipe)
    except ConfigError:
        return False
    return isinstance(raw.get("data"), dict) and "manifest" in raw["data"]


def run_classify_compare(recipes: Iterable[str], out_dir: str | os.PathLike, seeds: Iterable[int] = (0,),
                         opts: Iterable[str] = (), progress: bool = True) -> dict[str, Any]:
    """Train / evaluate every classification recipe over ``seeds``; returns the written files and table."""
    recipes, seeds, out = list(recipes), list(seeds), Path(out_dir)
    if not recipes:
        raise ConfigError("compare: no classification recipe given")
    check_output_path(out, directory=True, what="compare")
    names = [Path(r).stem for r in recipes]
    if len(set(names)) != len(names):
        raise ConfigError(f"compare: recipe names (file stems) must differ, got {names}")
    base = {n: load_classify_config(r, list(opts)) for n, r in zip(names, recipes)}  # errors before any run
    finals = {os.path.abspath(os.path.join(c.output_dir, "model_final.pth")): n for n, c in base.items()}
    runs: dict[str, dict[str, dict]] = {n: {} for n in names}
    for s in seeds:
        ckpts: dict[str, str] = {}
        for n, r in zip(names, recipes):
            over = list(opts) + [f"train.seed={s}", f"output_dir={out / n / f'seed{s}'}"]
            init = base[n].model.init_from
            dep = finals.get(os.path.abspath(init)) if init else None
            if dep is not None:
                if dep not in ckpts:
                    raise ConfigError(f"compare: {r} starts from {dep}'s checkpoint: list {dep} before it")
                over.append(f"model.init_from={ckpts[dep]}")
            res = _run(load_classify_config(r, over), progress)
            ckpts[n] = res["checkpoint"]
            runs[n][f"seed{s}"] = res["metrics"]
    first = names[0]

    def values(n: str, method: str, key: str) -> dict[str, float]:
        return {s: m["methods"][method][key] for s, m in runs[n].items()}

    rows, stats = [], {}
    for n in names:
        for method in next(iter(runs[n].values()))["methods"]:
            label = n if method == "raw" else f"{n} + {method}"
            st = {k: seed_statistics(list(values(n, method, k).values())) for k in _KEYS}
            st["few_minus_first"] = paired_difference(values(n, method, "few"), values(first, "raw", "few"))
            st["mean_class_acc_minus_first"] = paired_difference(values(n, method, "mean_class_acc"),
                                                                 values(first, "raw", "mean_class_acc"))
            stats[label] = st
            same = label == first
            rows.append([label] + [_fmt(st[k]) for k in _KEYS]
                        + ["-" if same else _fmt(st["few_minus_first"], True),
                           "-" if same else _fmt(st["mean_class_acc_minus_first"], True)])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({"recipes": dict(zip(names, recipes)), "seeds": seeds, "runs": runs,
                                  "statistics": stats}, indent=1) + "\n", out / "runs.json")
    table = {"columns": COLUMNS, "formats": ["s"] * len(COLUMNS), "rows": rows}
    title = f"classification recipes over {len(seeds)} seed(s): accuracy (%), mean ± 95% t-interval half-width"
    command = "taildet compare --recipes " + " ".join(recipes) + " --seeds " + " ".join(map(str, seeds))
    write_table_summary(out / "summary.json", title, {"classify": table}, command)
    md = "\n".join(["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
                   + ["| " + " | ".join(r) + " |" for r in rows])
    atomic_write_text(md + "\n", out / "table.md")
    print(md)
    return {"table": md, "summary": str(out / "summary.json"), "runs": str(out / "runs.json")}
