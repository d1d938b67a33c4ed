"""The one training loop, for the teacher and for every student.

A backbone plus a margin head (ArcFace/CosFace, optional partial FC), optionally plus a knowledge-distillation
loss fed with per-sample cached teacher targets (the view matching each sample's flip). SGD, warmup + step
or polynomial LR, AMP on CUDA, DDP under `torchrun` (gloo on CPU, NCCL on GPU), a checkpoint every epoch
with everything needed to resume exactly, a progress bar and DVCLive metrics. The per-batch work is
`TrainStep.step` (step.py).

A run folder has one writer at a time (`output_lock`). Its identity (resume.py) decides what a rerun does:
continue the checkpoint of the same identity, refuse one of another (naming the differing settings), or,
when model.pt of this identity is already there, report the run as finished and do nothing.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.devices import resolve_device
from pipeline.errors import DataError, PipelineError
from pipeline.evaluation.verification import monitor_metrics
from pipeline.io import output_lock
from pipeline.models.model_file import save_model
from pipeline.training import ddp
from pipeline.training.config import TrainConfig
from pipeline.training.data import FaceDataset, FlipAugment, ItemFailure, collate
from pipeline.training.distill import Distillation
from pipeline.training.live import RunLog
from pipeline.training.resume import (
    finished_identity,
    jsonable,
    load_train_state,
    run_identity,
    save_train_state,
)
from pipeline.training.samplers import ShuffledBatchSampler
from pipeline.training.step import TrainStep


def train(
    cfg: TrainConfig,
    source,
    num_classes: int,
    distill: Distillation | None = None,
    batch_sampler_factory: Callable[[int, int], object] | None = None,
    margin_samples: int | None = None,
    settings: dict | None = None,
) -> dict:
    """Train `cfg.arch` on `source` (a face source with `.labels`/`.decode`); returns a summary dict.

    `batch_sampler_factory(world_size, rank)` gives the sampler of index batches (default: shuffled
    epochs); `margin_samples` limits the margin loss to the first K samples of each batch; `settings` are
    the caller's result-changing settings beyond `cfg` (a student's KD, sampler, cache and pools), part of
    the run's identity. The result is `out_dir/model.pt`; `out_dir/checkpoint.pt` holds the state to resume
    from. The summary's "already_finished" is True when model.pt of this identity existed: nothing ran.
    """
    if cfg.out_dir is None:
        raise PipelineError("training needs a run folder (out_dir)")
    ddp.init_from_env()
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = run_identity(cfg, source, num_classes, margin_samples, settings)
    with output_lock(out) if ddp.rank() == 0 else contextlib.nullcontext():
        return _train(cfg, out, device, source, num_classes, distill, batch_sampler_factory, margin_samples,
                      identity)


def _train(cfg, out, device, source, num_classes, distill, batch_sampler_factory, margin_samples, identity):
    world, rank = ddp.world_size(), ddp.rank()
    state_path, model_path = out / "checkpoint.pt", out / "model.pt"
    if cfg.resume and finished_identity(model_path) == identity:  # written only once all epochs are done
        return {"epochs_done": cfg.epochs, "finished": True, "already_finished": True, "history": [],
                "world_size": world}
    input_size = cfg.arch_kwargs.get("input_size")
    dataset = FaceDataset(source, preload=cfg.preload, image_size=(input_size, input_size) if input_size else None)
    index_batches = (
        batch_sampler_factory(world, rank)
        if batch_sampler_factory is not None
        else ShuffledBatchSampler(len(dataset), cfg.batch_size, cfg.seed, world, rank)
    )
    sampler = FlipAugment(index_batches, seed=cfg.seed, rank=rank)
    torch.manual_seed(cfg.seed)
    trainer = TrainStep(cfg, num_classes, len(sampler), device, distill, margin_samples)

    start_epoch = 0
    if cfg.resume and state_path.exists():
        start_epoch = load_train_state(state_path, trainer.trainee, trainer.optimizer, trainer.scheduler,
                                       trainer.scaler, trainer.extra_modules, expected_config=identity)
    elif rank == 0:
        model_path.unlink(missing_ok=True)  # a fresh run: no earlier run's model may pass for this one's
    trainer.wrap_ddp()

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
    steps_per_epoch = len(sampler)
    log = RunLog(out, resume_step=start_epoch * steps_per_epoch) if rank == 0 else None
    last_epoch = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, start_epoch + cfg.stop_after_epochs)
    history = []
    for epoch in range(start_epoch, last_epoch):
        sampler.set_epoch(epoch)
        trainer.model.train()
        stats = run_epoch(trainer, loader, epoch, cfg.epochs, show_progress=rank == 0, log=log,
                          log_every=cfg.log_every)
        history.append(stats)
        if rank == 0:
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {stats['loss']:.4f} (margin {stats['margin_loss']:.4f}, "
                  f"kd {stats['kd_loss']:.4f}), lr {stats['lr']:.4g}, {stats['images_per_s']:.0f} img/s", flush=True)
            last_step = (epoch + 1) * steps_per_epoch - 1
            log.log(last_step, "epoch", stats)
            if cfg.monitor is not None:
                checked = monitor_metrics(trainer.trainee.backbone, cfg.monitor, device)
                log.log(last_step, "eval", checked)
                print("  " + "  ".join(f"{k} {v:.4f}" for k, v in checked.items()), flush=True)
            # after the log: a run killed in between redoes (and relogs) this epoch on resume
            save_train_state(state_path, trainer.trainee, trainer.optimizer, trainer.scheduler, trainer.scaler,
                             trainer.extra_modules, epoch + 1, identity)
    finished = last_epoch >= cfg.epochs
    summary = {"epochs_done": last_epoch, "finished": finished, "already_finished": False, "history": history,
               "world_size": world}
    if rank == 0 and finished:
        save_model(model_path, trainer.trainee.backbone, cfg.arch, cfg.arch_kwargs,
                   extra={"train": jsonable(cfg), "run": identity})
    if log is not None:
        log.close()
    ddp.barrier()
    return summary


def run_epoch(trainer: TrainStep, batches, epoch: int, epochs: int, show_progress: bool = True,
              log: RunLog | None = None, log_every: int = 20) -> dict:
    """One pass over `batches` of (images, labels, indices, flips): mean losses, last LR, images/s. Every
    `log_every` steps the KD diagnostics are measured and, with `log`, the step's numbers logged."""
    totals = {"loss": 0.0, "margin_loss": 0.0, "kd_loss": 0.0}
    images_seen, started = 0, time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=None if show_progress else True)
    for step, batch in enumerate(bar):
        if isinstance(batch, ItemFailure):  # a sample failed to load, maybe in a DataLoader worker
            raise DataError(batch.message)
        images, labels, indices, flips = batch
        measure = step % log_every == 0
        try:
            losses = trainer.step(images, labels, indices, flips, measure=measure and trainer.distill is not None)
        except FloatingPointError as error:
            raise PipelineError(f"epoch {epoch + 1} step {step}: {error} (diverged: lower --lr or the KD weights, "
                                "or check the inputs); a rerun resumes from the last finished epoch") from None
        totals["loss"] += losses.total.item()
        totals["margin_loss"] += losses.margin.item()
        totals["kd_loss"] += losses.kd.item()
        images_seen += images.shape[0]
        if measure:
            bar.set_postfix(loss=f"{losses.total.item():.3f}", kd=f"{losses.kd.item():.4f}", lr=f"{trainer.lr():.4f}")
            if log is not None:
                global_step = trainer.scheduler.last_epoch - 1
                log.log(global_step, "train", {"loss": losses.total.item(), "margin_loss": losses.margin.item(),
                                               "kd_loss": losses.kd.item(), "lr": trainer.lr()})
                if trainer.distill is not None:
                    log.log(global_step, "kd", trainer.distill.diagnostics())
    steps = max(1, len(batches))
    seconds = time.perf_counter() - started
    stats = {k: v / steps for k, v in totals.items()}
    stats.update(lr=trainer.lr(), images_per_s=images_seen * ddp.world_size() / seconds, epoch=epoch + 1)
    return stats
