"""Feature mimicking on the hypersphere: the `l2` and `cosine` distillation terms.

* `l2`: ||s/|s| - t/|t|||^2 summed over dimensions, mean over the batch (2 - 2 cos per sample);
* `cosine`: mean over the batch of 1 - cos(s, t).
Labels are accepted for the common interface and not used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.losses.base import DistillMethod
from pipeline.losses.rank import check_kd_inputs, full_precision
from pipeline.settings import setting

# Calibrated (docs/quality.md): under --kd-scale grad-ratio a feature term's gradient at the embeddings is
# 1.5x the margin loss's.
FEATURE_RATIO = 1.5


class EmbeddingKDLoss(DistillMethod):
    """A term on (student, teacher) embedding rows: input checks, float32 outside autocast, overall weight."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    @classmethod
    def build(cls, config, stage2) -> "EmbeddingKDLoss":
        return cls()

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Weighted loss of the batch (a scalar); the teacher side carries no gradient."""
        check_kd_inputs(student_emb, teacher_emb, labels)
        dtype = torch.promote_types(student_emb.dtype, torch.float32)
        with full_precision(student_emb):
            return self.weight * self._loss(student_emb.to(dtype), teacher_emb.detach().to(dtype))

    def _loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def check_same_dim(s: torch.Tensor, t: torch.Tensor, name: str) -> None:
    if s.shape[1] != t.shape[1]:
        raise PipelineError(f"KD method {name!r} needs equal embedding sizes: student {s.shape[1]}-d, "
                            f"teacher {t.shape[1]}-d")


@dataclass
class L2Settings:
    l2_weight: float = setting(FEATURE_RATIO, "Weight of the l2 term (see --kd-scale).", min=0.0)


class FeatureL2Loss(EmbeddingKDLoss):
    """Mean over the batch of the squared distance between L2-normalised embeddings (summed over dims)."""

    name, settings, weight_field, same_dim = "l2", L2Settings, "l2_weight", True

    def _loss(self, s, t):
        check_same_dim(s, t, self.name)
        return (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum(dim=1).mean()


@dataclass
class CosineSettings:
    cosine_weight: float = setting(FEATURE_RATIO, "Weight of the cosine term (see --kd-scale).", min=0.0)


class CosineLoss(EmbeddingKDLoss):
    """Mean over the batch of 1 - cos(student, teacher)."""

    name, settings, weight_field, same_dim = "cosine", CosineSettings, "cosine_weight", True

    def _loss(self, s, t):
        check_same_dim(s, t, self.name)
        return (1.0 - (F.normalize(s, dim=1) * F.normalize(t, dim=1)).sum(dim=1)).mean()
