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

from taildet.errors import ConfigError, TaildetError


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from taildet.data.stats import dataset_stats, format_stats, plot_long_tail
    from taildet.data.synthetic import make_dataset

    info = make_dataset(args.out_dir, seed=args.seed, scale=args.scale)
    stats = dataset_stats(info["train_json"])
    print(format_stats(stats))
    png = plot_long_tail(stats, Path(args.out_dir) / "long_tail.png")
    print(f"train: {info['train_json']}\nval:   {info['val_json']}\nlong-tail plot: {png}")
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from taildet.data.stats import dataset_stats, format_stats, plot_long_tail

    stats = dataset_stats(args.ann)
    print(format_stats(stats))
    out = Path(args.out) if args.out else Path(args.ann).with_suffix(".long_tail.png")
    print(f"long-tail plot: {plot_long_tail(stats, out)}")
    return 0


def _cmd_eval_results(args: argparse.Namespace) -> int:
    from taildet.evaluation import eval_results_main

    eval_results_main(args.gt, args.results, iou_type=args.iou_type, fixed=args.fixed, out=args.out)
    return 0


def _load_cfg(args: argparse.Namespace):
    from taildet.config import apply_overrides, load_config

    cfg = load_config(args.config)
    if getattr(args, "opts", None):
        cfg = apply_overrides(cfg, args.opts)
    if getattr(args, "output_dir", None):
        cfg = apply_overrides(cfg, [f"output_dir={args.output_dir}"])
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from taildet.engine import train

    out = train(_load_cfg(args), resume=args.resume)
    print(json.dumps({k: v for k, v in out.items() if k != "metrics"}, default=str, indent=1))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from taildet.engine import finetune

    out = finetune(_load_cfg(args), args.from_checkpoint, resume=args.resume)
    print(json.dumps({k: v for k, v in out.items() if k != "metrics"}, default=str, indent=1))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from taildet.engine import evaluate_checkpoint

    from taildet.evaluation import format_metrics_table

    metrics = evaluate_checkpoint(_load_cfg(args), args.checkpoint, calibration=args.calibration,
                                  out_dir=args.output_dir)
    name = Path(args.checkpoint).name
    rows = {f"{name} ({iou})": m for iou, m in metrics.items() if isinstance(m, dict)} or {name: metrics}
    print(format_metrics_table(rows))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from taildet.engine import calibrate_checkpoint

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
    path = calibrate_checkpoint(_load_cfg(args), args.checkpoint, args.out, momentum=args.momentum,
                                max_batches=args.max_batches, **kwargs)
    print(f"logit statistics: {path}\nevaluate with: taildet eval {args.config} {args.checkpoint} "
          f"--calibration {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from taildet.compare import run_demo

    run_demo(args.out, seed=args.seed, jobs=args.jobs)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from taildet.compare import run_compare

    run_compare(args.recipes, args.out, seed=args.seed, jobs=args.jobs, reuse=args.reuse)
    return 0


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
    s.set_defaults(func=_cmd_data_synth)
    st = dsub.add_parser("stats", help="per-group counts and the long-tail histogram of an annotation file")
    st.add_argument("ann", help="LVIS or COCO instance JSON")
    st.add_argument("--out", help="PNG path of the histogram (default: next to the JSON)")
    st.set_defaults(func=_cmd_data_stats)

    e = sub.add_parser("eval-results", help="evaluate a results JSON against LVIS/COCO ground truth")
    e.add_argument("gt", help="ground-truth annotation JSON (LVIS v1 or COCO)")
    e.add_argument("results", help="results JSON: list of {image_id, category_id, bbox|segmentation, score}")
    e.add_argument("--iou-type", choices=["bbox", "segm"], default="bbox", help="what to evaluate")
    e.add_argument("--fixed", action="store_true",
                   help="AP-fixed (Dave et al. 2021): no per-image cap, top 10,000 detections per class")
    e.add_argument("--out", help="directory for metrics.json and the per-class AP plot")
    e.set_defaults(func=_cmd_eval_results)

    t = sub.add_parser("train", help="train a detector from a YAML config (works under torchrun)")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. train.lr=0.01 data.sampler=rfs")
    t.add_argument("--output-dir", help="run directory (overrides output_dir)")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    t.set_defaults(func=_cmd_train)

    f = sub.add_parser("finetune", help="decoupled stage-2 fine-tune from a stage-1 checkpoint")
    f.add_argument("config", help="YAML config with a finetune: section")
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
                                          "directory; with --calibration its eval_calibrated/ subdirectory)")
    ev.add_argument("--calibration", help="logit statistics file from `taildet calibrate` (LogN)")
    ev.set_defaults(func=_cmd_eval)

    ca = sub.add_parser("calibrate", help="LogN: collect logit statistics of a trained detector "
                                          "over its training set (no training)")
    ca.add_argument("config", help="YAML config the checkpoint was trained with")
    ca.add_argument("checkpoint", help="checkpoint (.pth)")
    ca.add_argument("--out", help="statistics file (default: logit_stats.json beside the checkpoint)")
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
    dm.add_argument("--seed", type=int, default=0, help="seed of data and training")
    dm.add_argument("--jobs", type=int, default=None,
                    help="trainings run at once, one process each (default: one per CPU core)")
    dm.set_defaults(func=_cmd_demo)

    c = sub.add_parser("compare", help="run several recipes on the embedded dataset, one table")
    c.add_argument("--recipes", nargs="*", default=None,
                   help="recipe names or YAML paths (default: every built-in recipe)")
    c.add_argument("--out", default="runs/compare", help="run directory (default runs/compare)")
    c.add_argument("--seed", type=int, default=0, help="seed of data and training")
    c.add_argument("--jobs", type=int, default=None,
                   help="trainings run at once, one process each (default: one per CPU core)")
    c.add_argument("--reuse", action="store_true",
                   help="do not retrain stage-1 recipes whose run directory already has model_final.pth")
    c.set_defaults(func=_cmd_compare)
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
