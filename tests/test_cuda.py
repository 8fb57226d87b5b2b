"""GPU paths: AMP training with gradient clipping, resume, inference and EFL under autocast.

These need a CUDA device and are skipped without one (CI has none; they are run on a GPU
machine by hand: ``pytest tests/test_cuda.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _opts(tmp_path, extra=()):
    return [f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", "data.synthetic.scale=0.1",
            "train.iterations=20", "train.warmup_iters=5", "train.checkpoint_period=10", "train.device=cuda",
            "train.amp=true", "train.grad_clip=10.0", "eval.max_dets=100", *extra]


@pytest.mark.parametrize("preset", ["demo_faster_tiny_ce.yaml", "demo_retinanet_tiny_focal.yaml"])
def test_amp_training_resume_and_eval_on_cuda(tmp_path, preset):
    from taildet.config import apply_overrides, load_config
    from taildet.engine import train

    cfg = apply_overrides(load_config(os.path.join(REPO, "configs", preset)), _opts(tmp_path))
    out = train(cfg, progress=False)
    assert 0.0 <= out["metrics"]["bbox"]["AP"] <= 1.0
    state = torch.load(out["checkpoint"], map_location="cpu", weights_only=False)
    assert all(v.device.type == "cpu" for v in state["model"].values() if torch.is_tensor(v))
    again = train(cfg, resume=True, progress=False, evaluate=False)
    assert again["checkpoint"] == out["checkpoint"]


def test_efl_under_autocast_accumulates_fp32_state():
    from taildet.losses import build_loss

    loss = build_loss("equalized_focal", 50).cuda()
    logits = torch.randn(4000, 50, device="cuda", requires_grad=True)
    labels = torch.randint(0, 51, (4000,), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        value = loss(logits.half(), labels)
    value.backward()
    assert torch.isfinite(value) and loss.pos_grad.dtype == torch.float32
    assert loss.pos_grad.sum() > 0 and loss.neg_grad.sum() > 0


def test_torchrun_nccl_single_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "taildet", "train",
           os.path.join(REPO, "configs", "demo_faster_tiny_ce.yaml"), "--opts",
           *_opts(tmp_path, ["train.iterations=6", "train.amp=false"])]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "model_final.pth").exists()
