"""Evidence over seeds: confidence intervals, paired differences, the claims table, verdicts.

A single training run of the embedded benchmark moves by several AP points with its seed, as
much as most effects the seed papers claim. So a claim about a method is judged from a
*difference to its baseline* with a confidence interval, never from one run:

* :func:`seed_statistics` -- mean, sample standard deviation and the 95 % Student-t interval of a
  metric over replicates (training seeds, optionally crossed with data seeds);
* :func:`paired_difference` -- the same for ``recipe - baseline`` over the replicates both ran
  (seeds paired: replicate ``r`` of the recipe is compared with replicate ``r`` of the baseline);
* :func:`paired_bootstrap` -- a percentile interval for the same difference that also reflects the
  finite set of *classes*: classes are resampled with replacement (within the metric's frequency
  group), the seed pairing is kept, and the statistic is the mean over replicates of the mean
  per-class AP difference -- the quantity AP itself averages;
* :func:`verdict` -- ``holds`` / ``contradicted`` / ``inconclusive`` from both intervals;
* :data:`CLAIMS_FILE` -- each seed paper's claim as data (paper, claim, recipe, baseline,
  metric, direction), evaluated by :func:`evaluate_claims`.

All functions are pure (no files, no training); ``taildet compare`` feeds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import yaml

from taildet.errors import ConfigError
from taildet.recipes import RECIPES

#: Metrics summarised over seeds, in the order tables show them (APpool: pooled AP, Dave et al.
#: 2021; absent from summaries written before it, where its statistics have n = 0).
METRICS = ("AP", "APr", "APc", "APf", "AP50", "APpool")
#: Metrics that are means of per-class AP (so a class bootstrap applies): metric -> group or None.
PER_CLASS_METRICS = {"AP": None, "APr": "r", "APc": "c", "APf": "f"}
#: Confidence level of every interval.
LEVEL = 0.95
#: Default number of bootstrap resamples.
BOOTSTRAP_RESAMPLES = 2000

VERDICTS = ("holds", "contradicted", "inconclusive")


def t_quantile(df: int, level: float = LEVEL) -> float:
    """Two-sided Student-t critical value ``t_{(1 + level) / 2, df}`` (``scipy.stats.t``)."""
    from scipy.stats import t  # optional: scipy, imported on use

    return float(t.ppf(0.5 + level / 2.0, df))


def seed_statistics(values: Sequence[float | None], level: float = LEVEL) -> dict:
    """Mean, sample std (ddof 1) and the Student-t interval of ``values`` (one per replicate).

    ``None`` / NaN values (a metric undefined in a run) are left out. With fewer than two values
    the std and interval are ``None``: one run has no spread to estimate.
    Returns ``{"n", "mean", "std", "ci95": [lo, hi] | None}``.
    """
    x = np.array([float(v) for v in values if v is not None and not math.isnan(float(v))], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = float(x.mean())
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = float(x.std(ddof=1))
    half = t_quantile(n - 1, level) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def paired_difference(recipe: Mapping[str, float | None], baseline: Mapping[str, float | None],
                      level: float = LEVEL) -> dict:
    """:func:`seed_statistics` of ``recipe[r] - baseline[r]`` over the replicates ``r`` both have.

    ``recipe`` and ``baseline`` map a replicate key (e.g. ``"seed0"``) to the metric's value.
    The result also lists the per-replicate differences (``"values"``).
    """
    keys = [r for r in recipe if r in baseline and recipe[r] is not None and baseline[r] is not None]
    diffs = [float(recipe[r]) - float(baseline[r]) for r in keys]
    out = seed_statistics(diffs, level)
    out["values"] = dict(zip(keys, diffs))
    return out


def paired_bootstrap(recipe: Mapping[str, Mapping[str, float | None]],
                     baseline: Mapping[str, Mapping[str, float | None]],
                     classes: Sequence[str], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> list[float] | None:
    """Percentile interval of the mean per-class difference, classes resampled, seeds paired.

    ``recipe[r][c]`` / ``baseline[r][c]``: the AP of class ``c`` in replicate ``r`` (``None`` when
    undefined). ``classes``: the classes the metric averages (e.g. the rare ones for APr).
    Each resample draws ``len(classes)`` classes with replacement -- the same draw for every
    replicate -- and computes, per replicate, the mean difference over the drawn classes that are
    defined in both runs of that replicate, then the mean over replicates. Returns ``[lo, hi]``
    (the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles), or ``None`` when no class is
    defined in any shared replicate. Deterministic for a given ``seed``.
    """
    reps = [r for r in recipe if r in baseline]
    classes = list(classes)
    if not reps or not classes:
        return None
    d = np.full((len(reps), len(classes)), np.nan)
    for i, r in enumerate(reps):
        for j, c in enumerate(classes):
            a, b = recipe[r].get(c), baseline[r].get(c)
            if a is not None and b is not None and not (math.isnan(float(a)) or math.isnan(float(b))):
                d[i, j] = float(a) - float(b)
    valid = ~np.isnan(d)
    if not valid.any():
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(classes), size=(resamples, len(classes)))
    vals = np.where(valid, d, 0.0)
    # per resample and replicate: sum and count of the drawn, defined differences
    sums = vals[:, idx].sum(axis=2)        # [reps, resamples]
    counts = valid[:, idx].sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_rep = sums / counts            # NaN where a replicate drew no defined class
    stat = np.nanmean(np.where(counts > 0, per_rep, np.nan), axis=0)
    stat = stat[~np.isnan(stat)]
    if stat.size == 0:
        return None
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stat, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


def verdict(direction: str, seed_ci: Sequence[float] | None, bootstrap_ci: Sequence[float] | None) -> str:
    """The verdict on "recipe is ``direction`` than baseline" from the two 95 % intervals.

    ``direction``: ``"higher"`` or ``"lower"``. The rule:

    * ``holds`` -- the seed (t) interval lies entirely on the claimed side of 0, and so does the
      class-bootstrap interval where there is one (AP50 has no per-class values);
    * ``contradicted`` -- both lie entirely on the opposite side;
    * ``inconclusive`` -- anything else, including fewer than two seeds (no seed interval).
    """
    if direction not in ("higher", "lower"):
        raise ValueError(f"direction must be 'higher' or 'lower', not {direction!r}")
    if seed_ci is None:
        return "inconclusive"
    sign = 1.0 if direction == "higher" else -1.0
    intervals = [seed_ci] + ([bootstrap_ci] if bootstrap_ci is not None else [])

    def above(iv):  # claimed side
        return min(sign * iv[0], sign * iv[1]) > 0.0

    def below(iv):  # opposite side
        return max(sign * iv[0], sign * iv[1]) < 0.0

    if all(above(iv) for iv in intervals):
        return "holds"
    if all(below(iv) for iv in intervals):
        return "contradicted"
    return "inconclusive"


def compare_pair(runs: Mapping[str, Mapping[str, Mapping]], recipe: str, baseline: str, metric: str,
                 classes: Mapping[str, str], direction: str = "higher",
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Paired comparison of two recipes on one metric.

    ``runs[name][replicate]``: that run's summary row (``metric`` in percent, ``per_class_AP``:
    class id -> AP in percent or ``None``). ``classes``: class id -> frequency group (r/c/f).
    Returns ``{"recipe", "baseline", "metric", "direction", "n", "mean", "std", "ci95",
    "bootstrap_ci95", "values", "verdict"}``.
    """
    a, b = runs[recipe], runs[baseline]
    diff = paired_difference({r: a[r].get(metric) for r in a}, {r: b[r].get(metric) for r in b})
    boot = None
    if metric in PER_CLASS_METRICS:
        group = PER_CLASS_METRICS[metric]
        members = [c for c, g in classes.items() if group is None or g == group]
        boot = paired_bootstrap({r: a[r].get("per_class_AP") or {} for r in a},
                                {r: b[r].get("per_class_AP") or {} for r in b},
                                members, resamples=resamples, seed=seed)
    return {"recipe": recipe, "baseline": baseline, "metric": metric, "direction": direction,
            "n": diff["n"], "mean": diff["mean"], "std": diff["std"], "ci95": diff["ci95"],
            "bootstrap_ci95": boot, "values": diff["values"],
            "verdict": verdict(direction, diff["ci95"], boot)}


# ------------------------------------------------------------------------------------------------
# the claims table
# ------------------------------------------------------------------------------------------------

#: The seed papers' claims, as data (``configs/evidence/claims.yaml`` of the source checkout).
CLAIMS_FILE = Path(__file__).resolve().parents[2] / "configs" / "evidence" / "claims.yaml"


@dataclass(frozen=True)
class Claim:
    """One claim of a paper: ``recipe`` is ``direction`` than ``baseline`` on ``metric``."""

    id: str
    paper: str
    claim: str
    recipe: str
    baseline: str
    metric: str
    direction: str = "higher"
    regime: str = "any"   # "any", or the evidence regime the claim is about


def load_claims(path: str | Path | None = None) -> list[Claim]:
    """Read and validate a claims file (YAML: a list of mappings with :class:`Claim`'s fields).

    Errors are :class:`taildet.errors.ConfigError` naming the file, the entry and the problem.
    Recipe names are checked against ``taildet.compare.RECIPES``.
    """
    path = Path(path) if path is not None else CLAIMS_FILE
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the claims file ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of claims, got {type(data).__name__}")
    fields = set(Claim.__dataclass_fields__)
    required = {"id", "paper", "claim", "recipe", "baseline", "metric"}
    claims, seen = [], set()
    for i, entry in enumerate(data):
        where = f"{path}: claim {i + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(entry).__name__}")
        where += f" ({entry.get('id', '?')})"
        unknown, missing = set(entry) - fields, required - set(entry)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if missing:
            raise ConfigError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
        if entry["id"] in seen:
            raise ConfigError(f"{where}: id given twice")
        seen.add(entry["id"])
        for key in ("recipe", "baseline"):
            if entry[key] not in RECIPES:
                raise ConfigError(f"{where}: {key} {entry[key]!r} is not a recipe in taildet.compare.RECIPES")
        if entry["metric"] not in METRICS:
            raise ConfigError(f"{where}: metric {entry['metric']!r} is not one of {', '.join(METRICS)}")
        if entry.get("direction", "higher") not in ("higher", "lower"):
            raise ConfigError(f"{where}: direction must be 'higher' or 'lower'")
        claims.append(Claim(**{k: str(v) for k, v in entry.items()}))
    return claims


def evaluate_claims(claims: Sequence[Claim], runs: Mapping[str, Mapping[str, Mapping]],
                    classes: Mapping[str, str], regime: str | None = None,
                    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[dict]:
    """Each claim with its numbers and verdict; ``"not run"`` where a recipe is missing.

    ``regime``: the run's regime name; claims tied to another regime are left out.
    """
    out = []
    for c in claims:
        if regime is not None and c.regime not in ("any", regime):
            continue
        row = asdict(c)
        if c.recipe in runs and c.baseline in runs:
            res = compare_pair(runs, c.recipe, c.baseline, c.metric, classes, c.direction,
                               resamples=resamples, seed=seed)
            row.update({k: res[k] for k in ("n", "mean", "std", "ci95", "bootstrap_ci95", "values", "verdict")})
        else:
            row.update({"n": 0, "mean": None, "std": None, "ci95": None, "bootstrap_ci95": None,
                        "values": {}, "verdict": "not run"})
        out.append(row)
    return out
