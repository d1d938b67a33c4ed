"""EKD: evaluation-oriented knowledge distillation (Huang et al., CVPR 2022) as a rank loss on pair similarities.

`EKDLoss(mode=...)(student_emb, teacher_emb, labels) -> scalar`, on the (DDP-gathered) global batch.

mode="reference" follows the official TFace code step by step:
  * both embeddings L2-normalised; all pairs i<j (row-major); positives = same label;
  * each model's negatives sorted descending, thresholds at index n // a for the anchors a (FPR 1/a);
  * thresholds smoothed by an EMA held in buffers (start 0): state = m * current + (1 - m) * state,
    updated without gradient *before* being used in the same step;
  * soft rank = sum_k sigmoid((s - t_k) / temperature) (exponent clamped to [-50, 50]), each model against
    its own thresholds; loss = pos_weight * MSE over positives + neg_weight * MSE over the `topk` negatives
    with the highest student similarity (the teacher's similarities of the same pairs).
  Deviations (edge cases only): no positives -> positive term 0 (official: NaN from mse on empty tensors);
  no negatives -> the EMA is left unchanged and the negative term is 0 (official: index error); ties in the
  student's negative similarities are broken by pair order (stable sort) so runs are deterministic.

mode="global" (default) uses exact thresholds instead of per-batch estimates:
  * teacher thresholds: the exact global ones from thresholds.json (fixed buffer);
  * student thresholds: order statistics (index n // a, descending) over the negatives between the current
    batch and a queue of recent student embeddings (batch x queue, label differs) plus the batch's own
    negative pairs i<j. Computed without gradient, no EMA. While n < a the index is 0, i.e. the threshold
    falls back to the largest negative available; with no negatives at all (first step, one identity) the
    teacher's thresholds stand in;
  * critical pairs, selected explicitly among the batch pairs i<j: those whose FPR interval (number of
    thresholds strictly exceeded: teacher similarity vs teacher thresholds, student vs student ones)
    differs between teacher and student, plus the `topk` hardest negatives for the student;
  * loss = pos_weight * rank MSE over critical positives + neg_weight * rank MSE over the selected negatives;
  * after the loss, the batch's detached, normalised student embeddings and labels enter the queue (a ring
    buffer kept in buffers, so state_dict/resume reproduces). Under DDP pass the gathered batch: every rank
    then holds the same queue and computes the same loss (see pipeline/training/ddp.py for the gradient).
  Cost: the student thresholds need B x queue similarities per step (B = global batch).

mode="teacher" ranks BOTH models' pairs against the teacher's exact thresholds (no student thresholds, no
queue). A global rise of all student similarities then moves the student's negatives up across fixed
thresholds, which the negative term resists, so the loss cannot be gamed by shrinking the embedding cone (what
makes global mode collapse the student when it is used alone: docs/quality.md); the price is that the student
is asked for the teacher's absolute similarity scale near the thresholds, not only its order.

Every mode updates its state on every call (like the official code), training or not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.fpr import ANCHORS, fpr_key
from pipeline.losses.base import DistillMethod, Need
from pipeline.machine.resources import require_memory
from pipeline.losses.rank import (
    check_anchors,
    check_kd_inputs,
    full_precision,
    hard_rank,
    order_statistic_thresholds,
    parse_teacher_thresholds,
    rank_mse,
    upper_pairs,
)
from pipeline.settings import Choice, setting

DEFAULT_ANCHORS = ANCHORS


class EKDMode(Choice):
    """How EKD finds its FPR thresholds (see the module docstring)."""

    global_ = "global"
    teacher = "teacher"
    reference = "reference"


MODES = EKDMode.values()


class EmbeddingQueue(nn.Module):
    """Ring buffer of recent (detached, normalised) embeddings and their labels, stored as buffers.

    Rows [0, count) are valid. With `dim=None` the embedding buffer is sized on the first push (or when a
    state_dict is loaded), so the loss does not need to know the embedding size up front.
    """

    def __init__(self, size: int, dim: int | None = None):
        super().__init__()
        if size < 1:
            raise PipelineError(f"EKD queue size must be >= 1, got {size}")
        self.size = int(size)
        require_memory(f"--ekd-queue-size {self.size}: the queue's labels", 8 * self.size)
        self.register_buffer("embeddings", torch.zeros(self.size, dim) if dim else torch.zeros(0, 0))
        self.register_buffer("labels", torch.full((self.size,), -1, dtype=torch.int64))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored embeddings and labels (valid rows only)."""
        n = int(self.count)
        return self.embeddings[:n], self.labels[:n]

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Append a batch, overwriting the oldest rows once full."""
        if self.embeddings.numel() == 0:
            # the queue, and a step's batch x queue similarities with their soft ranks and gradients
            dim, batch = embeddings.shape[1], embeddings.shape[0]
            require_memory(f"--ekd-queue-size {self.size}: a queue of {self.size} x {dim} embeddings and {batch} x "
                           f"{self.size} similarities per step", 4 * self.size * (dim + 3 * batch))
            self.embeddings = torch.zeros(self.size, embeddings.shape[1], dtype=embeddings.dtype,
                                          device=embeddings.device)
        if embeddings.shape[1] != self.embeddings.shape[1]:
            raise PipelineError(f"EKD queue holds {self.embeddings.shape[1]}-d embeddings, got {embeddings.shape[1]}-d")
        embeddings, labels = embeddings[-self.size:], labels[-self.size:]
        rows = (self.ptr + torch.arange(embeddings.shape[0], device=self.ptr.device)) % self.size
        self.embeddings[rows] = embeddings.to(self.embeddings.dtype)
        self.labels[rows] = labels.to(torch.int64)
        self.ptr.copy_((self.ptr + embeddings.shape[0]) % self.size)
        self.count.copy_(torch.clamp(self.count + embeddings.shape[0], max=self.size))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        incoming = state_dict.get(prefix + "embeddings")
        if (incoming is not None and incoming.shape != self.embeddings.shape
                and 0 in (incoming.numel(), self.embeddings.numel())):  # lazily sized on either side
            self.embeddings = torch.zeros_like(incoming, device=self.embeddings.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@dataclass
class EKDSettings:
    """EKD's options as train-student takes them. Defaults: the measured recipe (docs/quality.md); the official
    constants are params.yaml's `ekd_reference` student."""

    ekd_weight: float = setting(0.2, "Weight of the ekd term (see --kd-scale).", min=0.0)
    ekd_mode: str = setting("global", "global: the teacher's exact thresholds, the student's from a queue of its "
                                      "recent embeddings; teacher: both models ranked against the teacher's "
                                      "thresholds (cannot be gamed by a global shift); reference: the official "
                                      "TFace behaviour (per-batch EMA thresholds).", choices=EKDMode)
    ekd_temperature: float = setting(0.05, "Sigmoid temperature of EKD's soft rank (official: 0.01, tuned for "
                                           "512-d MS1M embeddings); below 1e-4 the sigmoid saturates (a non-finite "
                                           "loss).", min=1e-4, max=100.0)
    ekd_one_sided: bool = setting(True, "Penalise a pair only where the student ranks it worse than the teacher "
                                        "(official: both ways).")
    ekd_positive_weight: float = setting(0.0, "Weight of EKD's positive-pair term (official: 0.02; off by default: "
                                              "under global mode it rewards collapse, docs/quality.md).", min=0.0)
    ekd_negative_weight: float = setting(0.01, "Weight of EKD's negative-pair term (official: 0.01).", min=0.0)
    ekd_queue_size: int = setting(8192, "EKD global mode: recent student embeddings kept for the student's "
                                        "thresholds.", min=1)


class EKDLoss(DistillMethod):
    """Evaluation-oriented KD rank loss; see the module docstring for the modes.

    Args:
        mode: "global" (exact teacher thresholds + student queue), "teacher" (both against the teacher's
            thresholds) or "reference" (official behaviour).
        teacher_thresholds: global and teacher modes: thresholds.json's dict ("1e-1": t, ...) or a list per
            anchor.
        queue_size: global mode: number of recent student embeddings kept for the student's thresholds.
        dim: optional embedding size for the queue (otherwise taken from the first batch).
        topk: number of hardest student negatives in the negative term (official: 2000).
        temperature: sigmoid temperature of the soft rank (official: 0.01).
        anchors: FPR = 1/anchor levels (official: 10 .. 1e6).
        momentum: reference mode's threshold EMA factor (official: 0.01).
        pos_weight, neg_weight: weights of the positive and negative terms (official: 0.02, 0.01).
        weight: overall multiplier.
        one_sided: penalise a pair only where the student ranks it worse than the teacher (a positive below
            the teacher's interval, a negative above it); the official loss is symmetric.
    """

    def __init__(self, mode: str = "global", teacher_thresholds: Mapping | Sequence[float] | None = None,
                 queue_size: int = 65536, dim: int | None = None, topk: int = 2000, temperature: float = 0.01,
                 anchors: Sequence[float] = DEFAULT_ANCHORS, momentum: float = 0.01, pos_weight: float = 0.02,
                 neg_weight: float = 0.01, weight: float = 1.0, one_sided: bool = False):
        super().__init__()
        if mode not in MODES:
            raise PipelineError(f"EKD mode {mode!r}: choose one of {', '.join(MODES)}")
        mode = EKDMode(mode)
        if topk < 0 or temperature <= 0:
            raise PipelineError(f"EKD needs topk >= 0 and temperature > 0 (got {topk}, {temperature})")
        self.mode, self.topk, self.temperature = mode, int(topk), float(temperature)
        self.anchors = check_anchors(anchors)
        self.momentum, self.pos_weight, self.neg_weight, self.weight = momentum, pos_weight, neg_weight, weight
        self.one_sided = bool(one_sided)
        k = len(self.anchors)
        if mode == "reference":
            self.register_buffer("ema_student_thresholds", torch.zeros(k))
            self.register_buffer("ema_teacher_thresholds", torch.zeros(k))
        else:
            if teacher_thresholds is None:
                raise PipelineError(f"EKD {mode} mode needs teacher_thresholds (thresholds.json from build-pools)")
            values = parse_teacher_thresholds(teacher_thresholds, self.anchors)
            self.register_buffer("teacher_thresholds", torch.tensor(values, dtype=torch.float32))
            if mode == EKDMode.global_:
                self.queue = EmbeddingQueue(queue_size, dim)
        self.last_stats: dict[str, torch.Tensor] = {}

    name, settings, weight_field = "ekd", EKDSettings, "ekd_weight"

    @classmethod
    def needs(cls, config) -> set[str]:
        return set() if config.ekd_mode == EKDMode.reference else {Need.thresholds.value}

    @classmethod
    def build(cls, config, stage2) -> "EKDLoss":
        options = {"mode": config.ekd_mode, "temperature": config.ekd_temperature, "one_sided": config.ekd_one_sided,
                   "pos_weight": config.ekd_positive_weight, "neg_weight": config.ekd_negative_weight}
        if config.ekd_mode != EKDMode.reference:
            options.update(teacher_thresholds=cls.stage2_output(stage2, Need.thresholds.value),
                           queue_size=config.ekd_queue_size)
        return cls(**options)

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """EKD loss of the batch (a scalar); updates the threshold EMA (before use) or the queue (after)."""
        check_kd_inputs(student_emb, teacher_emb, labels)
        with full_precision(student_emb):
            return self._loss(student_emb, teacher_emb, labels)

    def _loss(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(student_emb.dtype, torch.float32)  # fp16/bf16 under AMP -> float32
        s = F.normalize(student_emb.to(dtype), dim=1)
        with torch.no_grad():
            t = F.normalize(teacher_emb.to(dtype), dim=1)
        rows, cols, same = upper_pairs(labels)
        s_pairs = (s @ s.t())[rows, cols]
        with torch.no_grad():
            t_pairs = (t @ t.t())[rows, cols]
        select = self._select_reference if self.mode == "reference" else self._select_global
        s_thr, t_thr, pos, neg = select(s.detach(), s_pairs.detach(), t_pairs, labels, same)
        sign = 1 if self.one_sided else 0
        loss = (self.pos_weight * rank_mse(s_pairs[pos], t_pairs[pos], s_thr, t_thr, self.temperature, sign)
                + self.neg_weight * rank_mse(s_pairs[neg], t_pairs[neg], s_thr, t_thr, self.temperature, -sign))
        if self.mode == EKDMode.global_:
            self.queue.push(s.detach(), labels)
        with torch.no_grad():
            disagree = hard_rank(s_pairs.detach(), s_thr) != hard_rank(t_pairs, t_thr)
        # For logging and inspection: the pairs are the batch's i<j pairs in row-major order.
        self.last_stats = {"positive_mask": pos, "negative_mask": neg, "disagree_mask": disagree,
                           "positive_pairs_mask": same,
                           "student_thresholds": s_thr.detach().clone(), "teacher_thresholds": t_thr.detach().clone()}
        return self.weight * loss

    def diagnostics(self) -> dict[str, float]:
        """The last batch's pair counts and thresholds, for training logs (empty before the first call)."""
        if not self.last_stats:
            return {}
        stats, out = self.last_stats, {}
        same, disagree = stats["positive_pairs_mask"], stats["disagree_mask"]
        out["pairs_critical_positive"] = float((stats["positive_mask"] & disagree).sum())
        out["pairs_critical_negative"] = float((stats["negative_mask"] & disagree).sum())
        out["pairs_in_loss"] = float(stats["positive_mask"].sum() + stats["negative_mask"].sum())
        out["disagree_fraction"] = float(disagree.float().mean()) if disagree.numel() else 0.0
        out["disagree_fraction_positive"] = float(disagree[same].float().mean()) if same.any() else 0.0
        for key, anchor in zip(("student", "teacher"), ("student_thresholds", "teacher_thresholds")):
            for a, value in zip(self.anchors, stats[anchor].tolist()):
                out[f"threshold_{key}_{fpr_key(1 / a)}"] = float(value)
        return out

    @torch.no_grad()
    def _select_reference(self, s, s_pairs, t_pairs, labels, same):
        """EMA thresholds from this batch's negatives; all positives and the topk hardest negatives."""
        negatives = ~same
        s_now = order_statistic_thresholds(s_pairs[negatives], self.anchors)
        if s_now is not None:
            t_now = order_statistic_thresholds(t_pairs[negatives], self.anchors)
            for buf, now in ((self.ema_student_thresholds, s_now), (self.ema_teacher_thresholds, t_now)):
                buf.copy_(self.momentum * now.to(buf.dtype) + (1 - self.momentum) * buf)
        return self.ema_student_thresholds, self.ema_teacher_thresholds, same, self._hardest(s_pairs, negatives)

    @torch.no_grad()
    def _select_global(self, s, s_pairs, t_pairs, labels, same):
        """Exact thresholds (global and teacher modes); critical positives and negatives plus the topk hardest
        negatives."""
        t_thr = self.teacher_thresholds
        s_thr = self.student_thresholds(s, labels, s_pairs[~same]) if self.mode == EKDMode.global_ else None
        if s_thr is None:  # teacher mode, or no negatives yet
            s_thr = t_thr
        critical = hard_rank(s_pairs, s_thr) != hard_rank(t_pairs, t_thr)
        return s_thr, t_thr, same & critical, (~same & critical) | self._hardest(s_pairs, ~same)

    @torch.no_grad()
    def student_thresholds(self, s: torch.Tensor, labels: torch.Tensor,
                           batch_negatives: torch.Tensor) -> torch.Tensor | None:
        """Global mode: thresholds over batch x queue negatives plus the batch's own negative pairs.

        `s` are the batch's normalised student embeddings, `batch_negatives` the similarities of its negative
        pairs i<j. Returns None when there is no negative at all.
        """
        q_emb, q_labels = self.queue.valid()
        negatives = [batch_negatives]
        if q_emb.shape[0] > 0:
            cross = s @ q_emb.to(s.dtype).t()
            negatives.append(cross[labels[:, None] != q_labels[None, :]])
        return order_statistic_thresholds(torch.cat(negatives), self.anchors)

    def _hardest(self, s_pairs: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Mask of the `topk` negatives with the highest student similarity (all when fewer)."""
        neg_index = torch.nonzero(negatives).flatten()
        order = torch.sort(s_pairs[neg_index], descending=True, stable=True).indices[:self.topk]
        mask = torch.zeros_like(negatives)
        mask[neg_index[order]] = True
        return mask

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, topk={self.topk}, temperature={self.temperature}, anchors={self.anchors}, "
                f"pos_weight={self.pos_weight}, neg_weight={self.neg_weight}, weight={self.weight}, "
                f"one_sided={self.one_sided}")

