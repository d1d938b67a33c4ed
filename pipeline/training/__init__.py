"""The one training loop (loop) for teacher and students: its settings (config), one optimisation step
(step), the optional distillation term (distill), resume state (resume), face datasets and the flip
augmentation (data), batch samplers (samplers), SGD and LR schedules (optim) and DDP helpers (ddp)."""
from pipeline.training.config import TrainConfig
from pipeline.training.distill import CachedTargets, Distillation
from pipeline.training.loop import train
from pipeline.training.step import TrainStep

__all__ = ["CachedTargets", "Distillation", "TrainConfig", "TrainStep", "train"]
