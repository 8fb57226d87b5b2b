"""The ``taildet classify`` sub-commands' arguments (argparse only: ``taildet --help`` stays fast).

:func:`add_classify_parser` is called by :func:`taildet.cli.build_parser`; the command itself
(``func``) lives in :mod:`taildet.cli`, which imports what it runs lazily.
"""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["add_classify_parser"]


def add_classify_parser(sub, func: Callable[[argparse.Namespace], int]) -> None:
    """``taildet classify split|train|eval|demo`` (long-tailed image classification)."""
    cl = sub.add_parser("classify", help="long-tailed image classification: split, train, eval, demo")
    csub = cl.add_subparsers(dest="classify_command", required=True, metavar="CLASSIFY_COMMAND")
    sp = csub.add_parser("split", help="write a long-tailed (CIFAR-LT profile) train split and balanced "
                                       "val/test splits as a manifest")
    sp.add_argument("src", help="digits (scikit-learn's 8x8 digits), synthetic (the generator's object crops), "
                                "an image folder (one sub-folder per class) or an .npz (images, labels)")
    sp.add_argument("out", help="output directory (manifest.json, and images.npz for array sources)")
    sp.add_argument("--imbalance", type=float, default=100.0, help="n_max / n_min of the exponential profile "
                                                                   "(default 100)")
    sp.add_argument("--n-max", type=int, default=None,
                    help="training images of class 0 (default: the smallest class pool left)")
    sp.add_argument("--test-per-class", type=int, default=40, help="balanced test images per class (default 40)")
    sp.add_argument("--val-per-class", type=int, default=20,
                    help="balanced validation images per class (default 20; tau-normalisation picks tau on it)")
    sp.add_argument("--per-class", type=int, default=None,
                    help="synthetic: crops rendered per class before the split (default 60)")
    sp.add_argument("--seed", type=int, default=0, help="which images each split takes (and the synthetic crops)")
    sp.add_argument("--test-src", default=None,
                    help="a separate test set of the same kind and classes (e.g. CIFAR's official test set); "
                         "all of it is the test split (use with --test-per-class 0)")
    for name, text in (("train", "train a classifier from a YAML config (works under torchrun)"),
                       ("eval", "evaluate a checkpoint: raw, LogN, logit adjustment, tau-normalisation")):
        c = csub.add_parser(name, help=text)
        c.add_argument("config", help="classification YAML config (see configs/classify/)")
        if name == "eval":
            c.add_argument("checkpoint", help="checkpoint (.pth)")
            c.add_argument("--output-dir", help="where metrics.json and the plot go (default: beside the checkpoint)")
        else:
            c.add_argument("--output-dir", help="run directory (overrides output_dir)")
            c.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
        c.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    dm = csub.add_parser("demo", help="CE vs Balanced Softmax vs CE + LogN vs cRT over seeds, with a table")
    dm.add_argument("--out", default="runs/demo_classify", help="run directory (default runs/demo_classify)")
    dm.add_argument("--data", default="digits", help="digits (default) or synthetic")
    dm.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    dm.add_argument("--epochs", type=int, default=None, help="epochs of each training (default: the demo's)")
    dm.add_argument("--summary", default=None, help="also write the summary JSON here (e.g. docs/results/...)")
    dm.add_argument("--figure", default=None, help="also write the per-class accuracy figure here (e.g. docs/img/...)")
    cl.set_defaults(func=func)
