"""Additive-margin softmax heads (ArcFace, CosFace) with optional Partial-FC class sampling.

Logits are `s * cos(angle between embedding and class centre)`; the target class gets a margin:
ArcFace `cos(theta + m)`, CosFace `cos(theta) - m`. Unlike arcface_torch, which applies the margin under
`no_grad` (a straight-through gradient), the margin here is differentiated exactly, so the gradient is
the true gradient of the loss.

In this version the head is one dense `(num_classes, dim)` matrix: under DDP it is replicated on every
rank (gradients all-reduced like any parameter), not sharded across ranks as in arcface_torch's PartialFC;
with Partial FC each rank draws its own negative classes from its own RNG stream.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.settings import Choice


class MarginKind(Choice):
    """Additive-margin softmax heads."""

    arcface = "arcface"
    cosface = "cosface"


DEFAULT_MARGINS = {MarginKind.arcface: 0.5, MarginKind.cosface: 0.4}


def arcface_target(cos: torch.Tensor, m: float) -> torch.Tensor:
    """`cos(theta + m)` from `cos(theta)`, differentiable everywhere in [-1, 1].

    `sin(theta)` is clamped away from 0 so that the gradient stays finite at cos = +-1 (where the exact
    derivative is infinite). Where theta + m would pass pi (cos <= cos(pi - m)), `cos(theta + m)` would turn
    back up; there the target logit continues as `cos - m * sin(m)` (insightface's original ArcFace),
    keeping it decreasing in theta so that the exact gradient never pushes the wrong way. Above that point
    (the range met in practice) the values equal arcface_torch's."""
    sin = torch.sqrt(torch.clamp(1.0 - cos * cos, min=torch.finfo(cos.dtype).eps))
    with_margin = cos * math.cos(m) - sin * math.sin(m)
    return torch.where(cos > math.cos(math.pi - m), with_margin, cos - m * math.sin(math.pi - m))


def cosface_target(cos: torch.Tensor, m: float) -> torch.Tensor:
    """`cos(theta) - m`."""
    return cos - m


class MarginHead(nn.Module):
    """Normalised class centres + margin softmax cross-entropy: `forward(embeddings, labels) -> loss`.

    `sample_rate < 1` enables Partial FC: each step uses every class present in the batch plus random other
    classes, `ceil(sample_rate * num_classes)` classes in all (only the batch's classes when those are more);
    labels are remapped to the sampled rows and only those rows of `weight` receive gradient.
    `learn_centres=False` makes the centres a buffer that something else sets (class-centre distillation).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        kind: str = "arcface",
        s: float = 64.0,
        m: float | None = None,
        sample_rate: float = 1.0,
        learn_centres: bool = True,
    ):
        super().__init__()
        if kind not in DEFAULT_MARGINS:
            raise PipelineError(f"margin head: unknown kind {kind!r} (use 'arcface' or 'cosface')")
        if not 0.0 < sample_rate <= 1.0:
            raise PipelineError(f"margin head: sample_rate must lie in (0, 1], got {sample_rate}")
        if num_classes < 1 or dim < 1:
            raise PipelineError(f"margin head: need num_classes >= 1 and dim >= 1, got {num_classes}, {dim}")
        self.num_classes, self.dim, self.kind = num_classes, dim, kind
        self.s = float(s)
        self.m = float(DEFAULT_MARGINS[kind] if m is None else m)
        self.sample_rate = float(sample_rate)
        self.num_sample = min(num_classes, math.ceil(sample_rate * num_classes))
        centres = torch.normal(0.0, 0.01, (num_classes, dim))  # drawn either way: the same RNG stream after it
        if learn_centres:
            self.weight = nn.Parameter(centres)
        else:  # class-centre distillation moves them (pipeline/losses/centres.py); no gradient, no optimiser
            self.register_buffer("weight", centres)
        self.last_sampled_classes: torch.Tensor | None = None  # the rows used by the latest Partial-FC step

    def extra_repr(self) -> str:
        return f"{self.num_classes}, {self.dim}, kind={self.kind}, s={self.s}, m={self.m}, sample_rate={self.sample_rate}"

    def _check_labels(self, labels: torch.Tensor, batch: int) -> torch.Tensor:
        labels = labels.reshape(-1).long()
        if labels.numel() != batch:
            raise PipelineError(f"margin head: {labels.numel()} labels for {batch} embeddings")
        if batch and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise PipelineError(
                f"margin head: labels must lie in [0, {self.num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
            )
        return labels

    @torch.no_grad()
    def sample_classes(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted class indices for this step (all of the batch's classes + random others) and the labels
        remapped to positions in it."""
        positive = torch.unique(labels, sorted=True)
        if self.num_sample <= positive.numel():
            index = positive
        else:
            priority = torch.rand(self.num_classes, device=labels.device)
            priority[positive] = 2.0  # above any random draw: positives are always among the top-k
            index = torch.topk(priority, k=self.num_sample).indices.sort().values
        return index, torch.searchsorted(index, labels)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(s * margin-adjusted cosines, labels)` over all classes, or over the sampled ones with the
        labels remapped to them."""
        labels = self._check_labels(labels, embeddings.shape[0])
        weight = self.weight
        if self.sample_rate < 1.0:
            index, labels = self.sample_classes(labels)
            self.last_sampled_classes = index
            weight = self.weight[index]
        cos = F.linear(F.normalize(embeddings), F.normalize(weight))
        cos = cos.to(torch.promote_types(cos.dtype, torch.float32)).clamp(-1.0, 1.0)  # fp16 (AMP) -> fp32
        target = cos.gather(1, labels[:, None])
        adjust = arcface_target if self.kind == "arcface" else cosface_target
        cos = cos.scatter(1, labels[:, None], adjust(target, self.m))
        return cos * self.s, labels

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the margin logits."""
        logits, labels = self.logits(embeddings, labels)
        return F.cross_entropy(logits, labels)
