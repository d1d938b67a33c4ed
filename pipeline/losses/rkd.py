"""Relational KD (`rkd`).

Relational KD (Park et al., CVPR 2019) on the raw embeddings, as in the authors' and TFace's code:
distance term = smooth-L1 between the pairwise Euclidean distance matrices, each divided by its mean
off-diagonal distance, averaged over all N^2 ordered entries (the zero diagonal included); angle term =
smooth-L1 between the cosines of the angle at vertex a of every ordered triplet (a, b, c),
<(e_b - e_a)/|e_b - e_a|, (e_c - e_a)/|e_c - e_a|>, averaged over all N^3 triplets (degenerate ones,
with b or c equal to a, are 0 for both models). Default weights 25 (distance) and 50 (angle). The angle
term costs O(N^2 D + N^3) memory for a global batch of N.
Labels are accepted for the common interface and not used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.losses.feature import FEATURE_RATIO, EmbeddingKDLoss
from pipeline.settings import setting

_EPS = 1e-12


@dataclass
class RKDSettings:
    rkd_weight: float = setting(FEATURE_RATIO, "Weight of the rkd term (see --kd-scale).", min=0.0)


class RKDLoss(EmbeddingKDLoss):
    """Relational KD: distance + angle terms (see the module docstring for the exact definition)."""

    name, settings, weight_field = "rkd", RKDSettings, "rkd_weight"

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
