"""Stage 2 is an ordinary config (``_base_`` + ``model.init_from`` + ``train.freeze``): the migrated
configs/*_ft.yaml train exactly as the former ``finetune:`` section did, bitwise, against values
recorded by running the old code (tests/stage2_reference.py -> tests/data/stage2_reference.json);
old configs fail with the new spelling; old run directories still resume and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from stage2_reference import (DEMO_RECIPES, MFS_OVERRIDES, OLD_RUN_FILES, REPO, STAGE2_OVERRIDES, common_overrides,
                              digest, fingerprint, stage1_overrides)

from taildet.config import _to_dict, apply_overrides, config_from_dict, load_config
from taildet.engine import evaluate_checkpoint, finetune, train
from taildet.engine.checkpoint import load_checkpoint, save_checkpoint
from taildet.errors import ConfigError

REF = json.loads((Path(__file__).parent / "data" / "stage2_reference.json").read_text())


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference was recorded
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("stage2")
    cfg = apply_overrides(load_config(REPO / "configs" / "demo_faster_tiny_ce.yaml"), stage1_overrides(tmp))
    ckpt = train(cfg, progress=False)["checkpoint"]
    return tmp, ckpt


def _new_settings(cfg) -> dict:
    """The new config's stage-2 settings, in the shape stage2_reference._old_settings records."""
    train_d = _to_dict(cfg.train)
    freeze, mfs = train_d.pop("freeze"), train_d.pop("mfs")
    return {"model": {"arch": cfg.model.arch, **cfg.model.kwargs}, "train": train_d, "freeze": freeze,
            "reset_classifier": cfg.model.reset_classifier, "sampler": cfg.data.sampler,
            "data": _to_dict(cfg.data), "mfs": mfs, "eval": _to_dict(cfg.eval), "output_dir": cfg.output_dir}


@pytest.mark.parametrize("name", sorted(REF["settings"]))
def test_migrated_config_has_the_old_stage2_settings(name):
    cfg = load_config(REPO / "configs" / name)
    new, old = json.loads(json.dumps(_new_settings(cfg))), dict(REF["settings"][name])
    old_data = dict(old.pop("data"))
    new_data = new.pop("data")
    old_data.pop("sampler"), new_data.pop("sampler")  # the stage-2 sampler is compared as "sampler"
    assert new == old and new_data == old_data
    assert cfg.model.init_from and cfg.model.init_from.endswith("model_final.pth")
    assert sorted((REPO / "configs").glob("*_ft.yaml")) == sorted(REPO / "configs" / n for n in REF["settings"])


def test_stage1_model_is_the_reference_one(stage1):
    _, ckpt = stage1
    assert {k: digest(v) for k, v in sorted(load_checkpoint(ckpt)["model"].items())} == REF["stage1"]


def _stage2_cfg(tmp, name, extra=()):
    cfg = load_config(REPO / "configs" / name)
    opts = common_overrides(tmp, name) + list(STAGE2_OVERRIDES.values())
    if cfg.train.mfs.enabled:
        opts += list(MFS_OVERRIDES.values())
    return apply_overrides(cfg, opts + list(extra))


def _frozen_hook(frozen: list):
    def hook(it, st):
        if it == 1:
            frozen.extend(n for n, p in st["model"].named_parameters() if not p.requires_grad)
    return hook


@pytest.mark.parametrize("name", DEMO_RECIPES)
def test_stage2_trains_bitwise_as_the_old_finetune_section(stage1, name):
    """3 iterations from the same stage-1 model: every weight, momentum buffer, lr, logged loss
    and the frozen set equal the old code's. Half run as ``train`` with ``model.init_from``, half
    through the ``finetune`` sugar."""
    tmp, ckpt = stage1
    frozen: list = []
    if DEMO_RECIPES.index(name) % 2:
        cfg = _stage2_cfg(tmp, name, [f"model.init_from={ckpt}"])
        out = train(cfg, progress=False, hooks=[_frozen_hook(frozen)])
    else:
        out = finetune(_stage2_cfg(tmp, name), ckpt, progress=False, hooks=[_frozen_hook(frozen)])
    got, ref = fingerprint(out["checkpoint"], out["run_dir"], frozen), REF["runs"][name]
    assert got["frozen"] == ref["frozen"]
    assert got["losses"] == ref["losses"]
    assert got == ref
    assert load_checkpoint(out["checkpoint"])["config"]["model"]["init_from"] == str(ckpt)


def _old_run_dir(tmp, ckpt, name) -> tuple:
    """A run directory as the old code left it after 2 of 3 iterations: trained to iteration 2 by
    this code, then its config.yaml and the checkpoint's config replaced by the old code's."""
    class Stop(Exception):
        """Raised by a hook to end the run after iteration 2, as a killed run would."""

    def stop(it, st):
        if it == 2:
            raise Stop

    cfg = _stage2_cfg(tmp, name, [f"output_dir={tmp / 'old' / name}"])
    with pytest.raises(Stop):
        finetune(cfg, ckpt, progress=False, hooks=[stop])
    old = REF["old_run"][name]
    run = Path(cfg.output_dir)
    old_yaml = old["config_yaml"].replace("@TMP@", str(tmp)).replace(
        str(tmp / "s2" / name), str(run))
    (run / "config.yaml").write_text(old_yaml)
    state = load_checkpoint(run / "checkpoint_0000002.pth")
    state["config"] = json.loads(json.dumps(old["checkpoint_config"]).replace("@TMP@", str(tmp)).replace(
        str(tmp / "s2" / name), str(run)))
    assert "finetune" in state["config"] and "finetune" in yaml.safe_load(old_yaml)
    save_checkpoint(str(run / "checkpoint_0000002.pth"), **state)
    return cfg, run


@pytest.mark.parametrize("name", OLD_RUN_FILES)
def test_old_stage2_run_resumes_and_evaluates(stage1, name):
    tmp, ckpt = stage1
    cfg, run = _old_run_dir(tmp, ckpt, name)
    out = finetune(cfg, ckpt, resume=True, progress=False)
    final = load_checkpoint(out["checkpoint"])
    assert final["iteration"] == 3
    if name in REF["runs"] and not cfg.train.mfs.enabled:  # MFS re-fills its memory after a resume
        assert fingerprint(out["checkpoint"], out["run_dir"], REF["runs"][name]["frozen"]) == REF["runs"][name]
    metrics = evaluate_checkpoint(apply_overrides(cfg, ["eval.max_dets=20"]), str(run / "checkpoint_0000002.pth"),
                                  out_dir=str(tmp / "eval" / name), progress=False)
    assert "AP" in metrics["bbox"]
    # a changed stage-2 value is still caught by the resume check of the old run directory
    with pytest.raises(ConfigError, match="train.lr"):
        finetune(apply_overrides(cfg, ["train.lr=0.5"]), ckpt, resume=True, progress=False)


def test_finetune_section_is_an_error_showing_the_new_spelling(tmp_path):
    path = tmp_path / "old_ft.yaml"
    path.write_text(f"_base_: {REPO / 'configs' / 'demo_faster_tiny_ce.yaml'}\n"
                    "finetune:\n  loss: softmax_ce\n  reset_classifier: true\n  sampler: class_balanced\n"
                    "  train: {iterations: 400, lr: 0.01}\n  mfs: {capacity: 8}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: finetune: ") and "is gone" in msg
    new = yaml.safe_load(msg.split("becomes:\n", 1)[1])
    assert new == {"model": {"init_from": "<the stage-1 model_final.pth>", "loss": "softmax_ce",
                             "reset_classifier": True},
                   "train": {"freeze": "loce", "iterations": 400, "lr": 0.01, "mfs": {"capacity": 8}},
                   "data": {"sampler": "class_balanced"}}
    # the suggested sections load, with the old default freeze (LOCE's policy) written out
    text = path.read_text().split("finetune:")[0] + yaml.safe_dump(
        {**new, "model": {**new["model"], "init_from": "s1.pth"}})
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.train.freeze == [r"^backbone\.", r"^roi_heads\.box_head\."] and cfg.train.iterations == 400
    assert cfg.train.epochs is None and cfg.data.sampler == "class_balanced" and cfg.train.mfs.capacity == 8
    with pytest.raises(ConfigError, match=r"(?s)overrides\): finetune: .*train\.freeze"):
        apply_overrides(cfg, ["finetune.train.iterations=2"])


def test_default_finetune_section_of_an_old_stage1_run_is_dropped(stage1):
    """Earlier versions saved an (unused) all-default finetune: section into every config.yaml."""
    tmp, _ = stage1
    saved = yaml.safe_load(REF["old_run"][OLD_RUN_FILES[0]]["config_yaml"].replace("@TMP@", str(tmp)))
    saved["finetune"] = {"freeze": [r"^backbone\.", r"^roi_heads\.box_head\."], "reset_classifier": False,
                         "loss": None, "loss_kwargs": None, "sampler": None, "train": {},
                         "mfs": REF["settings"]["demo_faster_tiny_crt_ft.yaml"]["mfs"]}
    cfg = config_from_dict(saved)
    assert cfg.train.freeze == [] and cfg.model.init_from is None and cfg.train.iterations == 1500
    saved["finetune"]["loss"] = "equilibrium"
    with pytest.raises(ConfigError, match="finetune: the finetune: section is gone"):
        config_from_dict(saved)


def test_freeze_presets_and_reset_needs_init_from(tmp_path):
    base = yaml.safe_load((REPO / "configs" / "demo_faster_tiny_ce.yaml").read_text())
    cfg = config_from_dict({**base, "train": {**base["train"], "freeze": ["classifier_only", "^rpn\\."]}})
    assert cfg.train.freeze == [r"^(?!roi_heads\.box_predictor\.cls_score\.)", r"^rpn\."]
    with pytest.raises(ConfigError, match=r"train\.freeze: item 0: invalid regular expression"):
        config_from_dict({**base, "train": {**base["train"], "freeze": ["("]}})
    cfg = apply_overrides(config_from_dict(base), [f"output_dir={tmp_path / 'r'}", "model.reset_classifier=true",
                                                   f"data.root={tmp_path / 'data'}", "data.synthetic.scale=0.05"])
    with pytest.raises(ConfigError, match="model.reset_classifier: .*model.init_from"):
        train(cfg, progress=False)
    assert not (tmp_path / "r").exists()
