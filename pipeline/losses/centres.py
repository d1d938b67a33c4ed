"""Class-centre distillation: the student's margin head uses class centres that follow the teacher.

The centres get no gradient (they are a buffer of the head, not a parameter); each step, before the margin
loss, every class in the (DDP-gathered) batch moves its centre toward the teacher's normalised embedding of
its samples, `new = a * old + (1 - a) * t`. The margin loss alone then trains the student, so the student is
pulled toward the teacher's geometry through the classifier (no feature-matching term):

* `adadistill` (AdaDistill, Boutros et al., ECCV 2024; fdbtrs/AdaDistill `AdaptiveAArcFace` /
  `AdaptiveACosFace`): an adaptive weight per sample,
  `a = clamp(cos(s, t) * clamp(cos(old, t), 1e-6, 1), 1e-6, 1)`, with cos(s, t) clamped to [-1, 1]: while the
  student is far from the teacher (small cos(s, t)) the centre jumps to the teacher's embedding, later it
  moves slowly;
* `centre-ema` (the fixed-momentum relative, AMLDistill in the same repository): `a = --centre-momentum`;
* `centre-fixed` (MarginDistillation / ProxylessKD style): the centres are the teacher's identity centres
  from pools.h5 and never move.

Rules the official code leaves open: (1) a label met several times in one batch moves its centre to the mean
of its occurrences' proposals, `mean_i (a_i * old + (1 - a_i) * t_i)`, each `a_i` computed from the centre
before the step (for labels met once this is exactly the official update; the official in-place assignment
keeps one of the proposals, which one depending on the device); (2) under DDP the update sees the global
batch, so every rank holds the same centres (the official code updates each GPU's copy from its own batch and
lets them drift apart). Centres start as the head's random normal(0, 0.01) draw (official), or with
`--centre-init teacher` as the teacher's identity centres (pools.h5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.losses.base import CentreMethod, Need
from pipeline.settings import Choice, setting

ALPHA_FLOOR = 1e-6  # the official clamp of the adaptive weight and of cos(old centre, teacher)


class CentreInit(Choice):
    """Where the centres of a class-centre method start."""

    random = "random"
    teacher = "teacher"


@dataclass
class CentreSettings:
    centre_init: str = setting("random", "Class-centre KD (adadistill, centre-ema): start the margin head's "
                                         "centres random (official) or at the teacher's identity centres "
                                         "(pools.h5; centre-fixed always does).", choices=CentreInit)
    centre_momentum: float = setting(0.9, "centre-ema: the fixed weight a of new = a * old + (1 - a) * teacher.",
                                     min=0.0, max=1.0)


def batch_centre_targets(centres: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                         alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes, new centres): each class of the batch moved to the mean over its samples of
    `alpha_i * centres[y_i] + (1 - alpha_i) * teacher_i` (see the module docstring)."""
    classes, slot = torch.unique(labels, return_inverse=True)
    proposals = alpha[:, None] * centres[labels] + (1 - alpha[:, None]) * teacher
    sums = torch.zeros(classes.numel(), centres.shape[1], dtype=proposals.dtype, device=proposals.device)
    sums.index_add_(0, slot, proposals)
    counts = torch.bincount(slot, minlength=classes.numel()).to(proposals.dtype)
    return classes, sums / counts[:, None]


class _MovingCentres(CentreMethod):
    """Shared by the methods whose centres move: checks, the update, the teacher-centre start."""

    def __init__(self, teacher_centres: torch.Tensor | None = None):
        super().__init__()
        self.teacher_centres = teacher_centres
        self.last: dict[str, float] = {}

    @classmethod
    def needs(cls, config) -> set[str]:
        return {Need.centres.value} if config.centre_init == CentreInit.teacher else set()

    @classmethod
    def build(cls, config, stage2) -> "_MovingCentres":
        return cls(**cls._options(config, stage2))

    @classmethod
    def _options(cls, config, stage2) -> dict:
        teacher = cls.stage2_output(stage2, Need.centres.value) if config.centre_init == CentreInit.teacher else None
        return {"teacher_centres": None if teacher is None else torch.as_tensor(teacher, dtype=torch.float32)}

    def init_centres(self, centres: torch.Tensor, first_row: int = 0, num_classes: int | None = None) -> None:
        if self.teacher_centres is None:
            return
        whole = (centres.shape[0] if num_classes is None else num_classes, centres.shape[1])
        if self.teacher_centres.shape != whole:
            raise PipelineError(f"{self.name}: the teacher's identity centres are {tuple(self.teacher_centres.shape)} "
                                f"but the student's margin head is {whole} (classes x embedding size)")
        rows = self.teacher_centres[first_row:first_row + centres.shape[0]]
        with torch.no_grad():
            centres.copy_(rows)

    @torch.no_grad()
    def update_centres(self, centres, student, teacher, labels) -> None:
        if student.shape[1] != centres.shape[1] or teacher.shape[1] != centres.shape[1]:
            raise PipelineError(f"{self.name} needs equal embedding sizes: student {student.shape[1]}-d, teacher "
                                f"{teacher.shape[1]}-d, centres {centres.shape[1]}-d")
        dtype = torch.promote_types(centres.dtype, torch.float32)  # fp16 embeddings under AMP -> float32
        s = F.normalize(student.to(dtype), dim=1)
        t = F.normalize(teacher.to(dtype), dim=1)
        alpha = self.alpha(s, t, centres[labels].to(dtype))
        classes, moved = batch_centre_targets(centres.to(dtype), t, labels, alpha)
        centres[classes] = moved.to(centres.dtype)
        self.last = {"alpha_mean": float(alpha.mean()), "cos_student_teacher": float((s * t).sum(1).mean())}

    def alpha(self, s: torch.Tensor, t: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """The weight of the old centre, per sample."""
        raise NotImplementedError

    def diagnostics(self) -> dict[str, float]:
        return dict(self.last)


class AdaDistill(_MovingCentres):
    """AdaDistill's adaptive centre update (see the module docstring)."""

    name, settings = "adadistill", CentreSettings

    def alpha(self, s, t, old):
        agreement = (s * t).sum(1).clamp(-1.0, 1.0)
        centre_fit = F.cosine_similarity(old, t, dim=1).clamp(ALPHA_FLOOR, 1.0)
        return (agreement * centre_fit).clamp(ALPHA_FLOOR, 1.0)


class CentreEMA(_MovingCentres):
    """Fixed-momentum EMA of the teacher's embeddings (see the module docstring)."""

    name, settings = "centre-ema", CentreSettings

    def __init__(self, momentum: float = 0.9, teacher_centres: torch.Tensor | None = None):
        super().__init__(teacher_centres)
        self.momentum = float(momentum)

    @classmethod
    def build(cls, config, stage2) -> "CentreEMA":
        return cls(config.centre_momentum, **cls._options(config, stage2))

    def alpha(self, s, t, old):
        return torch.full((s.shape[0],), self.momentum, dtype=s.dtype, device=s.device)


class TeacherCentres(_MovingCentres):
    """The teacher's identity centres, fixed (see the module docstring)."""

    name, settings = "centre-fixed", CentreSettings

    @classmethod
    def needs(cls, config) -> set[str]:
        return {Need.centres.value}

    @classmethod
    def build(cls, config, stage2) -> "TeacherCentres":
        return cls(torch.as_tensor(cls.stage2_output(stage2, Need.centres.value), dtype=torch.float32))

    @torch.no_grad()
    def update_centres(self, centres, student, teacher, labels) -> None:
        """Nothing moves."""
