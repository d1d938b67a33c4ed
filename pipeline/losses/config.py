"""The distillation settings of a student, declared once (CLI options and params.yaml keys derive from them)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from pipeline.errors import PipelineError
from pipeline.losses.ekd import EKDMode
from pipeline.losses.kd import KDMethod, build_kd_loss
from pipeline.settings import check, setting


@dataclass
class KDConfig:
    """Which KD loss a student trains with, and its knobs."""

    kd: str = setting("ekd", "KD loss: none, l2, cosine, rkd or ekd.", choices=KDMethod)
    kd_weight: float = setting(1.0, "Multiplier of the KD loss.", min=0.0)
    ekd_mode: str = setting("global", "global (exact teacher thresholds, student queue) or reference "
                                      "(official TFace behaviour).", choices=EKDMode)
    queue_size: int = setting(65536, "EKD global mode: recent student embeddings kept for the student's "
                                     "thresholds.", min=1)

    def __post_init__(self):
        check(self)

    @property
    def needs_thresholds(self) -> bool:
        """True when the loss reads the teacher's global thresholds (thresholds.json)."""
        return self.kd == KDMethod.ekd and self.ekd_mode == EKDMode.global_

    def build(self, teacher_thresholds: Mapping | None = None) -> nn.Module | None:
        """The loss module (None for kd none); `teacher_thresholds` from thresholds.json for EKD global."""
        if self.kd != KDMethod.ekd:
            return build_kd_loss(self.kd)
        options = {"mode": self.ekd_mode}
        if self.needs_thresholds:
            if teacher_thresholds is None:
                raise PipelineError("--ekd-mode global needs --pools (thresholds.json from build-pools)")
            options.update(teacher_thresholds=teacher_thresholds, queue_size=self.queue_size)
        return build_kd_loss(self.kd, **options)
