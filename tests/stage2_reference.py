"""Reference values of the decoupled stage-2 recipes, as the code before "stage 2 is an ordinary
config" computed them (``tests/data/stage2_reference.json``, read by tests/test_stage2_config.py).

Written by running this file at commit 57c2df5 (the ``finetune:`` section, ``taildet.engine.finetune``)::

    git worktree add --detach /tmp/old 57c2df5
    cd /tmp/old && PYTHONPATH=src python <this file> tests/data/stage2_reference.json

It records, for every configs/*_ft.yaml, the stage-2 settings the old ``finetune`` ran with
(loss, loss kwargs, freeze patterns, reset, sampler, train schedule, MFS options), and, for each
demo recipe, a 3-iteration fine-tune of a 2-iteration stage-1 model (tiny synthetic set, one CPU
thread): the sha256 of every weight and optimizer tensor of the final checkpoint, the frozen
parameter names and the logged losses. The helpers below are shared with the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

#: Demo recipes fine-tuned in the reference (each 3 iterations from the same stage-1 model).
DEMO_RECIPES = ["demo_faster_tiny_crt_ft.yaml", "demo_faster_tiny_bsoftmax_ft.yaml",
                "demo_faster_tiny_bsigmoid_ft.yaml", "demo_faster_tiny_ebl_ft.yaml",
                "demo_faster_tiny_loce_ft.yaml", "demo_faster_tiny_mfs_ft.yaml",
                "demo_faster_tiny_loce_prior_ft.yaml"]

#: Recipes whose old run directory files (config.yaml, the checkpoint's config) are recorded.
OLD_RUN_FILES = ["demo_faster_tiny_bsigmoid_ft.yaml", "demo_faster_tiny_loce_ft.yaml"]


def stage1_overrides(tmp: Path) -> list[str]:
    return [f"output_dir={tmp / 's1'}", f"data.root={tmp / 'data'}", "data.synthetic.scale=0.05",
            "train.iterations=2", "train.warmup_iters=1", "data.batch_size=2", "train.device=cpu",
            "eval.enabled=false"]


def common_overrides(tmp: Path, name: str) -> list[str]:
    """Stage-2 overrides that are not in the ``finetune:`` section (same before and after)."""
    return [f"output_dir={tmp / 's2' / name}", f"data.root={tmp / 'data'}", "data.synthetic.scale=0.05",
            "data.batch_size=2", "eval.enabled=false"]


#: Stage-2 overrides, old spelling (``finetune.train.*`` / ``finetune.mfs.*``) -> new spelling.
STAGE2_OVERRIDES = {"finetune.train.iterations=3": "train.iterations=3",
                    "finetune.train.warmup_iters=1": "train.warmup_iters=1",
                    "finetune.train.log_period=1": "train.log_period=1",
                    "finetune.train.checkpoint_period=2": "train.checkpoint_period=2",
                    "finetune.train.device=cpu": "train.device=cpu"}
MFS_OVERRIDES = {"finetune.mfs.capacity=16": "train.mfs.capacity=16",
                 "finetune.mfs.prefill_images_per_class=1": "train.mfs.prefill_images_per_class=1"}


def digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(str(t.dtype).encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()[:20]


def fingerprint(ckpt_path: str, run_dir: str, frozen: list[str]) -> dict:
    """What must be bitwise equal: every weight, every optimizer buffer, iteration, lr, losses."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    opt = state["optimizer"]
    moms = {f"{g}/{i}": digest(s["momentum_buffer"]) for g, i, s in
            ((g, i, opt["state"][p]) for g, grp in enumerate(opt["param_groups"]) for i, p in enumerate(grp["params"])
             if p in opt["state"] and opt["state"][p].get("momentum_buffer") is not None)}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        logged = [json.loads(x) for x in fh]
    return {"weights": {k: digest(v) for k, v in sorted(state["model"].items())},
            "momentum": moms, "iteration": state["iteration"], "epoch": state["epoch"],
            "lr": [g["lr"] for g in opt["param_groups"]],
            "losses": [{k: v for k, v in r.items() if k.startswith("loss") or k in ("iteration", "lr", "epoch")}
                       for r in logged],
            "frozen": sorted(frozen)}


def _old_settings(cfg) -> dict:
    """Old code: what ``finetune(cfg, ckpt)`` trained with."""
    from taildet.config import _to_dict
    from taildet.engine.finetune import _stage2_train_cfg

    ft = cfg.finetune
    kw = dict(cfg.model.kwargs)
    if ft.loss is not None:
        kw["loss"] = ft.loss
    if ft.loss_kwargs is not None:
        kw["loss_kwargs"] = dict(ft.loss_kwargs)
    return {"model": {"arch": cfg.model.arch, **kw}, "train": _to_dict(_stage2_train_cfg(cfg)),
            "freeze": list(ft.freeze), "reset_classifier": ft.reset_classifier,
            "sampler": ft.sampler or cfg.data.sampler, "data": _to_dict(cfg.data), "mfs": _to_dict(ft.mfs),
            "eval": _to_dict(cfg.eval), "output_dir": cfg.output_dir}


def main(out: str) -> None:  # pragma: no cover - run by hand against the old code
    import tempfile

    from taildet.config import apply_overrides, load_config
    from taildet.engine import finetune, train

    torch.set_num_threads(1)
    ref: dict = {"settings": {}, "runs": {}, "old_run": {}}
    for f in sorted((REPO / "configs").glob("*_ft.yaml")):
        ref["settings"][f.name] = _old_settings(load_config(f))
    tmp = Path(tempfile.mkdtemp(prefix="stage2ref-"))
    s1 = train(apply_overrides(load_config(REPO / "configs" / "demo_faster_tiny_ce.yaml"), stage1_overrides(tmp)),
               progress=False)["checkpoint"]
    ref["stage1"] = {k: digest(v) for k, v in sorted(torch.load(s1, weights_only=False)["model"].items())}
    for name in DEMO_RECIPES:
        cfg = load_config(REPO / "configs" / name)
        opts = common_overrides(tmp, name) + list(STAGE2_OVERRIDES)
        if cfg.finetune.mfs.enabled:
            opts += list(MFS_OVERRIDES)
        cfg = apply_overrides(cfg, opts)
        frozen: list[str] = []

        def hook(it, st, frozen=frozen):
            if it == 1:
                frozen.extend(n for n, p in st["model"].named_parameters() if not p.requires_grad)

        res = finetune(cfg, s1, progress=False, hooks=[hook])
        ref["runs"][name] = fingerprint(res["checkpoint"], res["run_dir"], frozen)
        if name in OLD_RUN_FILES:  # an old run directory's configs, for the resume test
            with open(os.path.join(res["run_dir"], "config.yaml"), encoding="utf-8") as fh:
                text = fh.read().replace(str(tmp), "@TMP@")
            ck = torch.load(res["checkpoint"], weights_only=False)["config"]
            ref["old_run"][name] = {"config_yaml": text,
                                    "checkpoint_config": json.loads(json.dumps(ck).replace(str(tmp), "@TMP@"))}
        print(name, "done", file=sys.stderr)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(ref, fh, indent=0, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1])
