"""The optional knowledge-distillation part of a training step: a KD loss fed with the teacher's targets.

Targets come from a lookup called with the batch (`targets(images, indices, flips, device)`); the pipeline
uses `CachedTargets`, the (N, views, D) teacher cache looked up by sample index in the view matching each
sample's flip. Under DDP the KD loss sees the batch gathered over all ranks (see ddp.py for the gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pipeline.training import ddp

TargetLookup = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.device], torch.Tensor]


class CachedTargets:
    """The cached teacher embedding of each sample, in the view that matches the sample's flip."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # (N, views, D), any float dtype; one view means flips share it

    def __call__(self, images, indices: torch.Tensor, flips: torch.Tensor, device) -> torch.Tensor:
        views = flips.long() if self.table.shape[1] > 1 else torch.zeros_like(flips, dtype=torch.long)
        return self.table[indices, views].to(device, non_blocking=True).float()


@dataclass
class Distillation:
    """A KD loss, the teacher targets (a lookup, or a (N, views, D) tensor for `CachedTargets`) and a weight."""

    loss: nn.Module
    targets: TargetLookup | torch.Tensor
    weight: float = 1.0

    def __post_init__(self):
        if isinstance(self.targets, torch.Tensor):
            self.targets = CachedTargets(self.targets)

    def term(self, embeddings: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Weighted KD loss on the batch gathered over all ranks; scaled so DDP's gradient averaging is exact."""
        student, teacher, labels = ddp.gather_kd_inputs(embeddings, targets, labels)
        return ddp.scale_for_ddp(self.loss(student.float(), teacher, labels)) * self.weight
