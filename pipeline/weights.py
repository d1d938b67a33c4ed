"""Ensemble member weights, one parser for every option that takes them (--cache-weights, --model-weights):
a comma-separated list of finite numbers > 0, one per member. A leaf (no torch): build-pools, evaluate and
train-student read them before opening any file."""
from __future__ import annotations

import math
from typing import Sequence

from pipeline.errors import PipelineError


def parse_weights(text: str | None, count: int, option: str = "--cache-weights",
                  per: str = "--cache") -> list[float] | None:
    """`1,2,0.5` as floats, one per member (None: equal weights); PipelineError naming `option`."""
    if text is None or not str(text).strip():
        return None
    parts = [part.strip() for part in str(text).split(",")]
    try:
        weights = [float(part) for part in parts]
    except ValueError:
        raise PipelineError(f"{option} {text}: not a comma-separated list of numbers") from None
    return checked_weights(weights, count, f"{option} {text}", parts, per)


def checked_weights(weights: Sequence[float] | None, count: int, what: str = "ensemble weights",
                     written: Sequence[str] | None = None, per: str = "--cache") -> list[float]:
    """The weights as floats (equal for None), one per member (one per `per` option: --cache, --model), each
    finite and > 0; PipelineError naming `what` and the first bad weight as `written` (the user's text) or
    as its repr."""
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise PipelineError(f"{what}: {len(weights)} weight(s) for {count} {per.lstrip('-')}(s); give one per "
                            f"{per}")
    shown = list(written) if written is not None else [repr(w) for w in weights]
    bad = [text for text, w in zip(shown, weights) if not (math.isfinite(w) and w > 0)]
    if bad:
        raise PipelineError(f"{what}: {bad[0]} is not a finite number > 0")
    return weights
