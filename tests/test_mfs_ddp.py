"""LOCE fine-tune (EBL + MFS, with the memory pre-fill) under torchrun with 2 gloo processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from taildet.config import apply_overrides, load_config
from taildet.engine import train

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loce_finetune_two_process_gloo(tmp_path):
    opts = [f"data.root={tmp_path / 'data'}", "data.synthetic.scale=0.05", "train.iterations=2",
            "train.warmup_iters=1", "data.batch_size=2", "train.device=cpu", "eval.max_dets=20",
            "train.checkpoint_period=2"]
    cfg = apply_overrides(load_config(os.path.join(REPO, "configs", "demo_faster_tiny_ce.yaml")),
                          opts + [f"output_dir={tmp_path / 's1'}"])
    stage1 = train(cfg, progress=False)["checkpoint"]
    with socket.socket() as sock:  # a free port for the rendezvous (29500 may be taken)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "taildet", "finetune",
           os.path.join(REPO, "configs", "demo_faster_tiny_loce_ft.yaml"), "--from", stage1,
           "--output-dir", str(tmp_path / "s2"), "--opts", *opts]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stderr + res.stdout
    assert (tmp_path / "s2" / "model_final.pth").exists()
    assert (tmp_path / "s2" / "metrics.json").exists()
