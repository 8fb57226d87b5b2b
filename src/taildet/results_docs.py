"""Result tables and plots from ``taildet compare`` summaries, and the generated blocks of the docs.

Every result number in README.md and docs/RESULTS.md comes from a committed summary file
(``docs/results/<run>.json``, a copy of a ``taildet compare`` run's ``summary.json``) through a
marked block::

    <!-- BEGIN GENERATED recipes docs/results/evidence_embedded.json recipes=faster_ce,faster_ce_rfs -->
    ... the table, written by ``taildet docs`` ...
    <!-- END GENERATED -->

Kinds: ``recipes`` (mean and 95 % interval per metric), ``paired`` (differences to baselines),
``claims`` (the claims table with verdicts), ``argmax`` (LogN's background-argmax diagnostic),
``gradient_ratio`` (EFL's accumulated gradient ratio per checkpoint), all
from a compare summary; ``table`` (a measured table from a benchmark's ``--json`` file, written
by :func:`write_table_summary`, with the machine and command it was measured with); and
``gpu_suite`` (issue 18's GPU suite, ``benchmarks/gpu_suite.py --out``, rendered by
:mod:`taildet.results_docs_gpu`; a file not committed yet renders as one line saying so). Options:
``recipes=a,b`` (rows, in that order), ``metrics=AP,APr`` (columns or rows), ``claims=id1,id2``,
``table=NAME`` (which table of a benchmark file). ``taildet docs`` rewrites the blocks;
``taildet docs --check`` (and a test) fails when a block differs from what its summary gives.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from taildet.errors import ConfigError, DataError
from taildet.results_docs_gpu import format_gpu_suite, load_gpu_suite
from taildet.utils.machine import machine_info
from taildet.fileio import atomic_write_text

METRICS = ("AP", "APr", "APc", "APf", "AP50")
VERDICT_COLOURS = {"holds": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:gray",
                   "not run": "white"}

BLOCK = re.compile(
    r"(?P<begin><!-- BEGIN GENERATED (?P<args>[^>]*?) -->\n)(?P<body>.*?)(?P<end><!-- END GENERATED -->)",
    re.S)


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------

def _num(v: float | None, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def _ci(ci: Sequence[float] | None, signed: bool = True) -> str:
    return "-" if not ci else f"[{_num(ci[0], signed)}, {_num(ci[1], signed)}]"


def format_mean(stat: Mapping) -> str:
    """``mean ± half-width of the 95 % interval`` (the mean alone for one replicate)."""
    if stat.get("mean") is None:
        return "-"
    if not stat.get("ci95"):
        return _num(stat["mean"])
    half = (stat["ci95"][1] - stat["ci95"][0]) / 2.0
    return f"{_num(stat['mean'])} ± {half:.1f}"


def _select(names: Sequence[str], wanted: Sequence[str] | None, what: str, source: str) -> list[str]:
    if not wanted:
        return list(names)
    missing = [w for w in wanted if w not in names]
    if missing:
        raise DataError(source, what, f"not in the summary: {', '.join(missing)}")
    return list(wanted)


def format_recipe_table(summary: Mapping, recipes: Sequence[str] | None = None,
                        metrics: Sequence[str] = METRICS, source: str = "summary") -> str:
    """Markdown: one row per recipe, ``mean ± half-width`` of the 95 % t interval per metric."""
    names = _select(list(summary["recipes"]), recipes, "recipes", source)
    lines = ["| recipe | n | " + " | ".join(metrics) + " |",
             "|:---|---:|" + "|".join("---:" for _ in metrics) + "|"]
    for n in names:
        stats = summary["recipes"][n]["stats"]
        count = max((stats[m]["n"] for m in metrics if m in stats), default=0)
        lines.append(f"| {n} | {count} | " + " | ".join(format_mean(stats.get(m, {})) for m in metrics) + " |")
    return "\n".join(lines)


def format_paired_table(summary: Mapping, recipes: Sequence[str] | None = None,
                        metrics: Sequence[str] = METRICS, source: str = "summary") -> str:
    """Markdown: one row per (recipe, baseline, metric): mean difference, both 95 % intervals,
    verdict (``higher`` is the direction tested)."""
    rows = [p for p in summary["paired"] if p["metric"] in metrics]
    if recipes:
        _select(sorted({p["recipe"] for p in summary["paired"]}), recipes, "recipes", source)
        rows = [p for r in recipes for p in rows if p["recipe"] == r]
    lines = ["| recipe | baseline | metric | n | difference | 95 % CI (seeds) | 95 % CI (classes) | verdict |",
             "|:---|:---|:---|---:|---:|:---:|:---:|:---|"]
    for p in rows:
        lines.append(f"| {p['recipe']} | {p['baseline']} | {p['metric']} | {p['n']} | {_num(p['mean'], True)} | "
                     f"{_ci(p['ci95'])} | {_ci(p['bootstrap_ci95'])} | {p['verdict']} |")
    return "\n".join(lines)


def format_claims_table(summary: Mapping, claims: Sequence[str] | None = None, source: str = "summary") -> str:
    """Markdown: the claims table, one row per claim, with its numbers and verdict."""
    rows = summary["claims"]
    if claims:
        _select([c["id"] for c in rows], claims, "claims", source)
        rows = [c for i in claims for c in rows if c["id"] == i]
    lines = ["| claim | paper | recipe vs baseline | metric | n | difference | 95 % CI (seeds) | "
             "95 % CI (classes) | verdict |",
             "|:---|:---|:---|:---|---:|---:|:---:|:---:|:---|"]
    for c in rows:
        arrow = ">" if c["direction"] == "higher" else "<"
        lines.append(f"| {c['claim']} | {c['paper']} | {c['recipe']} {arrow} {c['baseline']} | {c['metric']} | "
                     f"{c['n']} | {_num(c['mean'], True)} | {_ci(c['ci95'])} | {_ci(c['bootstrap_ci95'])} | "
                     f"{c['verdict']} |")
    return "\n".join(lines)


def format_argmax_table(summary: Mapping, recipes: Sequence[str] | None = None, source: str = "summary") -> str:
    """Markdown: LogN's background-argmax diagnostic -- per recipe and logit variant (raw, LogN,
    LogN with beta none), the share of positive training RoIs whose argmax is the background
    column, per frequency group, mean over the replicates that measured it (percent)."""
    with_diag = [n for n, r in summary["recipes"].items()
                 if any("background_argmax_share" in run for run in r["runs"].values())]
    names = _select(with_diag, recipes, "recipes", source)
    lines = ["| recipe | logits | n | r | c | f | all |", "|:---|:---|---:|---:|---:|---:|---:|"]
    for n in names:
        diags = [run["background_argmax_share"] for run in summary["recipes"][n]["runs"].values()
                 if "background_argmax_share" in run]
        for variant in diags[0]:
            cells = []
            for g in ("r", "c", "f", "all"):
                vals = [d[variant][g] for d in diags if d.get(variant, {}).get(g) is not None]
                cells.append(_num(sum(vals) / len(vals)) if vals else "-")
            lines.append(f"| {n} | {variant} | {len(diags)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_gradient_ratio_table(summary: Mapping, recipes: Sequence[str] | None = None,
                                source: str = "summary") -> str:
    """Markdown: EFL / EQFL's accumulated gradient ratio ``r = G+ / G-`` per checkpoint
    (:mod:`taildet.analysis.gradient_ratio`): per frequency group the smallest and the median
    unclamped ratio, and the share of all classes with ``r < 1`` (where EFL differs from focal),
    each the mean over the replicates that measured it."""
    with_diag = [n for n, r in summary["recipes"].items()
                 if any("gradient_ratio" in run for run in r["runs"].values())]
    names = _select(with_diag, recipes, "recipes", source)
    lines = ["| recipe | iteration | n | r: min / median | c: min / median | f: min / median | classes with r < 1 (%) |",
             "|:---|---:|---:|---:|---:|---:|---:|"]

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    for n in names:
        diags = [run["gradient_ratio"] for run in summary["recipes"][n]["runs"].values() if "gradient_ratio" in run]
        for it in diags[0]:
            per = [d[it] for d in diags if it in d]
            cells = []
            for g in ("r", "c", "f"):
                lo = mean([p.get(g, {}).get("min") for p in per])
                med = mean([p.get(g, {}).get("median") for p in per])
                cells.append("-" if lo is None else f"{lo:.2f} / {med:.2f}")
            below = mean([p.get("all", {}).get("below_1") for p in per])
            lines.append(f"| {n} | {it} | {len(per)} | " + " | ".join(cells) + f" | {_num(below)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    import matplotlib  # optional: matplotlib, imported on use

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # optional: matplotlib, imported on use

    return Figure(figsize=(width, height))


def plot_recipe_metrics(summary: Mapping, out_png: str | Path, metrics: Sequence[str] = ("AP", "APr", "APc", "APf"),
                        recipes: Sequence[str] | None = None) -> Path:
    """Grouped bars: each recipe's mean per metric, error bars = the 95 % t interval."""
    names = list(recipes or summary["recipes"])
    fig = _figure(max(6.0, 0.9 * len(names) + 2), 4.5)
    ax = fig.subplots()
    x = np.arange(len(names))
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        stats = [summary["recipes"][n]["stats"].get(m, {}) for n in names]
        means = [s.get("mean") if s.get("mean") is not None else np.nan for s in stats]
        err = [[(s["mean"] - s["ci95"][0]) if s.get("ci95") else 0.0 for s in stats],
               [(s["ci95"][1] - s["mean"]) if s.get("ci95") else 0.0 for s in stats]]
        ax.bar(x + (i - (len(metrics) - 1) / 2) * width, means, width, yerr=err, capsize=2, label=m)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("AP (%)")
    reps = max((summary["recipes"][n]["stats"]["AP"]["n"] for n in names), default=0)
    ax.set_title(f"{summary.get('title', '')}: mean over {reps} replicate(s), 95 % t interval", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


def plot_claims_forest(summary: Mapping, out_png: str | Path) -> Path:
    """Forest plot of the claims: difference (recipe - baseline) with its seed interval (thick)
    and class-bootstrap interval (thin), coloured by verdict; claims not run are left out."""
    rows = [c for c in summary["claims"] if c["mean"] is not None]
    fig = _figure(8.0, max(2.5, 0.32 * len(rows) + 1.2))
    ax = fig.subplots()
    for i, c in enumerate(reversed(rows)):
        colour = VERDICT_COLOURS.get(c["verdict"], "black")
        sign = 1.0 if c["direction"] == "higher" else -1.0   # plotted so that right = as claimed
        if c["bootstrap_ci95"]:
            lo, hi = sorted(sign * v for v in c["bootstrap_ci95"])
            ax.plot([lo, hi], [i - 0.22, i - 0.22], color=colour, lw=1.5, alpha=0.9)
        if c["ci95"]:
            lo, hi = sorted(sign * v for v in c["ci95"])
            ax.plot([lo, hi], [i, i], color=colour, lw=4, alpha=0.8)
        ax.plot([sign * c["mean"]], [i], "o", color="black", ms=4)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{c['id']} ({c['metric']})" for c in reversed(rows)], fontsize=7)
    ax.set_xlabel("difference in the claimed direction (AP points; > 0: as claimed)")
    ax.set_title("claims: seeds 95 % CI (thick), classes 95 % CI (thin, below); green holds, "
                 "red contradicted, grey inconclusive",
                 fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


# ------------------------------------------------------------------------------------------------
# generated blocks in Markdown files
# ------------------------------------------------------------------------------------------------

def _parse_args(args: str, where: str) -> tuple[str, str, dict[str, list[str]]]:
    parts = args.split()
    if len(parts) < 2 or parts[0] not in RENDERERS:
        raise ConfigError(f"{where}: a generated block starts '<!-- BEGIN GENERATED KIND SUMMARY.json "
                          f"[key=a,b ...] -->' with KIND one of {', '.join(RENDERERS)}; got {args!r}")
    opts = {}
    for p in parts[2:]:
        key, sep, value = p.partition("=")
        if not sep or key not in ("recipes", "metrics", "claims", "table"):
            raise ConfigError(f"{where}: unknown option {p!r} (recipes=, metrics=, claims=, table=)")
        opts[key] = [v for v in value.split(",") if v]
    return parts[0], parts[1], opts


def _render_recipes(summary, opts, source):
    return format_recipe_table(summary, opts.get("recipes"), opts.get("metrics") or METRICS, source)


def _render_paired(summary, opts, source):
    return format_paired_table(summary, opts.get("recipes"), opts.get("metrics") or METRICS, source)


def _render_claims(summary, opts, source):
    return format_claims_table(summary, opts.get("claims"), source)


def _render_argmax(summary, opts, source):
    return format_argmax_table(summary, opts.get("recipes"), source)


def _render_table(summary, opts, source):
    names = opts.get("table") or []
    if len(names) != 1:
        raise ConfigError(f"{source}: a 'table' block names one table (table=NAME)")
    return format_measured_table(summary, names[0], source)


def _render_gradient_ratio(summary, opts, source):
    return format_gradient_ratio_table(summary, opts.get("recipes"), source)


def _render_gpu_suite(summary, opts, source):
    return format_gpu_suite(summary, source)


RENDERERS = {"recipes": _render_recipes, "paired": _render_paired, "claims": _render_claims,
             "argmax": _render_argmax, "gradient_ratio": _render_gradient_ratio, "table": _render_table,
             "gpu_suite": _render_gpu_suite}


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise DataError(str(path), "file", f"cannot read ({err.strerror or err})") from None
    except ValueError as err:
        raise DataError(str(path), "file", f"not valid JSON ({err})") from None


def load_summary(path: str | Path) -> dict:
    """A compare ``summary.json`` (format with ``recipes`` / ``paired`` / ``claims``)."""
    path = Path(path)
    summary = _read_json(path)
    if not isinstance(summary, dict) or not {"recipes", "paired", "claims"} <= set(summary):
        raise DataError(str(path), "file", "not a taildet compare summary (needs recipes, paired, claims)")
    return summary


# ------------------------------------------------------------------------------------------------
# measured tables (benchmarks)
# ------------------------------------------------------------------------------------------------

def write_table_summary(path: str | Path, title: str, tables: Mapping[str, Mapping], command: str) -> Path:
    """Write a benchmark's measured tables as a summary the docs can name (``table`` blocks).

    ``tables[name] = {"columns": [str], "formats": [format spec per column, e.g. ".2f", "d", "s"],
    "rows": [[value per column]]}`` (``None`` renders as ``-``). The file also records the date,
    the machine (:func:`taildet.utils.machine.machine_info`) and ``command``, and the generated block
    shows them above the table, so a number in the docs always says where it was measured.
    """
    for name, t in tables.items():
        cols, fmts = list(t["columns"]), list(t["formats"])
        if len(cols) != len(fmts) or any(len(r) != len(cols) for r in t["rows"]):
            raise ValueError(f"table {name!r}: every row and the formats need one entry per column ({len(cols)})")
    doc = {"kind": "measured tables", "title": title, "command": command,
           "date": datetime.date.today().isoformat(), "machine": machine_info(),
           "tables": {n: {"columns": list(t["columns"]), "formats": list(t["formats"]),
                          "rows": [list(r) for r in t["rows"]]} for n, t in tables.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(doc, indent=1) + "\n", path)
    return path


def load_measured_tables(path: str | Path) -> dict:
    """A file written by :func:`write_table_summary`."""
    path = Path(path)
    doc = _read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("tables"), dict):
        raise DataError(str(path), "file", "not a measured-tables file (needs 'tables'; written by a benchmark's --json)")
    return doc


def _cell(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def format_measured_table(doc: Mapping, name: str, source: str = "benchmark") -> str:
    """Markdown: a caption (date, machine, command) and the table ``name`` of a measured-tables file."""
    if name not in doc["tables"]:
        raise DataError(source, "table", f"{name!r} not in the file (has: {', '.join(doc['tables'])})")
    t = doc["tables"][name]
    m = doc.get("machine", {})
    caption = (f"Measured {doc.get('date', '?')} on {m.get('machine', '?')} ({m.get('cpu_capability', '?')}, "
               f"{m.get('cpus', '?')} CPUs), torch {m.get('torch', '?')}: `{doc.get('command', '?')}`")
    numeric = [not spec.endswith("s") for spec in t["formats"]]
    lines = [caption, "", "| " + " | ".join(t["columns"]) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    for row in t["rows"]:
        lines.append("| " + " | ".join(_cell(v, f) for v, f in zip(row, t["formats"])) + " |")
    return "\n".join(lines)


def render_markdown(text: str, root: str | Path, where: str = "markdown") -> str:
    """``text`` with every generated block rewritten from its summary (paths relative to ``root``)."""
    cache: dict[str, dict] = {}

    def replace(m: re.Match) -> str:
        kind, rel, opts = _parse_args(m.group("args"), where)
        if rel not in cache:
            loader = {"table": load_measured_tables, "gpu_suite": load_gpu_suite}.get(kind, load_summary)
            cache[rel] = loader(Path(root) / rel)
        body = RENDERERS[kind](cache[rel], opts, rel)
        return m.group("begin") + body + "\n" + m.group("end")

    return BLOCK.sub(replace, text)


#: The Markdown files whose generated blocks ``taildet docs`` maintains (relative to the repo).
DOC_FILES = ("README.md", "docs/RESULTS.md")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def update_docs(files: Sequence[str | Path] | None = None, root: str | Path | None = None,
                check: bool = False) -> list[str]:
    """Rewrite (or, with ``check``, only compare) the generated blocks of ``files``.

    Returns the files whose blocks differ from their summaries (with ``check``: nothing is
    written; otherwise those files were rewritten).
    """
    root = Path(root) if root is not None else repo_root()
    stale = []
    for f in files or DOC_FILES:
        path = Path(f) if Path(f).is_absolute() else root / f
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(str(path), "file", f"cannot read the Markdown file ({getattr(err, 'strerror', None) or err})") from None
        new = render_markdown(text, root, where=str(path))
        if new != text:
            stale.append(str(f))
            if not check:
                atomic_write_text(new, path)
    return stale
