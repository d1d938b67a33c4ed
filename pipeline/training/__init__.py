"""The one training loop (loop) for teacher and students, its resume state (resume), face datasets and the
flip augmentation (data), batch samplers (samplers), SGD and LR schedules (optim) and DDP helpers (ddp)."""
from pipeline.training.loop import Distillation, TrainConfig, train

__all__ = ["Distillation", "TrainConfig", "train"]
