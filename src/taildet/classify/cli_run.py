"""What ``taildet classify ...`` runs (the parser is in :mod:`taildet.cli`): one library call each."""

from __future__ import annotations

import argparse
import json

from taildet.classify.config import load_classify_config
from taildet.classify.demo import run_demo
from taildet.classify.engine import evaluate_classifier, train_classifier
from taildet.classify.report import format_table
from taildet.classify.splits import make_split


def _cfg(args: argparse.Namespace):

    opts = list(args.opts or [])
    if getattr(args, "output_dir", None) and args.classify_command == "train":
        opts.append(f"output_dir={args.output_dir}")
    return load_classify_config(args.config, opts)


def _print_metrics(metrics: dict) -> None:

    print(format_table(metrics["methods"]))


def run_classify_command(args: argparse.Namespace) -> int:
    cmd = args.classify_command
    if cmd == "split":

        out = make_split(args.src, args.out, args.imbalance, seed=args.seed, n_max=args.n_max,
                         test_per_class=args.test_per_class, val_per_class=args.val_per_class,
                         per_class=args.per_class, test_src=args.test_src)
        print(json.dumps(out, indent=1))
        return 0
    if cmd == "train":

        out = train_classifier(_cfg(args), resume=args.resume)
        if out["metrics"]:
            _print_metrics(out["metrics"])
        print(json.dumps({k: v for k, v in out.items() if k != "metrics"}, indent=1))
        return 0
    if cmd == "eval":

        _print_metrics(evaluate_classifier(_cfg(args), args.checkpoint, out_dir=args.output_dir))
        return 0
    if cmd == "demo":

        out = run_demo(args.out, data=args.data, seeds=args.seeds, epochs=args.epochs, summary=args.summary,
                       figure=args.figure)
        print(out["table"])
        return 0
    raise AssertionError(cmd)
