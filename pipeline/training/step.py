"""One optimisation step of the training loop, public so that benchmarks time exactly what `train` runs.

`TrainStep` owns the trainee (backbone + margin head), the optimiser, the LR schedule, the AMP scaler and
the optional distillation; `step(images, labels, indices, flips)` runs forward, margin loss, KD loss,
backward and the optimiser and schedule steps, and returns the three losses as tensors.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
import torch
from torch import nn

from pipeline.losses.margin import MarginHead
from pipeline.models import get_model
from pipeline.training import ddp
from pipeline.training.config import TrainConfig
from pipeline.training.optim import lr_factor, sgd_without_bn_decay
from pipeline.training.split_head import SplitMarginHead
# `Distillation` (training/distill.py) appears in annotations only, unimported: the teacher's training never
# loads the distillation code, so editing it does not rerun the teacher.


class FaceTrainee(nn.Module):
    """Backbone + margin head as one module, so that DDP synchronises both (a split head: the backbone only)."""

    def __init__(self, backbone: nn.Module, head: MarginHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images, labels, margin_samples=None, before_head=None):
        """(embeddings, margin loss); `before_head(embeddings)` runs in between (class-centre KD moves the
        head's centres there, inside the forward so that DDP sees one forward per step)."""
        embeddings = self.backbone(images)
        if before_head is not None:
            before_head(embeddings.detach())
        k = embeddings.shape[0] if margin_samples is None else margin_samples
        return embeddings, self.head(embeddings[:k].float(), labels[:k])


@dataclass
class StepLosses:
    total: torch.Tensor
    margin: torch.Tensor
    kd: torch.Tensor


class TrainStep:
    """Model, optimiser, schedule, scaler and KD of one run; `model` is the trainee, DDP-wrapped by `wrap_ddp`.

    Built right after `torch.manual_seed(cfg.seed)` by `train`, so initial weights depend only on the seed.
    `margin_samples`: the margin loss sees only the first K samples of each batch (reference EKD).
    """

    def __init__(self, cfg: TrainConfig, num_classes: int, steps_per_epoch: int, device: torch.device,
                 distill: "Distillation | None" = None, margin_samples: int | None = None):
        backbone = get_model(cfg.arch, **cfg.arch_kwargs)
        dim = cfg.arch_kwargs.get("num_features", 512)
        centre_kd = distill.head if distill is not None else None
        self.split_head = cfg.head_parallel and ddp.world_size() > 1
        head_kind = SplitMarginHead if self.split_head else MarginHead
        head = head_kind(num_classes, dim, kind=cfg.margin, s=cfg.margin_s, m=cfg.margin_m,
                         sample_rate=cfg.sample_rate, learn_centres=centre_kd is None)
        if centre_kd is not None:
            centre_kd.init_centres(head.weight, getattr(head, "first_row", 0), num_classes)
        self.trainee = FaceTrainee(backbone, head).to(device)
        if device.type == "cuda":
            self.trainee = self.trainee.to(memory_format=torch.channels_last)
        self.device, self.distill, self.model = device, distill, self.trainee
        self.margin_samples, self.steps_per_epoch = margin_samples, steps_per_epoch
        self.extra_modules = [m.to(device) for m in distill.modules] if distill is not None else []
        self.optimizer = sgd_without_bn_decay([self.trainee, *self.extra_modules], cfg.lr, cfg.momentum,
                                              cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.lr_schedule,
                                   cfg.lr_milestones),
        )
        self.use_amp = cfg.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def wrap_ddp(self) -> None:
        """DistributedDataParallel under torchrun (after any resume has loaded the weights)."""
        if ddp.world_size() > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            wrap = functools.partial(nn.parallel.DistributedDataParallel, device_ids=device_ids,
                                     find_unused_parameters=False)
            if self.split_head:  # each rank's head rows are its own: DDP synchronises the backbone only
                self.model = FaceTrainee(wrap(self.trainee.backbone), self.trainee.head)
            else:
                self.model = wrap(self.trainee)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
             flips: torch.Tensor, measure: bool = False) -> StepLosses:
        """One optimisation step on a batch; FloatingPointError (naming nothing yet) on a non-finite loss.

        `measure`: also compute the KD diagnostics (gradient norms at the embeddings) for `Distillation`."""
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.use_amp else contextlib.nullcontext()
        targets = self.distill.targets(images, indices, flips, self.device) if self.distill is not None else None
        before_head = None
        if self.distill is not None and self.distill.head is not None:
            before_head = functools.partial(self.distill.update_centres, self.trainee.head.weight, targets=targets,
                                            labels=labels,
                                            first_row=self.trainee.head.first_row if self.split_head else None)
        with autocast:
            embeddings, margin_loss = self.model(images, labels, self.margin_samples, before_head)
        loss = margin_loss.float()
        kd_loss = torch.zeros((), device=self.device)
        if self.distill is not None and self.distill.terms:
            terms = self.distill.term_losses(embeddings, targets, labels)
            kd_loss = self.distill.combine(terms, embeddings, margin_loss, self.scheduler.last_epoch,
                                           self.steps_per_epoch, measure)
            loss = loss + kd_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.distill is not None:
            self.distill.after_backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return StepLosses(loss, margin_loss, kd_loss)
