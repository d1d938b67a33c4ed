"""Every distillation method, by name: adding one is its module plus one line in `METHODS`."""
from __future__ import annotations

from pipeline.errors import PipelineError
from pipeline.losses.base import DistillMethod
from pipeline.losses.centres import AdaDistill, CentreEMA, TeacherCentres
from pipeline.losses.ekd import EKDLoss
from pipeline.losses.feature import CosineLoss, FeatureL2Loss
from pipeline.losses.rkd import RKDLoss

METHODS: dict[str, type[DistillMethod]] = {m.name: m for m in (
    FeatureL2Loss,
    CosineLoss,
    RKDLoss,
    EKDLoss,
    AdaDistill,
    CentreEMA,
    TeacherCentres,
)}

NONE = "none"


def settings_classes() -> list[type]:
    """The methods' settings mixins, each once, in registration order."""
    out = []
    for method in METHODS.values():
        if method.settings not in out:
            out.append(method.settings)
    return out


def parse_methods(text: str, option: str = "--kd") -> list[type[DistillMethod]]:
    """The methods of a `+`-combination such as 'l2+ekd' ([] for 'none'); one-line errors naming `option`."""
    names = [part.strip() for part in str(text).split("+")]
    if names == [NONE]:
        return []
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise PipelineError(f"{option} {text!r}: {', '.join(map(repr, unknown)) or 'empty'} is not a method; use "
                            f"'none' or a '+'-combination of {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise PipelineError(f"{option} {text!r}: a method is named twice")
    if sum(METHODS[n].in_head for n in names) > 1:
        heads = [n for n in names if METHODS[n].in_head]
        raise PipelineError(f"{option} {text!r}: {' and '.join(heads)} both set the margin head's centres; use one")
    return [METHODS[n] for n in names]


def build_kd_loss(name: str, weight: float = 1.0, **kwargs) -> DistillMethod | None:
    """A term method by name with its constructor's keyword arguments ("none" -> None), for code and tests
    that build one loss directly rather than through KDConfig."""
    if name == NONE:
        if kwargs:
            raise PipelineError(f"KD loss 'none' takes no options (got {', '.join(sorted(kwargs))})")
        return None
    if name not in METHODS or METHODS[name].in_head:
        terms = [n for n, m in METHODS.items() if not m.in_head]
        raise PipelineError(f"unknown KD loss {name!r}: choose one of none, {', '.join(terms)}")
    try:
        return METHODS[name](weight=weight, **kwargs)
    except TypeError as err:
        raise PipelineError(f"KD loss {name!r}: bad option ({err})") from None
