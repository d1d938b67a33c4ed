"""The margin head split across ranks (in the manner of Partial FC v2): each rank owns a contiguous slice of
the class centres, so head memory and head traffic no longer grow with the number of classes on every GPU.

Per step, with W ranks of b samples each (the global batch N = W * b):
1. the embeddings (with gradient) and the labels are all-gathered: every rank holds the global batch;
2. each rank computes the (N, own rows) margin logits against its own centres only (fp32, as `MarginHead`);
3. the softmax cross-entropy of the global batch over all classes comes from two all-reduces of N-vectors:
   the row maxima (MAX), then the sums of exponentials and the target logits (SUM, one call). Every rank holds
   the same loss, the global batch's mean, and its gradient for its own rows exactly;
4. backward: the gradient at the gathered embeddings is summed over ranks (each saw only its rows' part) and
   each rank keeps its own samples' rows, times W: DDP, which wraps the backbone only, averages over the
   ranks, so the backbone gets exactly the single-process gradient (the replicated head's per-rank means,
   averaged by DDP, are the same global mean).

Communication per step is O(N x dim) (the gather and its backward all-reduce) instead of the replicated
head's O(classes x dim) gradient all-reduce. Partial FC samples per slice: the global batch's positives in the
slice plus random others from this rank's RNG, `ceil(sample_rate * own rows)` in all.

Rows are split as evenly as possible (`row_range`: sizes differ by at most one); initial centres are the
replicated head's rows (`initial_rows`) and leave the RNG where it leaves it. Checkpoints keep the rows by
their global class index, so a run resumes on any world size (head_rows.py).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import PipelineError
from pipeline.losses.margin import (
    DEFAULT_MARGINS,
    check_head_shape,
    check_labels,
    initial_rows,
    margin_logits,
    sample_rows,
)
from pipeline.training import ddp


def row_range(num_classes: int, world: int, rank: int) -> tuple[int, int]:
    """[first, stop) of the class rows rank `rank` owns: contiguous, the first `num_classes % world` ranks one
    row more."""
    base, extra = divmod(num_classes, world)
    first = rank * base + min(rank, extra)
    return first, first + base + (1 if rank < extra else 0)


class _GatherSummedGrad(torch.autograd.Function):
    """All-gather whose backward sums the gradient over ranks and returns this rank's rows of it, times W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.rows = ddp.rank(), x.shape[0]
        return ddp.all_gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows] * ddp.world_size()


class _SplitCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of logits whose columns are spread over the ranks (see the module docstring).

    `target` is each sample's column among this rank's, -1 where its class lives on another rank."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, owned = logits.shape[0], target >= 0
        maxima = logits.max(dim=1).values if logits.shape[1] else logits.new_full((n,), -math.inf)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        exp = torch.exp(logits - maxima[:, None])
        sums = torch.zeros(2, n, dtype=logits.dtype, device=logits.device)
        sums[0] = exp.sum(dim=1)
        sums[1, owned] = logits[owned, target[owned]]
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        ctx.save_for_backward(exp.div_(sums[0][:, None]), target)
        return (sums[0].log() + maxima - sums[1]).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        prob, target = ctx.saved_tensors
        owned = (target >= 0).nonzero().squeeze(1)
        out = prob.clone()
        out[owned, target[owned]] -= 1.0
        return out * (grad / prob.shape[0]), None


class SplitMarginHead(nn.Module):
    """`MarginHead` with this rank's rows only: `forward(local embeddings, local labels) -> the global batch's
    mean margin loss` (a collective: every rank calls it at every step with equal batch sizes).

    `weight` is (own rows, dim), rows `first_row ...` of the replicated head's; a parameter, or with
    `learn_centres=False` a buffer that class-centre distillation moves (Distillation.update_centres).
    `last_sampled_classes`: the global class indices this rank's slice used in the latest Partial-FC step."""

    def __init__(self, num_classes: int, dim: int, kind: str = "arcface", s: float = 64.0, m: float | None = None,
                 sample_rate: float = 1.0, learn_centres: bool = True, world: int | None = None,
                 rank: int | None = None):
        super().__init__()
        check_head_shape(sample_rate, num_classes, dim, kind)
        world = ddp.world_size() if world is None else world
        rank = ddp.rank() if rank is None else rank
        if num_classes < world:
            raise PipelineError(f"split margin head: {num_classes} classes cannot be split over {world} processes "
                                "(use --no-head-parallel)")
        self.num_classes, self.dim, self.kind = num_classes, dim, kind
        self.s, self.m = float(s), float(DEFAULT_MARGINS[kind] if m is None else m)
        self.sample_rate = float(sample_rate)
        self.first_row, stop = row_range(num_classes, world, rank)
        self.num_sample = min(stop - self.first_row, math.ceil(sample_rate * (stop - self.first_row)))
        centres = initial_rows(num_classes, dim, slice(self.first_row, stop))
        if learn_centres:
            self.weight = nn.Parameter(centres)
        else:
            self.register_buffer("weight", centres)
        self.last_sampled_classes: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"{self.num_classes}, {self.dim}, rows {self.first_row}..{self.first_row + self.weight.shape[0]}, "
                f"kind={self.kind}, s={self.s}, m={self.m}, sample_rate={self.sample_rate}")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = check_labels(labels, embeddings.shape[0], self.num_classes)
        gathered = _GatherSummedGrad.apply(embeddings)
        labels = ddp.all_gather_no_grad(labels)
        local = labels - self.first_row
        owned = (local >= 0) & (local < self.weight.shape[0])
        weight = self.weight
        if self.sample_rate < 1.0:
            with torch.no_grad():
                index = sample_rows(torch.unique(local[owned], sorted=True), self.weight.shape[0], self.num_sample)
            self.last_sampled_classes = index + self.first_row
            weight = self.weight[index]
            local = torch.where(owned, torch.searchsorted(index, local.clamp(min=0)), local)
        column = torch.where(owned, local, torch.zeros_like(local))
        logits = margin_logits(gathered, weight, column, self.kind, self.s, self.m, owned=owned)
        return _SplitCrossEntropy.apply(logits, torch.where(owned, local, torch.full_like(local, -1)))
