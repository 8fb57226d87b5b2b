"""Training, fine-tuning, inference, evaluation, calibration, checkpoints.

Modules, each importing only the ones above it: ``schedule``, ``checkpoint``, ``distributed``
(process-group set-up, loss-state sync), ``pretrain``, ``builders`` (every ``build_*``),
``rundir``, ``inference``, ``evaluate``, ``train`` (the trainer loop), ``calibrate``,
``finetune``. The rank / collective helpers are :mod:`taildet.utils.comm`.

``train(cfg)`` / ``finetune(cfg, ckpt)`` / ``evaluate_checkpoint(cfg, ckpt)`` are what the CLI
calls; ``inference(model, dataset, ...)`` turns a model's detections into LVIS result dicts.
"""

from taildet.engine.calibrate import calibrate_checkpoint
from taildet.engine.checkpoint import last_checkpoint, load_checkpoint, save_checkpoint
from taildet.engine.evaluate import evaluate_checkpoint
from taildet.engine.finetune import finetune
from taildet.engine.inference import inference
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
