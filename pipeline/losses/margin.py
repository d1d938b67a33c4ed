"""Additive-margin softmax heads (ArcFace, CosFace) with optional Partial-FC class sampling.

Logits are `s * cos(angle between embedding and class centre)`; the target class gets a margin:
ArcFace `cos(theta + m)`, CosFace `cos(theta) - m`. Unlike arcface_torch, which applies the margin under
`no_grad` (a straight-through gradient), the margin here is differentiated exactly, so the gradient is
the true gradient of the loss.

`MarginHead` is one dense `(num_classes, dim)` matrix: under DDP replicated on every rank (gradients
all-reduced like any parameter; with Partial FC each rank draws its own negative classes from its own RNG
stream). The head split across ranks (pipeline/training/split_head.py) reuses the pieces below.
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


def initial_rows(num_classes: int, dim: int, rows: slice) -> torch.Tensor:
    """`MarginHead`'s normal(0, 0.01) start, only its `rows`: drawn in blocks from the global RNG so that any
    slice equals those rows of the whole draw and the RNG ends where the whole draw leaves it (a split head
    never holds all rows). Exact because CPU `normal_` turns uniforms into normals in groups of 16 and redraws
    only the last 16 values of a tensor whose size is no multiple of 16: blocks of a multiple of 16 rows, the
    remainder joined to the last block, reproduce the whole draw."""
    block = 4096
    if num_classes < 2 * block:  # small: the one draw (the replicated head's own call)
        return torch.normal(0.0, 0.01, (num_classes, dim))[rows].clone()
    kept, start = [], 0
    while start < num_classes:
        stop = num_classes if num_classes - start < 2 * block else start + block
        drawn = torch.normal(0.0, 0.01, (stop - start, dim))
        low, high = max(start, rows.start), min(stop, rows.stop)
        if low < high:
            kept.append(drawn[low - start:high - start].clone())
        start = stop
    return torch.cat(kept) if kept else torch.empty(0, dim)


def margin_logits(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, kind: str, s: float,
                  m: float, owned: torch.Tensor | None = None) -> torch.Tensor:
    """`s *` cosines of `embeddings` against the rows of `weight`, the margin on each sample's `labels` column
    (fp32 even under AMP). `owned` (a split head): the samples whose target row is in `weight`; the others
    get no margin here (their target lives on another rank) and their label is any valid column."""
    cos = F.linear(F.normalize(embeddings), F.normalize(weight))
    cos = cos.to(torch.promote_types(cos.dtype, torch.float32)).clamp(-1.0, 1.0)  # fp16 (AMP) -> fp32
    target = cos.gather(1, labels[:, None])
    adjust = arcface_target if kind == "arcface" else cosface_target
    adjusted = adjust(target, m)
    if owned is not None:
        adjusted = torch.where(owned[:, None], adjusted, target)
    cos = cos.scatter(1, labels[:, None], adjusted)
    return cos * s


def check_head_shape(sample_rate: float, num_classes: int, dim: int, kind: str) -> None:
    """One-line errors for a head that cannot work."""
    if kind not in DEFAULT_MARGINS:
        raise PipelineError(f"margin head: unknown kind {kind!r} (use 'arcface' or 'cosface')")
    if not 0.0 < sample_rate <= 1.0:
        raise PipelineError(f"margin head: sample_rate must lie in (0, 1], got {sample_rate}")
    if num_classes < 1 or dim < 1:
        raise PipelineError(f"margin head: need num_classes >= 1 and dim >= 1, got {num_classes}, {dim}")


def check_labels(labels: torch.Tensor, batch: int, num_classes: int) -> torch.Tensor:
    """`labels` flat and int64, one per embedding, each in [0, num_classes)."""
    labels = labels.reshape(-1).long()
    if labels.numel() != batch:
        raise PipelineError(f"margin head: {labels.numel()} labels for {batch} embeddings")
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise PipelineError(
            f"margin head: labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


def sample_rows(positive: torch.Tensor, num_rows: int, num_sample: int) -> torch.Tensor:
    """Partial FC: sorted rows in [0, num_rows), the `positive` ones (sorted, unique) and random others,
    `num_sample` in all (only the positives when those are more); draws from the global RNG only then."""
    if num_sample <= positive.numel():
        return positive
    priority = torch.rand(num_rows, device=positive.device)
    priority[positive] = 2.0  # above any random draw: positives are always among the top-k
    return torch.topk(priority, k=num_sample).indices.sort().values


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
        check_head_shape(sample_rate, num_classes, dim, kind)
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

    @torch.no_grad()
    def sample_classes(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted class indices for this step (all of the batch's classes + random others) and the labels
        remapped to positions in it."""
        index = sample_rows(torch.unique(labels, sorted=True), self.num_classes, self.num_sample)
        return index, torch.searchsorted(index, labels)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(s * margin-adjusted cosines, labels)` over all classes, or over the sampled ones with the
        labels remapped to them."""
        labels = check_labels(labels, embeddings.shape[0], self.num_classes)
        weight = self.weight
        if self.sample_rate < 1.0:
            index, labels = self.sample_classes(labels)
            self.last_sampled_classes = index
            weight = self.weight[index]
        return margin_logits(embeddings, weight, labels, self.kind, self.s, self.m), labels

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the margin logits."""
        logits, labels = self.logits(embeddings, labels)
        return F.cross_entropy(logits, labels)
