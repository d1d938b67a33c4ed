"""Shared pieces of the EKD rank loss: pair enumeration, FPR thresholds, soft rank counts, rank MSE.

A pair's "rank" is the number of FPR thresholds its similarity exceeds (0..K); the soft version sums
temperature-controlled sigmoids, so the loss can pull a student pair across a threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError

SIGMOID_CLAMP = 50.0  # the official code clamps the sigmoid's exponent to [-50, 50]


def check_anchors(anchors: Sequence[float]) -> tuple[int, ...]:
    """Anchors a (FPR = 1/a) as positive integers; raises PipelineError otherwise."""
    out = []
    for a in anchors:
        if float(a) < 1 or float(a) != int(a):
            raise PipelineError(f"EKD anchors must be integers >= 1 (FPR = 1/anchor), got {a!r}")
        out.append(int(a))
    if not out:
        raise PipelineError("EKD needs at least one anchor")
    return tuple(out)


def check_kd_inputs(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> None:
    """Same batch size everywhere, 2-D embeddings, 1-D labels; raises PipelineError naming the shapes."""
    if (labels.dim() != 1 or student.dim() != 2 or teacher.dim() != 2
            or student.shape[0] != labels.shape[0] or teacher.shape[0] != labels.shape[0]):
        raise PipelineError(f"KD loss inputs disagree: student {tuple(student.shape)}, teacher "
                            f"{tuple(teacher.shape)}, labels {tuple(labels.shape)} (need (B, D), (B, D'), (B,))")


def full_precision(x: torch.Tensor):
    """Context that disables autocast on x's device: rank losses need float32 similarities (temperature 0.01)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def upper_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All pairs i<j of a batch in row-major order: (rows, cols, same_label mask)."""
    n = labels.shape[0]
    rows, cols = torch.triu_indices(n, n, offset=1, device=labels.device)
    return rows, cols, labels[rows] == labels[cols]


def order_statistic_thresholds(neg_sims: torch.Tensor, anchors: Sequence[int]) -> torch.Tensor | None:
    """Threshold per anchor a: element n // a of the negatives sorted descending (floor(n/a), exact integers).

    When n < a the index is 0, i.e. the largest negative available. Returns None without negatives.
    """
    n = neg_sims.numel()
    if n == 0:
        return None
    indices = torch.tensor([n // a for a in anchors], device=neg_sims.device)
    # one partial sort up to the deepest index serves every anchor (~3.6x faster than a kthvalue per anchor)
    top = torch.topk(neg_sims.reshape(-1), int(indices.max()) + 1, sorted=True).values
    return top[indices]


def clamped_sigmoid(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """1 / (1 + exp(clamp(-x / temperature, -50, 50))): the official code's sigmoid, gradient 0 when clamped."""
    exponent = torch.clamp(-x / temperature, min=-SIGMOID_CLAMP, max=SIGMOID_CLAMP)
    return 1.0 / (1.0 + torch.exp(exponent))


def soft_rank(sims: torch.Tensor, thresholds: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft count of thresholds exceeded by each similarity: sum_k sigmoid((s - t_k) / temperature)."""
    return clamped_sigmoid(sims[:, None] - thresholds[None, :].to(sims.dtype), temperature).sum(dim=1)


def hard_rank(sims: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Number of thresholds strictly exceeded by each similarity (the pair's FPR interval)."""
    return (sims[:, None] > thresholds[None, :].to(sims.dtype)).sum(dim=1)


def rank_mse(student_sims: torch.Tensor, teacher_sims: torch.Tensor, student_thresholds: torch.Tensor,
             teacher_thresholds: torch.Tensor, temperature: float, worse: int = 0) -> torch.Tensor:
    """Mean squared difference of soft ranks, each model against its own thresholds; 0 for no pairs.

    `worse=0`: symmetric (the official loss). One-sided, only where the student ranks a pair worse than the
    teacher: `worse=+1` for positive pairs (student rank below the teacher's), `worse=-1` for negative pairs
    (student rank above). The mean is over all the pairs given either way.
    The empty case returns a zero still attached to the graph (so backward always works); the official
    code would return NaN from `mse_loss` on empty tensors.
    """
    if student_sims.numel() == 0:
        return student_sims.sum() * 0.0
    s_rank = soft_rank(student_sims, student_thresholds, temperature)
    t_rank = soft_rank(teacher_sims.to(student_sims.dtype), teacher_thresholds, temperature)
    if worse == 0:
        return F.mse_loss(s_rank, t_rank)
    return F.relu(worse * (t_rank - s_rank)).pow(2).mean()


def parse_teacher_thresholds(value: Mapping | Sequence[float], anchors: Sequence[int]) -> list[float]:
    """Teacher thresholds per anchor from thresholds.json's dict ("1e-1": t, ...) or a plain list.

    Dict keys are matched by value (float(key) == 1/anchor); non-numeric keys such as "tpr" or "counts"
    are ignored. Raises PipelineError naming the missing key or the length mismatch.
    """
    if isinstance(value, Mapping):
        by_fpr = {}
        for key, t in value.items():
            try:
                by_fpr[float(key)] = (key, t)
            except (TypeError, ValueError):
                continue
        out = []
        for a in anchors:
            match = [kt for f, kt in by_fpr.items() if math.isclose(f, 1.0 / a, rel_tol=1e-9)]
            if not match:
                raise PipelineError(f"teacher thresholds: no key for FPR 1/{a} "
                                    f"(expected e.g. '1e-{round(math.log10(a))}')")
            key, t = match[0]
            if not isinstance(t, (int, float)) or not math.isfinite(t):
                raise PipelineError(f"teacher thresholds: key {key!r} is not a finite number ({t!r})")
            out.append(float(t))
        return out
    out = [float(t) for t in value]
    if len(out) != len(anchors) or not all(math.isfinite(t) for t in out):
        raise PipelineError(f"teacher thresholds: expected {len(anchors)} finite values (one per anchor), got {out}")
    return out
