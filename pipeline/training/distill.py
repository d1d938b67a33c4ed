"""The optional knowledge-distillation part of a training step: KD loss terms fed with the teacher's targets.

Targets come from a lookup called with the batch (`targets(images, indices, flips, device)`); the pipeline
uses `CachedTargets`, the (N, views, D) teacher cache looked up by sample index in the view matching each
sample's flip, or `EnsembleTargets` for several caches (training/targets.py, with the projection that feature
terms use when the teacher's embedding size is not the student's). Under DDP the KD terms see the batch
gathered over all ranks (see ddp.py for the gradient).

A distillation has one or more terms (e.g. feature L2 + EKD), each with a weight used in one of two ways:
- scale "weight": the term's loss is multiplied by the weight;
- scale "grad-ratio": the weight is the wanted ratio ||d term / d embeddings|| / ||d margin / d embeddings||
  and the multiplier follows from running averages (EMA) of the two gradient norms, so a setting carries
  over between resolutions, embedding sizes and margin scales without retuning.
An optional linear warm-up ramps every term from 0 over the first steps. `diagnostics()` reports, for the
last step that measured them, the gradient norms and ratios at the embedding and each term's own statistics.

A class-centre method (`head`, pipeline/losses/centres.py) adds no term: `update_centres` moves the margin
head's centres (on a split head, each rank its own rows) toward the teacher's embeddings of the gathered batch
before the margin loss uses them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.losses.base import CentreMethod
from pipeline.losses.config import KDScale
from pipeline.training import ddp
from pipeline.training.targets import CachedTargets, StudentProjection

TargetLookup = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.device], torch.Tensor]


@dataclass
class KDTerm:
    """One KD loss `loss(student, teacher, labels) -> scalar` and its weight (see the module docstring)."""

    name: str
    loss: nn.Module
    weight: float = 1.0


class GradientBalance(nn.Module):
    """Running averages (EMA) of the margin and of each term's gradient norm at the embeddings; in buffers, so
    a resumed run continues them. Until the first update the multiplier is the plain weight."""

    def __init__(self, terms: int, momentum: float = 0.99):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("margin_norm", torch.zeros(()))
        self.register_buffer("term_norms", torch.zeros(terms))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, margin_norm: torch.Tensor, term_norms: torch.Tensor) -> None:
        first = int(self.updates) == 0
        keep = 0.0 if first else self.momentum
        self.margin_norm.mul_(keep).add_((1 - keep) * margin_norm)
        self.term_norms.mul_(keep).add_((1 - keep) * term_norms)
        self.updates.add_(1)

    def multipliers(self, ratios: torch.Tensor) -> torch.Tensor:
        """Multiplier of each (unit-weight) term that makes its gradient norm `ratio` x the margin's."""
        return ratios * self.margin_norm / self.term_norms.clamp_min(1e-12)


@dataclass
class Distillation:
    """KD terms on the teacher targets (a lookup, or a (N, views, D) tensor for `CachedTargets`).

    `Distillation(loss=..., targets=..., weight=...)` is the one-term form.
    """

    targets: TargetLookup | torch.Tensor
    loss: nn.Module | None = None
    weight: float = 1.0
    terms: list[KDTerm] = field(default_factory=list)
    scale: str = KDScale.weight.value
    warmup_epochs: float = 0.0
    balance: GradientBalance | None = None
    head: CentreMethod | None = None
    projection: StudentProjection | None = None  # for same_dim terms when the teacher's size differs
    last: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.targets, torch.Tensor):
            self.targets = CachedTargets(self.targets)
        if self.loss is not None:
            if self.terms:
                raise PipelineError("Distillation: give either loss (one term) or terms, not both")
            self.terms = [KDTerm("kd", self.loss, self.weight)]
        if not self.terms and self.head is None:
            raise PipelineError("Distillation needs at least one KD term or a class-centre method")
        self.scale = KDScale(self.scale).value
        if self.terms and self.scale == KDScale.grad_ratio and self.balance is None:
            self.balance = GradientBalance(len(self.terms))

    @property
    def modules(self) -> list[nn.Module]:
        """Everything with state to train, move to the device and checkpoint (losses, the balance)."""
        return ([t.loss for t in self.terms] + ([self.balance] if self.balance is not None else [])
                + ([self.head] if self.head is not None else [])
                + ([self.projection] if self.projection is not None else []))

    @torch.no_grad()
    def update_centres(self, centres: torch.Tensor, embeddings: torch.Tensor, targets: torch.Tensor,
                       labels: torch.Tensor, first_row: int | None = None) -> None:
        """The class-centre method's step on the batch gathered over all ranks (every rank moves its copy of
        the centres identically). A split head's `centres` are classes `first_row ...` only: each rank moves
        its own rows from the gathered samples of those classes (a class's update reads only its samples).
        `first_row` None: the whole head."""
        student, teacher, labels = (ddp.all_gather_no_grad(x) for x in (embeddings, targets, labels))
        if first_row is not None:
            own = (labels >= first_row) & (labels < first_row + centres.shape[0])
            if not bool(own.any()):
                return
            student, teacher, labels = student[own], teacher[own], labels[own] - first_row
        self.head.update_centres(centres, student, teacher, labels)

    def term_losses(self, embeddings: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> list:
        """Each term's unit-weight loss on the batch gathered over all ranks (scaled for exact DDP gradients);
        a same_dim term sees the student through the projection when there is one (applied before the gather,
        to this rank's own embeddings)."""
        gathered = {}

        def inputs(projected: bool):
            if projected not in gathered:
                student = self.projection(embeddings) if projected else embeddings
                gathered[projected] = ddp.gather_kd_inputs(student, targets, labels)
            return gathered[projected]

        losses = []
        for term in self.terms:
            projected = self.projection is not None and getattr(term.loss, "same_dim", False)
            student, teacher, gathered_labels = inputs(projected)
            losses.append(ddp.scale_for_ddp(term.loss(student.float(), teacher, gathered_labels)))
        return losses

    def after_backward(self) -> None:
        """What the KD modules need between backward and the optimiser step (the projection's DDP average)."""
        if self.projection is not None:
            self.projection.average_gradients()

    def combine(self, losses: list[torch.Tensor], embeddings: torch.Tensor, margin_loss: torch.Tensor,
                step: int, steps_per_epoch: int, measure: bool) -> torch.Tensor:
        """The weighted KD loss of optimiser step `step` (0-based); with `measure` (always under grad-ratio)
        the gradient norms at the embeddings are computed first and kept for `diagnostics`."""
        warmup_steps = self.warmup_epochs * steps_per_epoch
        ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        weights = torch.tensor([t.weight for t in self.terms], dtype=torch.float32, device=embeddings.device)
        if measure or self.balance is not None:
            margin_norm, norms = _gradient_norms(margin_loss, losses, embeddings)
            if self.balance is not None:
                self.balance.update(margin_norm, norms)
                weights = self.balance.multipliers(weights)
            self.last = {"grad_norm_margin": float(margin_norm), "kd_ramp": ramp}
            for term, norm, multiplier in zip(self.terms, norms.tolist(), weights.tolist()):
                self.last[f"kd_multiplier_{term.name}"] = multiplier
                self.last[f"grad_ratio_{term.name}"] = ramp * multiplier * norm / max(float(margin_norm), 1e-12)
            for term, loss in zip(self.terms, losses):
                self.last[f"kd_loss_{term.name}"] = float(loss.detach())
                if hasattr(term.loss, "diagnostics"):
                    self.last.update({f"{term.name}/{k}": v for k, v in term.loss.diagnostics().items()})
        return ramp * sum(w * loss for w, loss in zip(weights.detach(), losses))

    def diagnostics(self) -> dict[str, float]:
        """What the last measured step saw (empty before the first)."""
        out = dict(self.last)
        if self.head is not None:
            out.update({f"{self.head.name}/{k}": v for k, v in self.head.diagnostics().items()})
        return out


def _gradient_norms(margin_loss: torch.Tensor, losses: list[torch.Tensor],
                    embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norms of d margin / d embeddings and of each d loss / d embeddings over the whole batch (all ranks)."""
    squares = []
    for loss in [margin_loss, *losses]:
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss, embeddings, retain_graph=True, allow_unused=True)
        else:
            grad = None
        squares.append(grad.float().pow(2).sum() if grad is not None else embeddings.new_zeros((), dtype=torch.float32))
    squares = ddp.all_reduce_sum(torch.stack(squares).detach())
    norms = squares.sqrt()
    return norms[0], norms[1:]
