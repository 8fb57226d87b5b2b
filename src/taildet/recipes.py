"""The recipes of ``taildet compare``: :class:`Recipe` and :data:`RECIPES` (one plain dict), the
demo's list, and how a recipe name or YAML path resolves to a config (stage-1 dependencies
included)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from taildet.errors import ConfigError


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
    "faster_fed": Recipe("train", "demo_faster_tiny_fed.yaml", about="federated loss, cosine classifier",
                         baselines=("faster_cos_sigmoid",)),
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
    # cause tests of the evidence issue (not tuned rows): one change each against the row they explain
    "faster_ce_rfs+logn_nobeta": Recipe("posthoc", stage1="faster_ce_rfs", posthoc="logn",
                                        posthoc_kwargs=(("mode", "no_beta"),), about="RFS + LogN without beta",
                                        baselines=("faster_ce_rfs+logn", "faster_ce_rfs")),
    "faster_eqlv2_gamma4": Recipe("train", "demo_faster_tiny_eqlv2.yaml", opts=("model.loss_kwargs.gamma=4.0",),
                                  about="EQLv2 with gamma 4 instead of 12 (cause test)",
                                  baselines=("faster_eqlv2", "faster_cos_sigmoid")),
    "faster_seesaw_linear": Recipe("train", "demo_faster_tiny_seesaw_linear.yaml",
                                   about="Seesaw with the linear classifier (cause test)",
                                   baselines=("faster_ce", "faster_seesaw")),
    # EFL's premise (rare classes' positive/negative gradient ratio far below 1) without RFS, which
    # repeats the rare classes' images: the same two ATSS rows with the random sampler
    "atss_focal_norfs": Recipe("train", "demo_atss_tiny_focal.yaml", opts=("data.sampler=random",),
                               about="ATSS improved baseline, focal, random sampler (cause test)",
                               baselines=("atss_focal",)),
    "atss_efl_norfs": Recipe("train", "demo_atss_tiny_efl.yaml", opts=("data.sampler=random",),
                             about="ATSS improved baseline, EFL, random sampler (cause test)",
                             baselines=("atss_focal_norfs", "atss_efl")),
    # ... and at twice the image resolution (images and anchors 2x, so ~4x the anchor positions
    # per image and the same anchor-to-object sizes): does the ratio fall with the number of anchors?
    "atss_efl_2xres": Recipe("train", "demo_atss_tiny_efl.yaml",
                             opts=("data.min_sizes=[192]", "data.max_size=192", "model.min_size=192",
                                   "model.max_size=192", "model.anchor_scales=[4,8]"),
                             about="ATSS improved baseline, EFL, 2x image resolution (cause test)",
                             baselines=("atss_efl",)),
    "faster_ce+bsoftmax_long": Recipe("finetune", "demo_faster_tiny_bsoftmax_ft.yaml", "faster_ce",
                                      opts=("train.iterations=1200",),
                                      about="stage 2: Balanced Softmax, 3x longer fine-tune (cause test)",
                                      baselines=("faster_ce+bsoftmax", "faster_ce")),
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
    # Cascade R-CNN (one change from faster_ce: the architecture) and LogN per stage on it
    "cascade_ce": Recipe("train", "demo_cascade_tiny_ce.yaml", about="Cascade R-CNN, softmax CE, random sampling",
                         baselines=("faster_ce",)),
    "cascade_ce+logn": Recipe("posthoc", stage1="cascade_ce", posthoc="logn",
                              about="Cascade + LogN per stage (no training)", baselines=("cascade_ce", "faster_ce+logn")),
}


#: What ``taildet demo`` runs: the two-stage CE baseline and the same with repeat factor sampling.
DEMO_RECIPES = ("prior", "faster_ce", "faster_ce_rfs", "faster_ce+logn")


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
