"""The teacher targets a training step reads: one cache's rows, an ensemble's, and the learned map that lets
feature terms compare a student with a teacher of another embedding size.

* `CachedTargets`: the cached embedding of each sample, in the view that matches its flip.
* `EnsembleTargets`: several caches of one training set read as one teacher, per step, without the
  concatenation ever being stored: each member's row L2-normalised and scaled by sqrt(share), concatenated
  (so a pair's inner product is the weighted mean of the members' cosines; pipeline/cache/ensemble.py).
* `StudentProjection`: a bias-free linear map from the student's embedding to the teacher's dimension, used
  by the terms that compare embeddings coordinate by coordinate (feature L2, cosine) when the dimensions
  differ (an ensemble, or a 512-d teacher for a 128-d student). It trains with the student, is checkpointed
  with the KD modules, and is not part of the exported model: the student's own embedding is what ships.
  Similarity terms (EKD, RKD) need no map: they compare pair similarities, which exist in any dimension.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.training import ddp


def _view_of(table: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """The view index of each sample: its flip when the table holds both views, else view 0."""
    return flips.long() if table.shape[1] > 1 else torch.zeros_like(flips, dtype=torch.long)


class CachedTargets:
    """The cached teacher embedding of each sample, in the view that matches the sample's flip."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # (N, views, D), any float dtype; one view means flips share it

    @property
    def dim(self) -> int:
        return int(self.table.shape[-1])

    def __call__(self, images, indices: torch.Tensor, flips: torch.Tensor, device) -> torch.Tensor:
        return self.table[indices, _view_of(self.table, flips)].to(device, non_blocking=True).float()


class EnsembleTargets:
    """Several (N, views, D_k) cache tables looked up per step and read as one (N, D_1 + ... + D_K) teacher."""

    def __init__(self, tables: Sequence[torch.Tensor], shares: Sequence[float]):
        if len(tables) != len(shares) or not tables:
            raise ValueError("EnsembleTargets needs one share per table")
        self.tables, self.scales = list(tables), [float(s) ** 0.5 for s in shares]

    @property
    def dim(self) -> int:
        return sum(int(t.shape[-1]) for t in self.tables)

    def __call__(self, images, indices: torch.Tensor, flips: torch.Tensor, device) -> torch.Tensor:
        parts = [F.normalize(table[indices, _view_of(table, flips)].float(), dim=1) * scale
                 for table, scale in zip(self.tables, self.scales)]
        return torch.cat(parts, dim=1).to(device, non_blocking=True)


class StudentProjection(nn.Module):
    """x -> x W^T, from the student's `student_dim` to the teacher's `teacher_dim` (see the module docstring).

    Under DDP it is applied to each rank's own embeddings before the KD inputs are gathered, so the gradient
    each rank computes covers its own samples; `average_gradients` then averages them like DDP does for the
    backbone."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.linear = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear(embeddings.to(self.linear.weight.dtype))  # float32 under AMP too

    @torch.no_grad()
    def average_gradients(self) -> None:
        if not ddp.is_distributed():
            return
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad.copy_(ddp.all_reduce_sum(parameter.grad) / ddp.world_size())
