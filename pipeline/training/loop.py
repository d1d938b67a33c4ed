"""The one training loop, for the teacher and for every student.

A backbone plus a margin head (ArcFace/CosFace, optional partial FC), optionally plus a knowledge-distillation
loss fed with per-sample cached teacher targets (the view matching each sample's flip). SGD, warmup + step
or polynomial LR, AMP on CUDA, DDP under `torchrun` (gloo on CPU, NCCL on GPU), a checkpoint every epoch
with everything needed to resume exactly, a progress bar and DVCLive metrics.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.training import ddp
from pipeline.training.data import FlipAugment
from pipeline.training.samplers import ShuffledBatchSampler
from pipeline.training.data import FaceDataset, collate
from pipeline.losses.margin import MarginHead
from pipeline.models import get_model
from pipeline.models.model_file import save_model
from pipeline.training.optim import lr_factor, sgd_without_bn_decay
from pipeline.training.resume import load_train_state, save_train_state


@dataclass
class TrainConfig:
    """Every knob of one training run (teacher or student)."""

    out_dir: Path
    arch: str = "mbf"
    arch_kwargs: dict = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    lr_schedule: str = "poly"
    lr_milestones: tuple = ()
    margin: str = "arcface"
    margin_s: float = 64.0
    margin_m: float | None = None
    sample_rate: float = 1.0
    seed: int = 0
    workers: int = 2
    preload: bool = False
    device: str = "auto"
    amp: bool = True
    resume: bool = True
    stop_after_epochs: int | None = None  # train only this many epochs of the schedule (tests, time limits)


@dataclass
class Distillation:
    """The optional KD part: a loss and the teacher's targets, cached (N, views, D) or online.

    `teacher` (a callable on the batch's images) is the online path of the official code, kept for the
    cached-vs-online equivalence test and benchmark; the pipeline itself always uses the cache.
    """

    loss: nn.Module
    targets: torch.Tensor | None = None
    weight: float = 1.0
    margin_samples: int | None = None  # margin loss on the first K samples of each batch only (reference EKD)
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None


class FaceTrainee(nn.Module):
    """Backbone + margin head as one module, so that DDP synchronises both."""

    def __init__(self, backbone: nn.Module, head: MarginHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images, labels, margin_samples=None):
        embeddings = self.backbone(images)
        k = embeddings.shape[0] if margin_samples is None else margin_samples
        return embeddings, self.head(embeddings[:k].float(), labels[:k])


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _teacher_targets(distill: Distillation, images, indices, flips, device) -> torch.Tensor:
    """The cached teacher embedding of each sample, in the view that matches the sample's flip."""
    if distill.teacher is not None:
        with torch.no_grad():
            return distill.teacher(images).float()
    views = flips.long() if distill.targets.shape[1] > 1 else torch.zeros_like(flips, dtype=torch.long)
    return distill.targets[indices, views].to(device, non_blocking=True).float()


def _kd_term(distill: Distillation, embeddings, targets, labels) -> torch.Tensor:
    """KD loss on the batch gathered over all ranks; scaled so DDP's gradient averaging stays exact."""
    if ddp.world_size() > 1:
        embeddings = ddp.all_gather_with_grad(embeddings)
        targets = ddp.all_gather_no_grad(targets)
        labels = ddp.all_gather_no_grad(labels)
        return ddp.scale_for_ddp(distill.loss(embeddings.float(), targets, labels)) * distill.weight
    return distill.loss(embeddings.float(), targets, labels) * distill.weight


def train(
    cfg: TrainConfig,
    source,
    num_classes: int,
    distill: Distillation | None = None,
    batch_sampler_factory: Callable[[int, int], object] | None = None,
) -> dict:
    """Train `cfg.arch` on `source` (a face source with `.labels`/`.decode`); returns a summary dict.

    `batch_sampler_factory(world_size, rank)` gives the sampler of index batches (default: shuffled
    epochs). The result is `out_dir/model.pt`; `out_dir/checkpoint.pt` holds the state to resume from.
    """
    ddp.init_from_env()
    world, rank = ddp.world_size(), ddp.rank()
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    backbone = get_model(cfg.arch, **cfg.arch_kwargs)
    dim = cfg.arch_kwargs.get("num_features", 512)
    head = MarginHead(num_classes, dim, kind=cfg.margin, s=cfg.margin_s, m=cfg.margin_m, sample_rate=cfg.sample_rate)
    trainee = FaceTrainee(backbone, head).to(device)
    if device.type == "cuda":
        trainee = trainee.to(memory_format=torch.channels_last)
    extra_modules = [distill.loss.to(device)] if distill is not None else []
    optimizer = sgd_without_bn_decay([trainee, *extra_modules], cfg.lr, cfg.momentum, cfg.weight_decay)

    dataset = FaceDataset(source, preload=cfg.preload)
    index_batches = (
        batch_sampler_factory(world, rank)
        if batch_sampler_factory is not None
        else ShuffledBatchSampler(len(dataset), cfg.batch_size, cfg.seed, world, rank)
    )
    sampler = FlipAugment(index_batches, seed=cfg.seed, rank=rank)
    steps_per_epoch = len(sampler)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.lr_schedule, cfg.lr_milestones
        ),
    )
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch = 0
    state_path = out / "checkpoint.pt"
    if cfg.resume and state_path.exists():
        start_epoch = load_train_state(
            state_path, trainee, optimizer, scheduler, scaler, extra_modules, expected_config=_config_key(cfg)
        )
    model = _wrap_ddp(trainee, device)

    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        # its own generator: drawing worker seeds from the global RNG would shift the partial-FC stream
        # on resume (persistent workers draw once per process, not once per epoch)
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    live = _open_live(out) if rank == 0 else None
    last_epoch = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, start_epoch + cfg.stop_after_epochs)
    history = []
    for epoch in range(start_epoch, last_epoch):
        sampler.set_epoch(epoch)
        model.train()
        stats = _run_epoch(model, loader, optimizer, scheduler, scaler, distill, device, use_amp, epoch, cfg, rank)
        history.append(stats)
        if rank == 0:
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {stats['loss']:.4f} (margin {stats['margin_loss']:.4f}, "
                  f"kd {stats['kd_loss']:.4f}), lr {stats['lr']:.4g}, {stats['images_per_s']:.0f} img/s", flush=True)
            save_train_state(state_path, trainee, optimizer, scheduler, scaler, extra_modules, epoch + 1, _config_key(cfg))
            if live is not None:
                for key, value in stats.items():
                    live.log_metric(f"train/{key}", value)
                live.next_step()
    finished = last_epoch >= cfg.epochs
    summary = {"epochs_done": last_epoch, "finished": finished, "history": history, "world_size": world}
    if rank == 0 and finished:
        save_model(out / "model.pt", trainee.backbone, cfg.arch, cfg.arch_kwargs, extra={"train": _jsonable(cfg)})
    if live is not None:
        live.end()
    ddp.barrier()
    return summary


def _run_epoch(model, loader, optimizer, scheduler, scaler, distill, device, use_amp, epoch, cfg, rank) -> dict:
    totals = {"loss": 0.0, "margin_loss": 0.0, "kd_loss": 0.0}
    images_seen, started = 0, time.perf_counter()
    autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=None if rank == 0 else True)
    for step, (images, labels, indices, flips) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        margin_samples = distill.margin_samples if distill is not None else None
        with autocast:
            embeddings, margin_loss = model(images, labels, margin_samples)
        loss = margin_loss.float()
        kd_loss = torch.zeros((), device=device)
        if distill is not None:
            targets = _teacher_targets(distill, images, indices, flips, device)
            kd_loss = _kd_term(distill, embeddings, targets, labels)
            loss = loss + kd_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at epoch {epoch + 1} step {step}: {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        totals["loss"] += loss.item()
        totals["margin_loss"] += margin_loss.item()
        totals["kd_loss"] += kd_loss.item()
        images_seen += images.shape[0]
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", kd=f"{kd_loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.4f}")
    steps = max(1, len(loader))
    seconds = time.perf_counter() - started
    stats = {k: v / steps for k, v in totals.items()}
    stats.update(lr=scheduler.get_last_lr()[0], images_per_s=images_seen * ddp.world_size() / seconds, epoch=epoch + 1)
    return stats


def _wrap_ddp(trainee: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel under torchrun; the plain module otherwise."""
    if ddp.world_size() == 1:
        return trainee
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(trainee, device_ids=device_ids, find_unused_parameters=False)


def _open_live(out: Path):
    """DVCLive logger writing under `out/dvclive` (metrics, plots), or None when dvclive is missing."""
    try:
        from dvclive import Live
    except ImportError:  # dvclive is a declared dependency, but training must not hinge on a logger
        return None
    return Live(dir=str(out / "dvclive"), dvcyaml=None, save_dvc_exp=False, report=None)


def _jsonable(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


def _config_key(cfg: TrainConfig) -> dict:
    """The settings a checkpoint must share with the run resuming it (not the run-length knobs)."""
    key = _jsonable(cfg)
    for volatile in ("out_dir", "workers", "resume", "stop_after_epochs", "device", "preload"):
        key.pop(volatile, None)
    return key
