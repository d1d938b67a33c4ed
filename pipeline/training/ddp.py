"""torch.distributed helpers for relational (batch-wide) KD losses under DDP.

Relational losses (EKD, RKD) see every pair of the *global* batch, so each rank all-gathers the student
embeddings with `all_gather_with_grad`, the teacher embeddings and labels with `all_gather_no_grad`, and
computes the full loss L on the concatenated batch (identical on every rank).

Gradient scaling, exactly. Let the global batch be the rank slices B_0..B_{W-1} and theta the shared
parameters. The single-process gradient on the concatenated batch is

    dL/dtheta = sum_r sum_{i in B_r} (dL/de_i) (de_i/dtheta).

`all_gather_with_grad` lets the gradient flow only into the local slice, so rank r's backward yields
g_r = sum_{i in B_r} (dL/de_i)(de_i/dtheta): the full-batch dL/de_i (every rank holds the whole loss) but
only through its own samples. DDP then *averages* over ranks: (1/W) sum_r g_r = (1/W) dL/dtheta. Multiplying
the gradient by W before DDP's average gives exactly dL/dtheta; `scale_for_ddp` does that while keeping the
loss *value* unchanged, so logged numbers still equal the single-process loss. (Per-rank mean losses such as
the margin loss on the local slice need no scaling: DDP's average of per-rank means is the global mean.)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pipeline.machine.devices import LOCAL_RANK


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's env vars (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Returns True when running distributed. Without those variables it does nothing and returns False.
    The backend defaults to NCCL when CUDA is available, else gloo; with NCCL the CUDA device is set to
    LOCAL_RANK.
    """
    if is_distributed():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(LOCAL_RANK.value())
    dist.init_process_group(backend=backend, init_method="env://")
    return True


def barrier() -> None:
    """Synchronise all ranks (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Destroy the default process group if one is initialised."""
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `x` over all ranks (a new tensor; `x` itself when not distributed)."""
    if not is_distributed() or world_size() == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shape tensors from all ranks in rank order (dim 0), without autograd."""
    if not is_distributed() or world_size() == 1:
        return x.detach()
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


class _GatherLocalGrad(torch.autograd.Function):
    """All-gather whose backward returns only this rank's slice of the incoming gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.rows = rank(), x.shape[0]
        return all_gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shape tensors from all ranks in rank order; the gradient reaches only the local slice.

    The other ranks' slices are detached copies. Combine with `scale_for_ddp` on the resulting loss (see the
    module docstring). Returns `x` itself when not distributed.
    """
    if not is_distributed() or world_size() == 1:
        return x
    return _GatherLocalGrad.apply(x)


def gather_kd_inputs(student: torch.Tensor, teacher: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-gather a KD loss's inputs: student with local-slice gradient, teacher and labels without."""
    return all_gather_with_grad(student), all_gather_no_grad(teacher), all_gather_no_grad(labels)


def scale_for_ddp(loss: torch.Tensor) -> torch.Tensor:
    """Same value as `loss`, gradient multiplied by the world size (exact DDP gradient for gathered losses).

    `loss.detach() + W * (loss - loss.detach())` has value `loss` (the bracket is exactly 0) and gradient
    W * dloss; see the module docstring for why W is the right factor.
    """
    w = world_size()
    if w == 1:
        return loss
    frozen = loss.detach()
    return frozen + w * (loss - frozen)
