"""Merging a derived config onto its base (``_base_``, overrides, the former ``finetune:``)."""

from __future__ import annotations

import copy


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("loss_kwargs",):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _exclusive_fix(base: dict, over: dict) -> dict:
    """A derived file that sets train.epochs drops the base's train.iterations (and vice versa)."""
    bt, ot = base.get("train"), over.get("train")
    if isinstance(bt, dict) and isinstance(ot, dict):
        bt = dict(bt)
        if "epochs" in ot and "iterations" not in ot:
            bt.pop("iterations", None)
        if "iterations" in ot and "epochs" not in ot:
            bt.pop("epochs", None)
        base = {**base, "train": bt}
    bd, od = base.get("data"), over.get("data")
    if isinstance(bd, dict) and isinstance(od, dict):
        bd = dict(bd)
        if "train_json" in od and "synthetic" not in od:
            bd.pop("synthetic", None)
        if "synthetic" in od and "train_json" not in od:
            for k in ("train_json", "val_json", "image_root", "val_image_root"):
                bd.pop(k, None)
        base = {**base, "data": bd}
    return base
