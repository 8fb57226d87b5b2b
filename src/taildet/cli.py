"""The ``taildet`` command line. Thin: parse, load a config, call one library function.

Every sub-command's ``--help`` explains its options. Errors that come from user input
(:class:`taildet.errors.TaildetError`) are printed as one clear line and exit with status 2;
a diverged training run exits with status 3 and leaves its last checkpoint intact.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from taildet.classify.cli_args import add_classify_parser
from taildet.errors import ConfigError, TaildetError
from taildet.fileio import check_not_inputs, check_output_path

# The sub-commands import what they run when they run (``# start-up:`` below): ``taildet --help``
# and argument errors must not wait for torch, torchvision and the models to load.


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from taildet.data.stats import dataset_stats, format_stats, plot_long_tail  # start-up: lazy, keeps --help fast
    from taildet.data.synthetic import make_dataset  # start-up: lazy, keeps --help fast

    info = make_dataset(args.out_dir, seed=args.seed, scale=args.scale, vocabulary=args.vocabulary)
    stats = dataset_stats(info["train_json"])
    print(format_stats(stats))
    png = plot_long_tail(stats, Path(args.out_dir) / "long_tail.png")
    print(f"train: {info['train_json']}\nval:   {info['val_json']}\nlong-tail plot: {png}")
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from taildet.data.stats import dataset_stats, format_stats, plot_long_tail  # start-up: lazy, keeps --help fast

    out = Path(args.out) if args.out else Path(args.ann).with_suffix(".long_tail.png")
    check_not_inputs({"--out plot": out}, {"annotation file": args.ann})
    stats = dataset_stats(args.ann)  # the input first: a bad file is named before a bad --out
    check_output_path(out, what="--out plot")
    print(format_stats(stats))
    print(f"long-tail plot: {plot_long_tail(stats, out)}")
    return 0


def _cmd_pretrain_backbone(args: argparse.Namespace) -> int:
    from taildet.engine.pretrain import PretrainRecipe, pretrain_backbone, read_record  # start-up: lazy, keeps --help fast

    given = {k: v for k, v in (("per_class", args.per_class), ("heldout_per_class", args.heldout_per_class))
             if v is not None}
    recipe = PretrainRecipe.for_vocabulary(args.vocabulary, seed=args.seed, epochs=args.epochs, **given)
    rec = None if args.force else read_record(args.out)
    if rec is not None and Path(args.out).is_file() and all(
            rec.get(k) == v for k, v in recipe.record().items()):
        print(f"{args.out}: already pretrained with this recipe (digest {rec['digest']}); reused "
              "(--force retrains)")
    else:
        rec = pretrain_backbone(args.out, recipe, progress=True)
    top1 = rec.get("heldout_top1")
    print(f"tiny backbone: held-out top-1 {'n/a' if top1 is None else f'{100 * top1:.1f} %'} "
          f"(chance {100 * rec['chance']:.1f} %, {rec['heldout_crops']} crops), train top-1 "
          f"{100 * rec['train_top1']:.1f} %, {rec['seconds']} s\nweights: {args.out}\n"
          f"use it with: --opts model.backbone_weights={args.out} model.trainable_backbone_layers=2")
    return 0


def _cmd_eval_results(args: argparse.Namespace) -> int:
    from taildet.evaluation import eval_results_main  # start-up: lazy, keeps --help fast

    eval_results_main(args.gt, args.results, iou_type=args.iou_type, fixed=args.fixed, out=args.out)
    return 0


def _cmd_errors(args: argparse.Namespace) -> int:
    from taildet.analysis.error_report import errors_main  # start-up: lazy, keeps --help fast

    errors_main(args.gt, args.results, out=args.out, iou_type=args.iou_type, top_pairs=args.top_pairs)
    return 0


def _cmd_errors_table(args: argparse.Namespace) -> int:
    from taildet.analysis.error_seeds import errors_table_main  # start-up: lazy, keeps --help fast

    recipes = [r for r in args.recipes.split(",") if r]
    if not recipes:
        raise ConfigError("--recipes: give at least one recipe name")
    errors_table_main(args.gt, args.compare_dir, recipes, args.json,
                      command="taildet errors-table " + " ".join(sys.argv[2:]))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from taildet.analysis.show import detection_grid  # start-up: lazy, keeps --help fast

    info = detection_grid(args.gt, args.results, args.out, image_root=args.images, image_ids=args.image_ids,
                          num_images=args.num, score_thresh=args.score_thresh, top_k=args.top_k, cols=args.cols,
                          scale=args.scale)
    w, h = info["size"]
    print(f"{info['path']}: {len(info['image_ids'])} images ({', '.join(map(str, info['image_ids']))}), "
          f"scale {info['scale']}, {w}x{h} px")
    return 0


def _image_id_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer image ids, got {text!r}") from None


def _load_cfg(args: argparse.Namespace):
    from taildet.config import apply_overrides, load_config  # start-up: lazy, keeps --help fast

    cfg = load_config(args.config)
    if getattr(args, "opts", None):
        cfg = apply_overrides(cfg, args.opts)
    if getattr(args, "output_dir", None):
        cfg = apply_overrides(cfg, [f"output_dir={args.output_dir}"])
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from taildet.engine import train  # start-up: lazy, keeps --help fast

    out = train(_load_cfg(args), resume=args.resume)
    print(json.dumps({k: v for k, v in out.items() if k != "metrics"}, default=str, indent=1))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from taildet.engine import finetune  # start-up: lazy, keeps --help fast

    out = finetune(_load_cfg(args), args.from_checkpoint, resume=args.resume)
    print(json.dumps({k: v for k, v in out.items() if k != "metrics"}, default=str, indent=1))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from taildet.engine import evaluate_checkpoint  # start-up: lazy, keeps --help fast

    from taildet.evaluation import format_metrics_table  # start-up: lazy, keeps --help fast

    metrics = evaluate_checkpoint(_load_cfg(args), args.checkpoint, calibration=args.calibration,
                                  out_dir=args.output_dir)
    name = Path(args.checkpoint).name
    rows = {f"{name} ({iou})": m for iou, m in metrics.items() if isinstance(m, dict)} or {name: metrics}
    print(format_metrics_table(rows))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from taildet.engine import calibrate_checkpoint  # start-up: lazy, keeps --help fast

    kwargs = {}
    if args.mode:
        kwargs["mode"] = args.mode
    if args.ema_init is not None:
        if args.momentum is None:
            raise ConfigError("calibrate: --ema-init applies to EMA statistics: give --momentum too")
        kwargs["ema_init"] = args.ema_init
    if args.beta is not None:
        try:
            kwargs["beta"] = float(args.beta)
        except ValueError:
            kwargs["beta"] = args.beta
    if args.stats == "running" and (args.momentum is not None or args.ema_init is not None):
        raise ConfigError("calibrate: --momentum / --ema-init are options of --stats pass; "
                          "--stats running continues the BatchNorm statistics with --running-momentum")
    if args.stats == "pass" and args.running_momentum is not None:
        raise ConfigError("calibrate: --running-momentum applies to --stats running")
    path = calibrate_checkpoint(_load_cfg(args), args.checkpoint, args.out, stats=args.stats,
                                running_momentum=args.running_momentum, momentum=args.momentum,
                                max_batches=args.max_batches, **kwargs)
    from taildet.calibration.diagnostics import format_background_argmax_share  # start-up: lazy, keeps --help fast

    with open(path, encoding="utf-8") as fh:
        report = (json.load(fh).get("extra") or {}).get("background_argmax_share")
    if report:
        print(format_background_argmax_share(report))
    print(f"logit statistics: {path}\nevaluate with: taildet eval {args.config} {args.checkpoint} "
          f"--calibration {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from taildet.compare import run_demo  # start-up: lazy, keeps --help fast

    run_demo(args.out, seed=args.seed, jobs=args.jobs)
    return 0


def _classify_recipes(recipes: list[str]) -> bool:
    """True when every recipe is a ``taildet classify`` config; a mix is a ConfigError."""
    from taildet.classify.compare import is_classify_recipe  # start-up: lazy, keeps --help fast

    kinds = [is_classify_recipe(r) for r in recipes]
    if any(kinds) and not all(kinds):
        raise ConfigError("compare: --recipes mixes classification configs (data.manifest) with detection "
                          "recipes; compare them separately")
    return all(kinds)


def _cmd_compare(args: argparse.Namespace) -> int:
    from taildet.compare import run_compare  # start-up: lazy, keeps --help fast

    claims = True if args.claims == "" else args.claims
    recipes = args.recipes
    if claims and not recipes:  # every recipe a claim names, with its baselines
        from taildet.evidence import load_claims  # start-up: lazy, keeps --help fast

        loaded = load_claims(None if claims is True else claims)
        recipes = list(dict.fromkeys([n for c in loaded for n in (c.baseline, c.recipe)]))
    if recipes and _classify_recipes(recipes):  # taildet classify configs: their own runner and table
        from taildet.classify.compare import run_classify_compare  # start-up: lazy, keeps --help fast

        run_classify_compare(recipes, args.out, seeds=args.seeds, opts=args.opts)
        return 0
    run_compare(recipes, args.out, seeds=args.seeds, data_seeds=args.data_seeds, jobs=args.jobs,
                reuse=args.reuse, with_baselines=args.with_baselines, claims=claims,
                regime=args.regime, extra_opts=args.opts, scale=args.scale)
    return 0


def _cmd_docs(args: argparse.Namespace) -> int:
    from taildet.results_docs import update_docs  # start-up: lazy, keeps --help fast

    stale = update_docs(args.files or None, check=args.check)
    if args.check and stale:
        print(f"taildet docs: generated tables differ from their summaries in: {', '.join(stale)} "
              f"(run `taildet docs` to regenerate)", file=sys.stderr)
        return 1
    print(("stale: " if args.check else "rewritten: ") + (", ".join(stale) or "none"))
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from taildet.classify.cli_run import run_classify_command  # start-up: lazy, keeps --help fast

    return run_classify_command(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="taildet",
        description="Long-tailed object detection on torchvision detectors.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("data", help="make or inspect datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    s = dsub.add_parser("synth", help="write the embedded long-tail dataset (LVIS v1 JSON + PNG images)")
    s.add_argument("out_dir", help="output directory (annotations/ and images/ are created inside)")
    s.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same bytes)")
    s.add_argument("--scale", type=float, default=1.0, help="multiply the number of images (default 1.0)")
    s.add_argument("--vocabulary", choices=["default", "lvis"], default="default",
                   help="default: 48 classes; lvis: 150 classes with LVIS v1's rare/common/frequent "
                        "shares (42/57/51; --scale 0.25 gives about the default's number of images)")
    s.set_defaults(func=_cmd_data_synth)
    st = dsub.add_parser("stats", help="per-group counts and the long-tail histogram of an annotation file")
    st.add_argument("ann", help="LVIS or COCO instance JSON")
    st.add_argument("--out", help="PNG path of the histogram (default: next to the JSON)")
    st.set_defaults(func=_cmd_data_stats)

    pb = sub.add_parser("pretrain-backbone",
                        help="pretrain the tiny backbone on balanced synthetic crops (the pretrained regime)")
    pb.add_argument("out", help="state dict to write (.pth; a .pth.json record is written beside it)")
    pb.add_argument("--seed", type=int, default=1000,
                    help="seed of the crops and the training (default 1000; the crops never repeat "
                         "detection images whatever the seed)")
    pb.add_argument("--per-class", type=int, default=None,
                    help="training crops per class (default 200; 64 with --vocabulary lvis)")
    pb.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    pb.add_argument("--heldout-per-class", type=int, default=None,
                    help="held-out crops per class for the reported top-1 accuracy (default 50; 16 with "
                         "--vocabulary lvis)")
    pb.add_argument("--vocabulary", choices=["default", "lvis"], default="default",
                    help="classes of the task: the embedded dataset's 48 (default) or the lvis variant's 150")
    pb.add_argument("--force", action="store_true", help="retrain even if OUT holds this recipe's weights")
    pb.set_defaults(func=_cmd_pretrain_backbone)

    e = sub.add_parser("eval-results", help="evaluate a results JSON against LVIS/COCO ground truth")
    e.add_argument("gt", help="ground-truth annotation JSON (LVIS v1 or COCO)")
    e.add_argument("results", help="results JSON: list of {image_id, category_id, bbox|segmentation, score}")
    e.add_argument("--iou-type", choices=["bbox", "segm"], default="bbox", help="what to evaluate")
    e.add_argument("--fixed", action="store_true",
                   help="AP-fixed (Dave et al. 2021): no per-image cap, top 10,000 detections per class")
    e.add_argument("--out", help="directory for metrics.json and the per-class AP plot")
    e.set_defaults(func=_cmd_eval_results)

    er = sub.add_parser("errors", help="TIDE-style error analysis (dAP50 per error type and frequency group, "
                                       "confusions of rare classes) of a results JSON on LVIS ground truth")
    er.add_argument("gt", help="ground-truth annotation JSON (LVIS v1)")
    er.add_argument("results", help="results JSON: list of {image_id, category_id, bbox|segmentation, score}")
    er.add_argument("--out", help="directory for errors.json, errors.md, errors_dap.png and errors_pairs.png")
    er.add_argument("--iou-type", choices=["bbox", "segm"], default="bbox", help="what to analyse")
    er.add_argument("--top-pairs", type=int, default=10,
                    help="confusion pairs to report, their cost computed exactly (default 10)")
    er.set_defaults(func=_cmd_errors)

    et = sub.add_parser("errors-table", help="the error analysis of compared recipes over every replicate "
                                             "(mean +- sd over seeds) as a table the docs can name")
    et.add_argument("gt", help="ground-truth annotation JSON the compared runs were evaluated on")
    et.add_argument("compare_dir", help="output folder of `taildet compare` (holds seed<s>/<recipe>/results_bbox.json)")
    et.add_argument("--recipes", required=True, help="comma-separated recipe names, one table row each")
    et.add_argument("--json", required=True, help="measured-tables file to write (e.g. docs/results/errors_x.json)")
    et.set_defaults(func=_cmd_errors_table)

    sh = sub.add_parser("show", help="draw ground truth and detections on dataset images into a PNG grid")
    sh.add_argument("gt", help="ground-truth annotation JSON (LVIS v1 or COCO)")
    sh.add_argument("results", help="bbox results JSON: list of {image_id, category_id, bbox, score}")
    sh.add_argument("--images", help="image directory (default: <GT dir>/../images if it exists, else the GT's dir)")
    sh.add_argument("--out", required=True, help="PNG to write (never one of the inputs)")
    sh.add_argument("--score-thresh", type=float, default=0.3, help="draw detections scoring at least this "
                    "(default 0.3)")
    sh.add_argument("--top-k", type=int, default=10, help="at most this many detections per image, best first "
                    "(default 10)")
    sh.add_argument("--image-ids", type=_image_id_list, help="comma-separated image ids to show, in this order "
                    "(default: images with rare classes first, then common, then the rest, by id)")
    sh.add_argument("--num", type=int, default=16, help="number of images without --image-ids (default 16)")
    sh.add_argument("--cols", type=int, default=4, help="images per row (default 4)")
    sh.add_argument("--scale", type=int, default=None, help="integer upscale factor (default: the largest image "
                    "side becomes about 384 px; 4 for the embedded dataset)")
    sh.set_defaults(func=_cmd_show)

    t = sub.add_parser("train", help="train a detector from a YAML config (works under torchrun)")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. train.lr=0.01 data.sampler=rfs")
    t.add_argument("--output-dir", help="run directory (overrides output_dir)")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    t.set_defaults(func=_cmd_train)

    f = sub.add_parser("finetune", help="decoupled stage-2 fine-tune from a stage-1 checkpoint")
    f.add_argument("config", help="stage-2 YAML config (_base_: stage 1, train.freeze, ...); "
                   "the same as `train` with model.init_from set to --from")
    f.add_argument("--from", dest="from_checkpoint", required=True, help="stage-1 checkpoint (.pth)")
    f.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    f.add_argument("--output-dir", help="run directory (overrides output_dir)")
    f.add_argument("--resume", action="store_true", help="continue an interrupted fine-tune")
    f.set_defaults(func=_cmd_finetune)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on the config's validation set")
    ev.add_argument("config", help="YAML config the checkpoint was trained with")
    ev.add_argument("checkpoint", help="checkpoint (.pth)")
    ev.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    ev.add_argument("--output-dir", help="where results and metrics are written (default: the checkpoint's "
                                         "directory; with --calibration its eval_calibrated/)")
    ev.add_argument("--calibration", help="logit statistics file from `taildet calibrate` (LogN)")
    ev.set_defaults(func=_cmd_eval)

    ca = sub.add_parser("calibrate", help="LogN: collect logit statistics of a trained detector "
                                          "over its training set (no training)",
                        description="LogN statistics of a trained detector over its training set. Prints, per "
                                    "frequency group, the share of positive RoIs whose argmax is the background "
                                    "column (raw logits, after LogN, after LogN without beta).")
    ca.add_argument("config", help="YAML config the checkpoint was trained with")
    ca.add_argument("checkpoint", help="checkpoint (.pth)")
    ca.add_argument("--out", help="statistics file (default: logit_stats.json beside the checkpoint)")
    ca.add_argument("--stats", choices=["pass", "running"], default="pass",
                    help="pass (default, any detector): statistics of the sampled RoIs' raw logits over one "
                         "pass; running (models trained with model.logit_bn, LogN's released recipe): the "
                         "logits' BatchNorm running statistics continued over one epoch with "
                         "--running-momentum, as the authors' 0-lr fine-tune does")
    ca.add_argument("--running-momentum", type=float, default=None,
                    help="with --stats running: the continuation momentum (default 5e-5, the reference's)")
    ca.add_argument("--momentum", type=float, default=None,
                    help="EMA statistics with this momentum instead of exact ones (the reference uses 5e-5, "
                         "continuing BatchNorm-style running stats from its base checkpoint; from a cold "
                         "start such a small momentum barely moves in one pass: use --ema-init first or a "
                         "larger momentum)")
    ca.add_argument("--ema-init", choices=["batchnorm", "first"], default=None,
                    help="EMA start: batchnorm (mean 0, var 1; default) or first (the first batch's statistics)")
    ca.add_argument("--mode", choices=["all", "mean_only", "std_only", "no_beta"], default=None,
                    help="ablation of the transform (paper Tab. 2; default all)")
    ca.add_argument("--beta", default=None,
                    help="min_fg (default), mean_fg, bg, none, or a number (paper Tab. 4)")
    ca.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    ca.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    ca.add_argument("--output-dir", help=argparse.SUPPRESS)
    ca.set_defaults(func=_cmd_calibrate)

    dm = sub.add_parser("demo", help="the main job: show the long-tail problem on the embedded dataset")
    dm.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    dm.add_argument("--seed", type=int, default=0, help="training seed (the data is the seed-0 dataset)")
    dm.add_argument("--jobs", type=int, default=None,
                    help="trainings run at once, one process each (default: one per CPU core)")
    dm.set_defaults(func=_cmd_demo)

    c = sub.add_parser("compare", help="run several recipes on the embedded dataset, one table")
    c.add_argument("--recipes", nargs="*", default=None,
                   help="recipe names or YAML paths (default: every built-in recipe); taildet classify "
                        "configs (data.manifest) are compared as classification recipes")
    c.add_argument("--out", default="runs/compare", help="run directory (default runs/compare)")
    c.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds (train.seed); statistics are over seeds (default: 0)")
    c.add_argument("--data-seeds", type=int, nargs="+", default=[0],
                   help="seeds of the embedded dataset, crossed with --seeds (default: 0)")
    c.add_argument("--scale", type=float, default=None,
                   help="embedded dataset size multiplier (default: the regime's, 1 for scratch / pretrained)")
    c.add_argument("--jobs", type=int, default=None,
                   help="trainings run at once, one process each (default: one per CPU core)")
    c.add_argument("--reuse", action="store_true",
                   help="do not rerun a (replicate, recipe) whose run directory already has its results; "
                        "continue an interrupted one of the same config from its last checkpoint")
    c.add_argument("--with-baselines", action="store_true",
                   help="also run each recipe's baselines, so every row gets its paired comparison")
    c.add_argument("--claims", nargs="?", const="", default=None, metavar="FILE",
                   help="evaluate the claims table (configs/evidence/claims.yaml, or FILE); without --recipes, "
                        "runs every recipe a claim names")
    c.add_argument("--regime", default="scratch",
                   help="benchmark regime (taildet.engine.pretrain.REGIMES): scratch (default), pretrained, "
                        "lvis150, lvis150_pretrained; one regime per --out")
    c.add_argument("--opts", nargs="*", default=[],
                   help="dotted config overrides applied to every recipe (e.g. train.iterations=3000)")
    c.set_defaults(func=_cmd_compare)

    dc = sub.add_parser("docs", help="regenerate the result tables of README.md / docs/RESULTS.md from "
                                      "their committed summaries")
    dc.add_argument("files", nargs="*", help="Markdown files (default: README.md docs/RESULTS.md)")
    dc.add_argument("--check", action="store_true", help="write nothing; exit 1 when a table is stale")
    dc.set_defaults(func=_cmd_docs)
    add_classify_parser(sub, _cmd_classify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TaildetError as err:
        diverged = type(err).__name__ == "TrainingDivergedError"
        print(f"taildet {args.command}: error: {err}", file=sys.stderr)
        return 3 if diverged else 2


if __name__ == "__main__":
    raise SystemExit(main())
