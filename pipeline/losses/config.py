"""The distillation settings of a student, declared once (CLI options and params.yaml keys derive from them)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from torch import nn

from pipeline.errors import PipelineError
from pipeline.losses.ekd import EKDMode
from pipeline.losses.kd import KDMethod, build_kd_loss
from pipeline.settings import Choice, check, setting


class KDScale(Choice):
    """How KD weights are applied (see pipeline/training/distill.py)."""

    weight = "weight"
    grad_ratio = "grad-ratio"


@dataclass
class KDConfig:
    """Which KD loss a student trains with, and its knobs."""

    kd: str = setting("ekd", "KD loss: none, l2 (normalised features), cosine, rkd, ekd, or l2+ekd (feature L2 "
                             "plus the EKD rank loss, weighted by --kd-weight and --ekd-weight).", choices=KDMethod)
    # Calibrated defaults (docs/quality.md): KD's gradient at the embeddings 1.5x the margin loss's for the
    # feature terms, 0.2x for EKD's rank term. The official EKD constants are --kd-scale weight --kd-weight 1.
    kd_weight: float = setting(1.5, "Weight of the KD loss (of the L2 term for l2+ekd); see --kd-scale.", min=0.0)
    ekd_weight: float = setting(0.2, "Weight of the EKD term of l2+ekd; see --kd-scale.", min=0.0)
    kd_scale: str = setting("grad-ratio", "grad-ratio: each weight is the wanted ratio of the term's gradient "
                                          "norm to the margin loss's at the embeddings, kept by running "
                                          "averages (scale-free: no retuning between image sizes, embedding "
                                          "sizes or margin scales). weight: multiply each KD term by its "
                                          "weight (the official EKD recipe: weight 1).", choices=KDScale)
    kd_warmup_epochs: float = setting(0.0, "Ramp the KD terms linearly from 0 over this many epochs.", min=0.0)
    ekd_mode: str = setting("global", "global (exact teacher thresholds, student queue) or reference (official "
                                      "TFace behaviour).", choices=EKDMode)
    ekd_temperature: float = setting(0.01, "Sigmoid temperature of EKD's soft rank (official: 0.01, tuned for "
                                           "512-d MS1M embeddings).", above=0.0)
    ekd_one_sided: bool = setting(False, "Penalise a pair only where the student ranks it worse than the teacher "
                                         "(official: both ways).")
    ekd_positive_weight: float = setting(0.02, "Weight of EKD's positive-pair term (official: 0.02).", min=0.0)
    ekd_negative_weight: float = setting(0.01, "Weight of EKD's negative-pair term (official: 0.01).", min=0.0)
    queue_size: int = setting(65536, "EKD global mode: recent student embeddings kept for the student's "
                                     "thresholds.", min=1)

    def __post_init__(self):
        check(self)

    def identity(self) -> dict:
        """The settings that shape this KD (those of other methods left out): a resumed run must share them."""
        if self.kd == KDMethod.none:
            return {"kd": self.kd}
        names = ["kd", "kd_weight", "kd_scale", "kd_warmup_epochs"]
        if self.kd == KDMethod.l2_ekd:
            names.append("ekd_weight")
        if self.uses_ekd:  # every EKD knob, so a new one cannot be forgotten here
            names += [f.name for f in fields(self) if f.name.startswith("ekd_") and f.name != "ekd_weight"]
        if self.needs_thresholds:
            names.append("queue_size")
        return {name: getattr(self, name) for name in names}

    @property
    def uses_ekd(self) -> bool:
        return self.kd in (KDMethod.ekd, KDMethod.l2_ekd)

    @property
    def needs_thresholds(self) -> bool:
        """True when the loss reads the teacher's global thresholds (thresholds.json)."""
        return self.uses_ekd and self.ekd_mode == EKDMode.global_

    def terms(self, teacher_thresholds: Mapping | None = None) -> list[tuple[str, nn.Module, float]]:
        """(name, loss, weight) of each KD term; none for kd none. `teacher_thresholds` from thresholds.json
        for EKD global mode."""
        if self.kd == KDMethod.none:
            return []
        if self.kd not in (KDMethod.ekd, KDMethod.l2_ekd):
            return [(self.kd, build_kd_loss(self.kd), self.kd_weight)]
        ekd = self._ekd(teacher_thresholds)
        if self.kd == KDMethod.ekd:
            return [("ekd", ekd, self.kd_weight)]
        return [("l2", build_kd_loss(KDMethod.l2), self.kd_weight), ("ekd", ekd, self.ekd_weight)]

    def _ekd(self, teacher_thresholds: Mapping | None) -> nn.Module:
        options = {"mode": self.ekd_mode, "temperature": self.ekd_temperature, "one_sided": self.ekd_one_sided,
                   "pos_weight": self.ekd_positive_weight, "neg_weight": self.ekd_negative_weight}
        if self.needs_thresholds:
            if teacher_thresholds is None:
                raise PipelineError("--ekd-mode global needs --pools (thresholds.json from build-pools)")
            options.update(teacher_thresholds=teacher_thresholds, queue_size=self.queue_size)
        return build_kd_loss(KDMethod.ekd, **options)
