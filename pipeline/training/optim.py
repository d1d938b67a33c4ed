"""SGD with weight decay off BatchNorm, and the warmup + step / polynomial learning-rate schedules."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from pipeline.settings import Choice


class LRSchedule(Choice):
    """Learning-rate decay after the warmup."""

    poly = "poly"
    step = "step"
    cosine = "cosine"


def sgd_without_bn_decay(
    modules: Iterable[nn.Module], lr: float, momentum: float, weight_decay: float
) -> torch.optim.SGD:
    """SGD over every trainable parameter; BatchNorm weights and biases get no weight decay."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            is_norm = isinstance(sub, nn.modules.batchnorm._BatchNorm)
            for param in sub.parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                (no_decay if is_norm else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def lr_factor(
    step: int,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float = 0.0,
    schedule: str = "poly",
    milestones: Sequence[float] = (),
    power: float = 2.0,
) -> float:
    """Multiplier of the base LR at optimiser step `step` (0-based).

    Linear warmup over `warmup_epochs`, then either `step` (x0.1 at each epoch in `milestones`) or `poly`
    ((1 - progress) ** power over the remaining steps, as arcface_torch's PolyScheduler).
    """
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "step":
        epoch = step / steps_per_epoch
        return 0.1 ** sum(epoch >= m for m in milestones)
    if schedule == "poly":
        total = max(1, epochs * steps_per_epoch - warmup)
        return max(0.0, 1.0 - (step - warmup) / total) ** power
    if schedule == "cosine":
        total = max(1, epochs * steps_per_epoch - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / total)))
    raise ValueError(f"unknown lr schedule {schedule!r} (use step, poly or cosine)")
