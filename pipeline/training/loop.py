"""The one training loop, for the teacher and for every student.

A backbone plus a margin head (ArcFace/CosFace, optional partial FC), optionally plus a knowledge-distillation
loss fed with per-sample cached teacher targets (the view matching each sample's flip). SGD, warmup + step
or polynomial LR, AMP on CUDA, DDP under `torchrun` (gloo on CPU, NCCL on GPU), a checkpoint every epoch
(and with `checkpoint_every` every N steps inside one) with everything needed to resume exactly, a progress
bar and DVCLive metrics. The per-batch work is `TrainStep.step` (step.py).

A run folder has one writer at a time (`output_lock`). Its identity (resume.py) decides what a rerun does:
continue the checkpoint of the same identity, refuse one of another (naming the differing settings), or,
when model.pt of this identity is already there, report the run as finished and do nothing.
"""
from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from pipeline.machine.devices import resolve_device
from pipeline.errors import DataError, PipelineError
from pipeline.machine.resources import require_memory
from pipeline.evaluation.verification import monitor_metrics
from pipeline.progress import progress_bar
from pipeline.storage.io import output_lock
from pipeline.models.model_file import save_model
from pipeline.training import ddp
from pipeline.training.config import TrainConfig
from pipeline.training.data import FaceDataset, FlipAugment, ItemFailure, collate
from pipeline.training.head_rows import save_head_rows, write_whole_head
from pipeline.training.live import RunLog
from pipeline.training.resume import (
    EpochProgress,
    ResumePoint,
    differences,
    finished_identity,
    jsonable,
    load_train_state,
    rank_states,
    run_identity,
    save_train_state,
)
from pipeline.training.sampling.shuffled import ShuffledBatchSampler
from pipeline.training.step import TrainStep
# `Distillation` (training/distill.py) appears in annotations only, unimported: the teacher's training never
# loads the distillation code, so editing it does not rerun the teacher.


def train(
    cfg: TrainConfig,
    source,
    num_classes: int,
    distill: "Distillation | None" = None,
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
    finished = finished_identity(model_path) if cfg.resume else None  # written only once all epochs are done
    if finished == identity:
        return {"epochs_done": cfg.epochs, "finished": True, "already_finished": True, "history": [],
                "world_size": world}
    if finished is not None:  # with or without checkpoint.pt: a finished result is replaced only when asked
        raise PipelineError(f"{model_path}: the finished model was written with different settings: "
                            f"{', '.join(differences(finished, identity))}; rerun with its settings, use another "
                            "--out, or --no-resume to replace it")
    input_size = cfg.arch_kwargs.get("input_size")
    dataset = FaceDataset(source, preload=cfg.preload, image_size=(input_size, input_size) if input_size else None)
    # checked here: the shuffled sampler's own error is a ValueError, a traceback at the CLI
    if batch_sampler_factory is None and cfg.batch_size * world > len(dataset):
        raise PipelineError(f"--batch-size {cfg.batch_size} x {world} processes: more than the {len(dataset)} images "
                            "of the training data (one batch is drawn without repeats)")
    if dataset.image_size is not None:  # a lower bound: the decoded batch, its float copy and the flip view
        height, width = dataset.image_size
        require_memory(f"--batch-size {cfg.batch_size}: a batch of {cfg.batch_size} images of {width}x{height} "
                       "(at least)", cfg.batch_size * height * width * 3 * (1 + 4 + 4))
    index_batches = (
        batch_sampler_factory(world, rank)
        if batch_sampler_factory is not None
        else ShuffledBatchSampler(len(dataset), cfg.batch_size, cfg.seed, world, rank)
    )
    sampler = FlipAugment(index_batches, seed=cfg.seed, rank=rank)
    steps_per_epoch = len(index_batches)
    # sized by the data's class count (a `property` may claim far more than its labels use): weights, their
    # gradients and SGD's momentum, checked before any of it is allocated
    dim = cfg.arch_kwargs.get("num_features", 512)
    require_memory(f"{source!r}: the margin head of {num_classes} classes x {dim}", 3 * 4 * num_classes * dim)
    torch.manual_seed(cfg.seed)
    trainer = TrainStep(cfg, num_classes, steps_per_epoch, device, distill, margin_samples)

    start = ResumePoint()
    if cfg.resume and state_path.exists():
        start = load_train_state(state_path, trainer.trainee, trainer.optimizer, trainer.scheduler, trainer.scaler,
                                 trainer.extra_modules, identity, steps_per_epoch, device)
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
        # its own generator: drawing worker seeds from the global RNG would shift the partial-FC stream on
        # resume. Persistent workers draw their seeds from it once per process, so a resumed process (at an
        # epoch boundary or inside an epoch) seeds its workers as the uninterrupted run did
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    # the history keeps the rows of the steps before the resume point (they were logged before it was saved)
    log = RunLog(out, resume_step=start.global_step(steps_per_epoch)) if rank == 0 else None

    def checkpoint(epochs_done: int, progress: EpochProgress) -> None:
        ranks = rank_states(progress, device)  # every rank takes part: a collective under DDP
        rows = (save_head_rows(state_path, trainer.trainee.head, trainer.optimizer, f"{epochs_done}-{progress.steps}")
                if trainer.split_head else None)  # every rank writes its own head rows
        if rank == 0:
            save_train_state(state_path, trainer.trainee, trainer.optimizer, trainer.scheduler, trainer.scaler,
                             trainer.extra_modules, identity, ranks, epochs_done, progress.steps, steps_per_epoch,
                             head_rows=rows)

    def checkpoint_inside_epoch(epoch: int, progress: EpochProgress) -> None:
        """After each step and its logs: the checkpoint of every `checkpoint_every`-th step, except at the
        epoch's end, whose checkpoint comes after the epoch's logs."""
        steps_done = trainer.scheduler.last_epoch
        if cfg.checkpoint_every and steps_done % cfg.checkpoint_every == 0 and progress.steps < steps_per_epoch:
            checkpoint(epoch, progress)

    last_epoch = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, start.epoch + cfg.stop_after_epochs)
    history = []
    for epoch in range(start.epoch, last_epoch):
        progress = start.progress if epoch == start.epoch else EpochProgress()
        sampler.set_epoch(epoch, progress.steps)
        trainer.model.train()
        stats = run_epoch(trainer, loader, epoch, cfg.epochs, show_progress=rank == 0, log=log,
                          log_every=cfg.log_every, progress=progress,
                          after_step=functools.partial(checkpoint_inside_epoch, epoch))
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
        # after the logs: a run killed in between redoes (and relogs) the steps after its last checkpoint
        checkpoint(epoch + 1, EpochProgress())
    finished = last_epoch >= cfg.epochs
    summary = {"epochs_done": last_epoch, "finished": finished, "already_finished": False, "history": history,
               "world_size": world}
    if rank == 0 and finished:
        save_model(model_path, trainer.trainee.backbone, cfg.arch, cfg.arch_kwargs,
                   extra={"train": jsonable(cfg), "run": identity})
        if cfg.save_head:
            print(f"wrote {write_whole_head(state_path, out / 'head.pt', trainer.trainee.head, trainer.optimizer)}")
    if log is not None:
        log.close()
    ddp.barrier()
    return summary


def run_epoch(trainer: TrainStep, batches, epoch: int, epochs: int, show_progress: bool = True,
              log: RunLog | None = None, log_every: int = 20, progress: EpochProgress | None = None,
              after_step: Callable[[EpochProgress], None] | None = None) -> dict:
    """One pass over `batches` of (images, labels, indices, flips): mean losses, last LR, images/s. Every
    `log_every` steps the KD diagnostics are measured and, with `log`, the step's numbers logged.

    `progress`: the epoch's position and running sums so far (a resumed epoch: `batches` are the rest of it),
    updated in place; `after_step(progress)` runs after each step and its logs (the mid-epoch checkpoint)."""
    progress = progress if progress is not None else EpochProgress()
    first = progress.steps
    bar = progress_bar(batches, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", initial=first,
                       total=first + len(batches), show=show_progress)
    resumed = time.perf_counter()
    for batch in bar:
        if isinstance(batch, ItemFailure):  # a sample failed to load, maybe in a DataLoader worker
            raise DataError(batch.message)
        images, labels, indices, flips = batch
        step = progress.steps
        measure = step % log_every == 0
        try:
            losses = trainer.step(images, labels, indices, flips, measure=measure and trainer.distill is not None)
        except FloatingPointError as error:
            raise PipelineError(f"epoch {epoch + 1} step {step}: {error} (diverged: lower --lr or the KD weights, "
                                "or check the inputs); a rerun resumes from the last checkpoint") from None
        progress.loss += losses.total.item()
        progress.margin_loss += losses.margin.item()
        progress.kd_loss += losses.kd.item()
        progress.images += images.shape[0]
        progress.steps += 1
        if measure:
            bar.set_postfix(loss=f"{losses.total.item():.3f}", kd=f"{losses.kd.item():.4f}", lr=f"{trainer.lr():.4f}")
            if log is not None:
                global_step = trainer.scheduler.last_epoch - 1
                log.log(global_step, "train", {"loss": losses.total.item(), "margin_loss": losses.margin.item(),
                                               "kd_loss": losses.kd.item(), "lr": trainer.lr()})
                if trainer.distill is not None:
                    log.log(global_step, "kd", trainer.distill.diagnostics())
        progress.seconds += time.perf_counter() - resumed
        if after_step is not None:
            after_step(progress)
        resumed = time.perf_counter()  # a checkpoint's write is not training time
    steps = max(1, progress.steps)
    stats = {"loss": progress.loss / steps, "margin_loss": progress.margin_loss / steps,
             "kd_loss": progress.kd_loss / steps}
    stats.update(lr=trainer.lr(), images_per_s=progress.images * ddp.world_size() / max(progress.seconds, 1e-9),
                 epoch=epoch + 1)
    return stats
