"""The split margin head's cases, run by every gloo rank (tests/workers/split_head.py) and, as the one-process
reference, by the test itself (tests/training/test_split_head.py): a BatchNorm-free linear backbone stepped
by the real `TrainStep` on this rank's slice of fixed global batches of GLOBAL_BATCH images."""
from __future__ import annotations

from pathlib import Path

import torch

from helpers.data import FACE_SIZE
from helpers.training import EMBEDDING_DIM, capture_trainees, linear_backbone, tiny_config
from pipeline.losses.centres import AdaDistill
from pipeline.training import ddp
from pipeline.training.distill import Distillation
from pipeline.training.head_rows import save_head_rows
from pipeline.training.resume import EpochProgress, load_train_state, rank_states, save_train_state

CLASSES = 23  # divides by neither 2 nor 3
GLOBAL_BATCH = 12  # 6 per rank on 2, 4 on 3
STEPS = 50
IMAGES = 64  # the teacher table of the centre case


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The images, labels and sample indices of a step, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(GLOBAL_BATCH, 3, FACE_SIZE, FACE_SIZE, generator=g)
    labels = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)
    return images, labels, torch.randint(0, IMAGES, (GLOBAL_BATCH,), generator=g)


def own_slice() -> slice:
    per_rank = GLOBAL_BATCH // ddp.world_size()
    return slice(ddp.rank() * per_rank, (ddp.rank() + 1) * per_rank)


def build(out: Path, distill=None, **overrides):
    """A TrainStep of the linear backbone (DDP-wrapped under a process group), built right after seeding."""
    cfg = tiny_config(out, batch_size=GLOBAL_BATCH // ddp.world_size(), **overrides)
    torch.manual_seed(0)
    with capture_trainees(linear_backbone):
        from pipeline.training.step import TrainStep

        trainer = TrainStep(cfg, CLASSES, STEPS, torch.device("cpu"), distill)
    rng_after_build = torch.get_rng_state()
    trainer.wrap_ddp()
    return trainer, rng_after_build


def step(trainer, number: int):
    """One optimiser step on this rank's slice of global batch `number`; the global batch's mean margin loss."""
    images, labels, indices = (x[own_slice()] for x in global_batch(number))
    losses = trainer.step(images, labels, indices, torch.zeros_like(labels, dtype=torch.bool))
    if trainer.split_head or ddp.world_size() == 1:
        return float(losses.margin.detach())
    return float(ddp.all_reduce_sum(losses.margin.detach())) / ddp.world_size()  # each rank's mean, averaged


def head_rows(trainer) -> dict:
    """This rank's head rows (all of them for the replicated head) with their first class, gradient, momentum."""
    head = trainer.trainee.head
    momentum = trainer.optimizer.state.get(head.weight, {}).get("momentum_buffer")
    return {"first": getattr(head, "first_row", 0), "weight": head.weight.detach().clone(),
            "grad": None if head.weight.grad is None else head.weight.grad.clone(),
            "momentum": None if momentum is None else momentum.clone()}


def backbone(trainer, grads: bool = False) -> dict:
    return {k: (p.grad if grads else p).detach().clone() for k, p in trainer.trainee.backbone.named_parameters()}


def run_parity(out: Path, head_parallel: bool, kind: str, steps: int = STEPS) -> dict:
    """`steps` steps; the losses, the first step's gradients and head, and the weights at the end."""
    trainer, rng = build(out, head_parallel=head_parallel, margin=kind)
    initial = head_rows(trainer)["weight"]
    losses = [step(trainer, 0)]
    first = {"backbone": backbone(trainer, grads=True), "head": head_rows(trainer)}
    losses += [step(trainer, n) for n in range(1, steps)]
    return {"rng_after_build": rng, "initial_head": initial, "losses": losses, "first": first,
            "backbone": backbone(trainer), "head": head_rows(trainer)}


def run_sampled(out: Path) -> dict:
    """One Partial-FC step (sample rate 0.3) of the split head: what it drew, its loss and gradients."""
    trainer, _ = build(out, sample_rate=0.3)
    initial = {"backbone": backbone(trainer), "head": head_rows(trainer)["weight"]}
    loss = step(trainer, 0)
    return {"initial": initial, "loss": loss, "drawn": trainer.trainee.head.last_sampled_classes.clone(),
            "backbone_grad": backbone(trainer, grads=True), "head": head_rows(trainer)}


def teacher_table() -> torch.Tensor:
    return torch.randn(IMAGES, 2, EMBEDDING_DIM, generator=torch.Generator().manual_seed(7))


def run_centres(out: Path, steps: int = 5) -> dict:
    """AdaDistill moving the head's centres (each rank its own rows on a split head) for `steps` steps."""
    distill = Distillation(targets=teacher_table(), head=AdaDistill())
    trainer, _ = build(out, distill=distill)
    losses = [step(trainer, n) for n in range(steps)]
    return {"losses": losses, "backbone": backbone(trainer), "head": head_rows(trainer)}


def save_checkpoint(trainer, path: Path) -> None:
    """What the loop's checkpoint does, here as at an epoch boundary (a position inside an epoch would bind
    the world size; the rows do not)."""
    ranks = rank_states(EpochProgress(), torch.device("cpu"))
    rows = save_head_rows(path, trainer.trainee.head, trainer.optimizer, "1-0") if trainer.split_head else None
    if ddp.rank() == 0:
        save_train_state(path, trainer.trainee, trainer.optimizer, trainer.scheduler, trainer.scaler, [], {}, ranks,
                         1, 0, STEPS, head_rows=rows)
    ddp.barrier()


def run_until_checkpoint(out: Path, path: Path, steps: int = 4) -> dict:
    """`steps` steps, then a checkpoint at `path`; the head as it was saved."""
    trainer, _ = build(out)
    for n in range(steps):
        step(trainer, n)
    save_checkpoint(trainer, path)
    return head_rows(trainer)


def resume_and_continue(out: Path, path: Path, first_step: int = 4, steps: int = 4) -> dict:
    """Load the checkpoint at `path` (written on any world size); the head as loaded, then `steps` more steps
    on global batches `first_step ...`."""
    trainer, _ = build(out)
    load_train_state(path, trainer.trainee, trainer.optimizer, trainer.scheduler, trainer.scaler, [], {}, STEPS,
                     torch.device("cpu"))
    loaded = head_rows(trainer)
    losses = [step(trainer, n) for n in range(first_step, first_step + steps)]
    return {"loaded": loaded, "losses": losses, "backbone": backbone(trainer), "head": head_rows(trainer)}
