"""EKD offline distillation pipeline for face recognition (library layer)."""

__version__ = "0.1.0"
