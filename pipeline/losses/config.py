"""A student's distillation settings: the method combination, how weights apply, and every method's own
options (each method's settings mixin, registry.py), declared once; CLI options and params.yaml keys derive
from them."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from pipeline.losses.base import CentreMethod, DistillMethod
from pipeline.losses.registry import METHODS, NONE, parse_methods, settings_classes
from pipeline.settings import Choice, check, identity, setting


class KDScale(Choice):
    """How KD weights are applied (see pipeline/training/distill.py)."""

    weight = "weight"
    grad_ratio = "grad-ratio"


def _check_methods(option: str, value: str) -> None:
    parse_methods(value, option)


# The measured recipe (docs/quality.md): feature L2 + negatives-only EKD on the teacher's hardest pairs.
DEFAULT_KD = "l2+ekd"


@dataclass
class KDConfig(*reversed(settings_classes())):  # reversed: the options then list in registration order
    """Which distillation methods a student trains with, and their knobs."""

    kd: str = setting(DEFAULT_KD, "Distillation: none, one method or a '+'-combination, each term with its own "
                                  "--<method>-weight: " + ", ".join(METHODS) + " (e.g. l2+ekd, adadistill+ekd). "
                                  "adadistill, centre-ema and centre-fixed are class-centre KD in the margin "
                                  "head (no weight).", validate=_check_methods)
    kd_scale: str = setting("grad-ratio", "grad-ratio: each weight is the wanted ratio of the term's gradient "
                                          "norm to the margin loss's at the embeddings, kept by running "
                                          "averages (scale-free: no retuning between image sizes, embedding "
                                          "sizes or margin scales). weight: multiply each KD term by its "
                                          "weight (the official EKD recipe: weight 1).", choices=KDScale)
    kd_warmup_epochs: float = setting(0.0, "Ramp the KD terms linearly from 0 over this many epochs.", min=0.0)

    def __post_init__(self):
        check(self)
        # stored as spelled canonically (' l2 + ekd ' -> 'l2+ekd'): the run identity compares this text
        self.kd = "+".join(m.name for m in parse_methods(self.kd)) or NONE

    @property
    def methods(self) -> list[type[DistillMethod]]:
        return parse_methods(self.kd)

    @property
    def enabled(self) -> bool:
        return self.kd != NONE

    def identity(self) -> dict:
        """The settings that shape this distillation (other methods' options left out): a resumed run must
        share them."""
        names = [f.name for f in fields(KDConfig) if not any(f in fields(c) for c in settings_classes())]
        for method in self.methods:
            names += [f.name for f in fields(method.settings)]
        return identity(self, names)

    def needs(self) -> set[str]:
        """The stage-2 outputs (base.Need values) the methods need."""
        return set().union(*(m.needs(self) for m in self.methods)) if self.methods else set()

    def terms(self, stage2: Mapping | None = None) -> list[tuple[str, DistillMethod, float]]:
        """(name, loss, weight) of each loss term (head methods excluded)."""
        return [(m.name, m.build(self, stage2 or {}), getattr(self, m.weight_field))
                for m in self.methods if not m.in_head]

    def head_method(self, stage2: Mapping | None = None) -> CentreMethod | None:
        """The class-centre method that drives the margin head's centres, if any."""
        heads = [m for m in self.methods if m.in_head]
        return heads[0].build(self, stage2 or {}) if heads else None
