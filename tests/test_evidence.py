"""Evidence over seeds: statistics by hand, the verdict rule, claims, generated docs."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest

from taildet import evidence
from taildet.compare import RECIPES, Recipe, summarize
from taildet.errors import ConfigError, DataError
from taildet.results_docs import (
    format_claims_table,
    format_recipe_table,
    plot_claims_forest,
    plot_recipe_metrics,
    render_markdown,
    update_docs,
    write_table_summary,
)

REPO = Path(__file__).resolve().parents[1]


# --- statistics by hand ----------------------------------------------------------------------

def test_seed_statistics_by_hand():
    s = evidence.seed_statistics([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["mean"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(math.sqrt(5.0 / 3.0))          # ddof 1
    half = 3.182446305284263 * math.sqrt(5.0 / 3.0) / 2.0            # t_{0.975, 3} * s / sqrt(4)
    assert s["ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    # t with 2 degrees of freedom (3 seeds): 4.302652729749464
    s3 = evidence.seed_statistics([10.0, 12.0, 14.0])
    assert s3["ci95"][1] - s3["mean"] == pytest.approx(4.302652729749464 * 2.0 / math.sqrt(3.0))


def test_seed_statistics_one_value_and_undefined_values():
    assert evidence.seed_statistics([7.0]) == {"n": 1, "mean": 7.0, "std": None, "ci95": None}
    assert evidence.seed_statistics([None, float("nan")])["n"] == 0
    assert evidence.seed_statistics([None, 1.0, 3.0])["mean"] == pytest.approx(2.0)


def test_paired_difference_pairs_replicates():
    a = {"seed0": 10.0, "seed1": 12.5, "seed2": 20.0}
    b = {"seed0": 9.0, "seed1": 11.0, "seed2": 18.0, "seed3": 100.0}   # seed3 has no partner
    d = evidence.paired_difference(a, b)
    assert d["values"] == {"seed0": 1.0, "seed1": 1.5, "seed2": 2.0}
    assert d["n"] == 3 and d["mean"] == pytest.approx(1.5) and d["std"] == pytest.approx(0.5)
    assert d["ci95"][0] == pytest.approx(1.5 - 4.302652729749464 * 0.5 / math.sqrt(3.0))
    # pairing removes the shared seed effect: the paired interval excludes 0, the unpaired
    # intervals of the two recipes overlap widely
    assert d["ci95"][0] > 0
    sa, sb = evidence.seed_statistics(list(a.values())), evidence.seed_statistics(list(b.values())[:3])
    assert sa["ci95"][0] < sb["ci95"][1]


def _bootstrap_by_loop(recipe, baseline, classes, resamples, seed):
    """The same statistic with explicit loops (reference for the vectorised version)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(classes), size=(resamples, len(classes)))
    reps = [r for r in recipe if r in baseline]
    stats = []
    for draw in idx:
        per_rep = []
        for r in reps:
            diffs = [recipe[r][classes[j]] - baseline[r][classes[j]] for j in draw
                     if recipe[r].get(classes[j]) is not None and baseline[r].get(classes[j]) is not None]
            if diffs:
                per_rep.append(sum(diffs) / len(diffs))
        if per_rep:
            stats.append(sum(per_rep) / len(per_rep))
    return list(np.quantile(stats, [0.025, 0.975]))


def test_paired_bootstrap_by_hand():
    # constant differences: the interval is that constant
    rec = {"s0": {"1": 5.0, "2": 7.0}, "s1": {"1": 6.0, "2": 8.0}}
    base = {"s0": {"1": 3.0, "2": 5.0}, "s1": {"1": 4.0, "2": 6.0}}
    assert evidence.paired_bootstrap(rec, base, ["1", "2"], seed=0) == pytest.approx([2.0, 2.0])
    # two classes with differences 0 and 10, one replicate: resample means are 0, 5 or 10 with
    # probabilities 1/4, 1/2, 1/4, so the 2.5 % and 97.5 % quantiles are 0 and 10
    rec = {"s0": {"a": 0.0, "b": 10.0}}
    base = {"s0": {"a": 0.0, "b": 0.0}}
    assert evidence.paired_bootstrap(rec, base, ["a", "b"], seed=0) == pytest.approx([0.0, 10.0])


def test_paired_bootstrap_equals_the_loop_with_undefined_classes():
    rng = np.random.default_rng(3)
    classes = [str(c) for c in range(7)]
    rec, base = {}, {}
    for r in ("s0", "s1", "s2"):
        rec[r] = {c: float(rng.uniform(0, 50)) for c in classes}
        base[r] = {c: float(rng.uniform(0, 50)) for c in classes}
    rec["s1"]["3"] = None          # undefined in one run: left out of that replicate only
    base["s2"]["5"] = None
    got = evidence.paired_bootstrap(rec, base, classes, resamples=300, seed=11)
    assert got == pytest.approx(_bootstrap_by_loop(rec, base, classes, 300, 11))
    # deterministic for a seed, different for another
    assert got == evidence.paired_bootstrap(rec, base, classes, resamples=300, seed=11)
    assert got != evidence.paired_bootstrap(rec, base, classes, resamples=300, seed=12)


# --- the verdict rule ------------------------------------------------------------------------

@pytest.mark.parametrize("direction,seed_ci,boot_ci,expected", [
    ("higher", [0.5, 3.0], [0.1, 2.0], "holds"),
    ("higher", [0.5, 3.0], None, "holds"),                 # AP50: no class interval
    ("higher", [0.5, 3.0], [-0.1, 2.0], "inconclusive"),   # classes do not agree
    ("higher", [-0.5, 3.0], [0.1, 2.0], "inconclusive"),   # seeds do not agree
    ("higher", [-3.0, -0.5], [-2.0, -0.1], "contradicted"),
    ("higher", [-3.0, -0.5], [-2.0, 0.1], "inconclusive"),
    ("lower", [-3.0, -0.5], [-2.0, -0.1], "holds"),
    ("lower", [0.5, 3.0], [0.1, 2.0], "contradicted"),
    ("higher", None, [0.1, 2.0], "inconclusive"),          # one seed: no seed interval
    ("higher", [0.0, 3.0], [0.1, 2.0], "inconclusive"),    # touching 0 is not excluding it
])
def test_verdict_rule(direction, seed_ci, boot_ci, expected):
    assert evidence.verdict(direction, seed_ci, boot_ci) == expected


def test_verdict_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="direction"):
        evidence.verdict("up", [1, 2], None)


# --- summaries, claims, recipes --------------------------------------------------------------

def _row(ap, per_class):
    vals = [v for v in per_class.values() if v is not None]
    return {"AP": ap, "APr": per_class.get("1"), "APc": per_class.get("2"), "APf": per_class.get("3"),
            "AP50": ap + 10, "per_class_AP": per_class, "_check": sum(vals) / len(vals)}


def _toy_runs():
    # recipe "b" beats "a" by 2 points on every class and seed
    classes = {"1": {"group": "r"}, "2": {"group": "c"}, "3": {"group": "f"}}
    a = {f"seed{s}": _row(10.0 + s, {"1": 1.0 + s, "2": 10.0 + s, "3": 19.0 + s}) for s in range(3)}
    b = {f"seed{s}": _row(12.0 + s, {"1": 3.0 + s, "2": 12.0 + s, "3": 21.0 + s}) for s in range(3)}
    return {"faster_ce": a, "faster_ce_rfs": b}, classes


def test_summarize_pairs_each_recipe_with_its_baseline():
    runs, classes = _toy_runs()
    specs = {n: RECIPES[n] for n in runs}
    claims = [c for c in evidence.load_claims() if c.id in ("rfs-ap", "rfs-apr", "logn-ap")]
    s = summarize(runs, specs, classes, claims, resamples=200)
    assert s["recipes"]["faster_ce_rfs"]["baselines"] == ["faster_ce"]
    assert s["recipes"]["faster_ce"]["stats"]["AP"]["mean"] == pytest.approx(11.0)
    pairs = {(p["recipe"], p["metric"]): p for p in s["paired"]}
    assert set(pairs) == {("faster_ce_rfs", m) for m in evidence.METRICS}
    ap = pairs[("faster_ce_rfs", "AP")]
    assert ap["mean"] == pytest.approx(2.0) and ap["std"] == pytest.approx(0.0)
    assert ap["bootstrap_ci95"] == pytest.approx([2.0, 2.0])
    # zero spread: a degenerate interval at +2 lies above 0 -> holds
    assert ap["verdict"] == "holds"
    verdicts = {c["id"]: c["verdict"] for c in s["claims"]}
    assert verdicts == {"rfs-ap": "holds", "rfs-apr": "holds", "logn-ap": "not run"}


def test_every_recipe_baseline_is_a_recipe_and_no_recipe_is_its_own_baseline():
    for name, spec in RECIPES.items():
        for b in spec.compared_with():
            assert b in RECIPES, (name, b)
            assert b != name
    # stage-2 and post-hoc rows default to their stage 1
    assert RECIPES["faster_ce+ebl"].compared_with() == ("faster_ce",)
    assert RECIPES["atss_eqfl"].compared_with() == ("atss_qfl",)
    assert Recipe("train", "x.yaml").compared_with() == ()


def test_builtin_claims_load_and_name_known_recipes():
    claims = evidence.load_claims()
    ids = [c.id for c in claims]
    assert len(ids) == len(set(ids)) >= 20
    for c in claims:
        assert c.recipe in RECIPES and c.baseline in RECIPES and c.metric in evidence.METRICS


@pytest.mark.parametrize("text,match", [
    ("- {id: x, paper: p, claim: c, recipe: nope, baseline: faster_ce, metric: AP}", "recipe 'nope'"),
    ("- {id: x, paper: p, claim: c, recipe: faster_ce, baseline: faster_ce, metric: mAP}", "metric 'mAP'"),
    ("- {id: x, paper: p, claim: c, recipe: faster_ce, baseline: faster_ce, metric: AP, direction: up}",
     "direction"),
    ("- {id: x, paper: p, claim: c, recipe: faster_ce, metric: AP}", "missing field.*baseline"),
    ("- {id: x, paper: p, claim: c, recipe: faster_ce, baseline: faster_ce, metric: AP, colour: red}",
     "unknown field.*colour"),
    ("{id: x}", "expected a list"),
])
def test_bad_claims_file_is_a_clear_error(tmp_path, text, match):
    f = tmp_path / "claims.yaml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError, match=match) as err:
        evidence.load_claims(f)
    assert "claims.yaml" in str(err.value)


# --- generated tables and plots --------------------------------------------------------------

def _write_summary(tmp_path):
    runs, classes = _toy_runs()
    s = summarize(runs, {n: RECIPES[n] for n in runs}, classes,
                  [c for c in evidence.load_claims() if c.id in ("rfs-ap", "rfs-apr")], resamples=100)
    s["title"] = "toy"
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "toy.json").write_text(json.dumps(s))
    return s


def test_tables_and_plots_from_a_summary(tmp_path):
    s = _write_summary(tmp_path)
    table = format_recipe_table(s)
    # mean 11.0, std 1, t_{0.975,2} * 1 / sqrt(3) = 2.48
    assert "| faster_ce | 3 | 11.0 ± 2.5 |" in table
    assert "| RFS raises AP over CE | LVIS (RFS) | faster_ce_rfs > faster_ce | AP | 3 | +2.0 |" \
        in format_claims_table(s)
    assert plot_recipe_metrics(s, tmp_path / "m.png").stat().st_size > 5000
    assert plot_claims_forest(s, tmp_path / "c.png").stat().st_size > 5000


def test_docs_check_fails_when_a_number_in_the_docs_differs_from_its_summary(tmp_path):
    _write_summary(tmp_path)
    doc = tmp_path / "doc.md"
    doc.write_text("# x\n\n<!-- BEGIN GENERATED recipes results/toy.json recipes=faster_ce_rfs,faster_ce "
                   "metrics=AP,APr -->\n<!-- END GENERATED -->\n\ntext after\n")
    assert update_docs([doc], root=tmp_path) == [str(doc)]          # filled in
    text = doc.read_text()
    assert "| faster_ce_rfs | 3 | 13.0 ± 2.5 | 4.0 ± 2.5 |" in text and text.endswith("text after\n")
    assert update_docs([doc], root=tmp_path, check=True) == []       # now up to date
    doc.write_text(text.replace("13.0 ± 2.5", "13.1 ± 2.5"))          # a hand edit
    assert update_docs([doc], root=tmp_path, check=True) == [str(doc)]
    assert "13.1" in doc.read_text()                                 # --check writes nothing


def test_docs_block_errors_name_the_problem(tmp_path):
    _write_summary(tmp_path)
    with pytest.raises(DataError, match="nope"):
        render_markdown("<!-- BEGIN GENERATED recipes results/toy.json recipes=nope -->\n"
                        "<!-- END GENERATED -->", tmp_path)
    with pytest.raises(ConfigError, match="KIND"):
        render_markdown("<!-- BEGIN GENERATED histogram results/toy.json -->\n<!-- END GENERATED -->", tmp_path)
    with pytest.raises(DataError, match="missing.json"):
        render_markdown("<!-- BEGIN GENERATED recipes results/missing.json -->\n<!-- END GENERATED -->",
                        tmp_path)


def test_measured_table_blocks_come_from_the_benchmark_file(tmp_path):
    """A benchmark's --json file renders as a table with its machine and command; a hand edit fails."""
    table = {"columns": ["RoIs", "loss", "ratio"], "formats": ["d", "s", ".2f"],
             "rows": [[1024, "seesaw", 1.4712], [8192, "eql", None]]}
    write_table_summary(tmp_path / "results" / "bench.json", "toy", {"losses": table}, "python benchmarks/x.py")
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- BEGIN GENERATED table results/bench.json table=losses -->\n<!-- END GENERATED -->\n")
    assert update_docs([doc], root=tmp_path) == [str(doc)]
    text = doc.read_text()
    assert "| 1024 | seesaw | 1.47 |" in text and "| 8192 | eql | - |" in text
    assert "`python benchmarks/x.py`" in text and "torch " in text      # where it was measured
    assert "|---:|:---|---:|" in text                                    # numbers right, text left
    doc.write_text(text.replace("1.47", "1.10"))
    assert update_docs([doc], root=tmp_path, check=True) == [str(doc)]
    with pytest.raises(DataError, match="'steps' not in the file"):
        render_markdown("<!-- BEGIN GENERATED table results/bench.json table=steps -->\n<!-- END GENERATED -->",
                        tmp_path)
    with pytest.raises(ConfigError, match="table=NAME"):
        render_markdown("<!-- BEGIN GENERATED table results/bench.json -->\n<!-- END GENERATED -->", tmp_path)
    with pytest.raises(DataError, match="measured-tables"):      # a compare summary is not a table file
        (tmp_path / "results" / "other.json").write_text(json.dumps({"recipes": {}}))
        render_markdown("<!-- BEGIN GENERATED table results/other.json table=x -->\n<!-- END GENERATED -->",
                        tmp_path)
    with pytest.raises(ValueError, match="one entry per column"):
        write_table_summary(tmp_path / "bad.json", "toy", {"t": {**table, "rows": [[1, "x"]]}}, "cmd")
    assert not (tmp_path / "bad.json").exists()


def test_repository_docs_match_their_committed_summaries():
    """README.md and docs/RESULTS.md: every generated table equals what its summary gives."""
    assert update_docs(root=REPO, check=True) == []


def test_long_tail_losses_are_compared_on_their_own_classifier():
    """EQL / EQLv2 / Seesaw use the cosine classifier: every baseline they are compared with, in
    RECIPES and in the claims, uses the same classifier (one change at a time)."""
    from taildet.compare import _config_path
    from taildet.config import load_config

    def classifier(name):
        spec = RECIPES[name]
        while spec.kind == "posthoc":
            spec = RECIPES[spec.stage1]
        return load_config(_config_path(spec)).model.kwargs.get("classifier", "linear")

    for name in ("faster_eql", "faster_eqlv2", "faster_seesaw"):
        assert classifier(name) == "cosine"
        assert RECIPES[name].compared_with()
        for b in RECIPES[name].compared_with():
            assert classifier(b) == "cosine", (name, b)
    for c in evidence.load_claims():
        if c.recipe in ("faster_eql", "faster_eqlv2", "faster_seesaw"):
            assert classifier(c.baseline) == "cosine", c.id
    # the cause-test row that takes Seesaw back to the linear classifier is compared with linear CE
    assert classifier("faster_seesaw_linear") == "linear"
    assert classifier(RECIPES["faster_seesaw_linear"].baselines[0]) == "linear"


def test_every_claim_compares_detectors_with_the_same_classifier_bias_prior():
    """A claim changes one thing: the classifier-bias prior (which focal, QFL and EFL default
    differently, 0.01 / 0.01 / 0.001) is the same in a claim's recipe and its baseline. (The
    one-stage claims were first run with each loss's own default, and the difference measured was
    mostly the prior's.) The ``*_prior*`` recipes that measure the prior alone differ only in it."""
    from taildet.compare import _config_path
    from taildet.config import load_config
    from taildet.losses import LOSSES, build_loss

    def prior(name):
        spec = RECIPES[name]
        while spec.kind in ("posthoc", "finetune"):
            spec = RECIPES[spec.stage1]
        m = load_config(_config_path(spec)).model
        name, kwargs = m.kwargs.get("loss", "softmax_ce"), m.kwargs.get("loss_kwargs") or {}
        try:
            return getattr(build_loss(name, 48, **kwargs), "prior", None)
        except ConfigError:                               # needs training statistics (EQL): its signature
            p = inspect.signature(LOSSES[name]).parameters.get("prior")
            return kwargs.get("prior", None if p is None else p.default)

    checked = 0
    for c in evidence.load_claims():
        p, q = prior(c.recipe), prior(c.baseline)
        if p is not None and q is not None:          # both sigmoid heads (a softmax head has no prior)
            assert p == q, (c.id, c.recipe, p, c.baseline, q)
            checked += 1
    assert checked >= 8                                   # the one-stage claims carry a prior
    for name in ("retinanet_efl_prior001", "fcos_efl_prior001", "atss_qfl_prior01"):
        (base,) = RECIPES[name].baselines
        assert prior(name) != prior(base)
        a, b = (load_config(_config_path(RECIPES[n])).to_dict() for n in (name, base))
        for d in (a, b):
            d["model"].pop("loss_kwargs"), d.pop("output_dir")
        assert a == b, name                              # nothing else differs


def test_argmax_diagnostic_reaches_the_summary_and_its_table(tmp_path):
    """The background-argmax report a LogN statistics file carries becomes the run's row entry
    (percent) and the ``argmax`` docs table averages it over replicates."""
    from taildet.compare import _argmax_diagnostic
    from taildet.results_docs import format_argmax_table

    f = tmp_path / "logit_stats.json"
    f.write_text(json.dumps({"extra": {"background_argmax_share": {
        "positives_sampled": 10,
        "raw": {"r": {"share": 0.1, "positives": 2}, "c": {"share": None, "positives": 0},
                "f": {"share": 0.0, "positives": 8}, "all": {"share": 0.02, "positives": 10}},
        "logn (mode all, beta min_fg)": {"r": {"share": 1.0, "positives": 2}, "c": {"share": None, "positives": 0},
                                         "f": {"share": 0.5, "positives": 8}, "all": {"share": 0.6, "positives": 10}},
    }}}))
    d = _argmax_diagnostic(f)
    assert d == {"raw": {"r": 10.0, "c": None, "f": 0.0, "all": 2.0},
                 "logn (mode all, beta min_fg)": {"r": 100.0, "c": None, "f": 50.0, "all": 60.0}}
    assert _argmax_diagnostic(tmp_path / "missing.json") is None
    d2 = {k: {g: (None if v is None else v / 2) for g, v in row.items()} for k, row in d.items()}
    summary = {"recipes": {"faster_ce+logn": {"runs": {"seed0": {"background_argmax_share": d},
                                                       "seed1": {"background_argmax_share": d2}}},
                           "faster_ce": {"runs": {"seed0": {}}}}}
    table = format_argmax_table(summary)
    assert "| faster_ce+logn | raw | 2 | 7.5 | - | 0.0 | 1.5 |" in table
    assert "| faster_ce+logn | logn (mode all, beta min_fg) | 2 | 75.0 | - | 37.5 | 45.0 |" in table
    assert "| faster_ce |" not in table


def test_docs_on_a_missing_file_is_one_clear_line(tmp_path, capsys):
    from taildet.cli import main

    assert main(["docs", "--check", str(tmp_path / "nope.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.md" in err[0] and "cannot read" in err[0]
