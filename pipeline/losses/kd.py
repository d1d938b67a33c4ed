"""KD baselines with EKD's interface, `loss(student_emb, teacher_emb, labels) -> scalar`, and the builder.

* `l2`: feature mimicking on the hypersphere: ||s/|s| - t/|t|||^2 summed over dimensions, mean over the batch
  (equals 2 - 2 cos, i.e. twice the cosine loss, per sample).
* `cosine`: mean over the batch of 1 - cos(s, t).
* `rkd`: relational KD (Park et al., CVPR 2019) on the raw embeddings, as in the authors' and TFace's code:
  distance term = smooth-L1 between the pairwise Euclidean distance matrices, each divided by its mean
  off-diagonal distance, averaged over all N^2 ordered entries (the zero diagonal included); angle term =
  smooth-L1 between the cosines of the angle at vertex a of every ordered triplet (a, b, c),
  <(e_b - e_a)/|e_b - e_a|, (e_c - e_a)/|e_c - e_a|>, averaged over all N^3 triplets (degenerate ones,
  with b or c equal to a, are 0 for both models). Default weights 25 (distance) and 50 (angle). The angle
  term costs O(N^2 D + N^3) memory for a global batch of N.
Labels are accepted for the common interface and not used by these baselines.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.losses.ekd import EKDLoss
from pipeline.losses.rank import check_kd_inputs, full_precision
from pipeline.settings import Choice

_EPS = 1e-12


class _EmbeddingKDLoss(nn.Module):
    """Shared plumbing: input checks, float32 outside autocast, overall weight."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Weighted loss of the batch (a scalar); the teacher side carries no gradient."""
        check_kd_inputs(student_emb, teacher_emb, labels)
        dtype = torch.promote_types(student_emb.dtype, torch.float32)
        with full_precision(student_emb):
            return self.weight * self._loss(student_emb.to(dtype), teacher_emb.detach().to(dtype))

    def _loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FeatureL2Loss(_EmbeddingKDLoss):
    """Mean over the batch of the squared distance between L2-normalised embeddings (summed over dims)."""

    def _loss(self, s, t):
        _check_same_dim(s, t, "l2")
        return (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum(dim=1).mean()


class CosineLoss(_EmbeddingKDLoss):
    """Mean over the batch of 1 - cos(student, teacher)."""

    def _loss(self, s, t):
        _check_same_dim(s, t, "cosine")
        return (1.0 - (F.normalize(s, dim=1) * F.normalize(t, dim=1)).sum(dim=1)).mean()


class RKDLoss(_EmbeddingKDLoss):
    """Relational KD: distance + angle terms (see the module docstring for the exact definition)."""

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, weight: float = 1.0):
        super().__init__(weight)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def _loss(self, s, t):
        loss = s.sum() * 0.0
        if self.distance_weight:
            loss = loss + self.distance_weight * F.smooth_l1_loss(_normalised_distances(s),
                                                                  _normalised_distances(t))
        if self.angle_weight:
            loss = loss + self.angle_weight * F.smooth_l1_loss(_vertex_cosines(s), _vertex_cosines(t))
        return loss


def _normalised_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances (diagonal 0) divided by their mean over the off-diagonal entries."""
    sq = x.pow(2).sum(dim=1)
    # Clamping before the sqrt keeps the gradient finite for (near-)duplicate rows; the diagonal is masked.
    d = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())).clamp(min=_EPS).sqrt()
    off_diagonal = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    d = d * off_diagonal
    if x.shape[0] < 2:
        return d
    return d / d[off_diagonal].mean()


def _vertex_cosines(x: torch.Tensor) -> torch.Tensor:
    """cos of the angle at a in every ordered triplet (a, b, c), shape (N, N, N); 0 where b or c equals a."""
    unit = F.normalize(x[None, :, :] - x[:, None, :], dim=2, eps=_EPS)  # unit[a, b] = (x_b - x_a)/|x_b - x_a|
    return torch.bmm(unit, unit.transpose(1, 2))


def _check_same_dim(s: torch.Tensor, t: torch.Tensor, name: str) -> None:
    if s.shape[1] != t.shape[1]:
        raise PipelineError(f"KD loss {name!r} needs equal embedding sizes: student {s.shape[1]}-d, "
                            f"teacher {t.shape[1]}-d")


class KDMethod(Choice):
    """Knowledge-distillation losses (none = margin loss only)."""

    none = "none"
    l2 = "l2"
    cosine = "cosine"
    rkd = "rkd"
    ekd = "ekd"
    l2_ekd = "l2+ekd"  # two terms, composed by KDConfig


KD_LOSSES = KDMethod.values()


def build_kd_loss(name: str, weight: float = 1.0, **kwargs) -> nn.Module | None:
    """KD loss by name: "none" -> None, "l2", "cosine", "rkd" (distance_weight, angle_weight), "ekd"
    (mode, teacher_thresholds, queue_size, topk, temperature, anchors, ...; see EKDLoss)."""
    classes = {"l2": FeatureL2Loss, "cosine": CosineLoss, "rkd": RKDLoss, "ekd": EKDLoss}
    if name == "none":
        if kwargs:
            raise PipelineError(f"KD loss 'none' takes no options (got {', '.join(sorted(kwargs))})")
        return None
    if name not in classes:
        raise PipelineError(f"unknown KD loss {name!r}: choose one of none, {', '.join(classes)}")
    try:
        return classes[name](weight=weight, **kwargs)
    except TypeError as err:
        raise PipelineError(f"KD loss {name!r}: bad option ({err})") from None
