"""Training, fine-tuning, inference, checkpoints and DDP helpers.

``train(cfg)`` / ``finetune(cfg, ckpt)`` / ``evaluate_checkpoint(cfg, ckpt)`` are what the CLI
calls; ``inference(model, dataset, ...)`` turns a model's detections into LVIS result dicts.
"""

from taildet.engine.calibrate import calibrate_checkpoint
from taildet.engine.checkpoint import last_checkpoint, load_checkpoint, save_checkpoint
from taildet.engine.finetune import finetune
from taildet.engine.inference import evaluate_checkpoint, inference
from taildet.engine.schedule import build_scheduler, lr_factor
from taildet.engine.train import TrainingDivergedError, run_training, train

__all__ = [
    "train",
    "finetune",
    "run_training",
    "inference",
    "evaluate_checkpoint",
    "calibrate_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "last_checkpoint",
    "lr_factor",
    "build_scheduler",
    "TrainingDivergedError",
]
