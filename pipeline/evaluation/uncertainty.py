"""How far one TPR@FPR read-out can be trusted: its standard error over the genuine pairs, and whether the
impostor pairs resolve the FPR level at all.

- Standard error: the binomial SE of a proportion, sqrt(p (1 - p) / n_genuine), with p the TPR read. It counts
  only the sampling of the genuine pairs; pairs sharing an image or template are correlated, so it is a lower
  bound on the run-to-run spread (two models scored on the same pairs differ by less than their SEs combined
  suggest, since their errors are positively correlated).
- Resolved: at FPR f the threshold is the score of about the floor(f * n_impostor)-th highest impostor pair.
  Below MIN_IMPOSTORS such pairs the level is not measured: with k impostors above the threshold the FPR
  actually reached has a relative spread of ~1 / sqrt(k) (Poisson): k = 10 keeps it within ~30% of the
  target, well inside the factor of 10 between two levels, while k = 0 or 1 means the read-out is the ROC's
  first point, the same number at every lower level (what the old 4,750-impostor IJB set showed at
  1e-4 .. 1e-6). Ten is the smallest count whose spread is clearly below a level's width.
- A difference of two TPRs is resolved when it exceeds RESOLVED_SE combined standard errors.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from pipeline.fpr import fpr_key

MIN_IMPOSTORS = 10  # impostor pairs above the threshold for an FPR level to count as measured (see above)
RESOLVED_SE = 2.0  # combined standard errors a difference must exceed (about a 95% two-sided test)


def tpr_standard_error(tpr: float, genuine: int) -> float:
    """sqrt(tpr (1 - tpr) / genuine): the binomial standard error of a TPR over `genuine` pairs."""
    if genuine <= 0:
        return math.nan
    p = min(max(float(tpr), 0.0), 1.0)
    return math.sqrt(p * (1.0 - p) / genuine)


def impostors_at(fpr: float, impostors: int) -> int:
    """floor(fpr * impostors): the impostor pairs accepted at FPR `fpr` (rounded against float error)."""
    return int(math.floor(float(fpr) * impostors + 1e-9))


def is_resolved(fpr: float, impostors: int, minimum: int = MIN_IMPOSTORS) -> bool:
    """Whether `impostors` impostor pairs measure FPR `fpr`: at least `minimum` of them lie above its threshold."""
    return impostors_at(fpr, impostors) >= minimum


def readout_uncertainty(tprs: Mapping[float, float], genuine: int, impostors: int) -> dict:
    """For `{fpr: tpr}` read off one ROC: `{"tpr_se": {key: SE}, "resolved": {key: bool}, "impostor_pairs":
    {key: floor(fpr * impostors)}}`, keyed by `fpr_key` ("1e-4"), the fields evaluate and evaluate-ijb store."""
    return {"tpr_se": {fpr_key(f): tpr_standard_error(t, genuine) for f, t in tprs.items()},
            "resolved": {fpr_key(f): is_resolved(f, impostors) for f in tprs},
            "impostor_pairs": {fpr_key(f): impostors_at(f, impostors) for f in tprs}}


def combined_se(errors: Iterable[float]) -> float:
    """sqrt of the sum of squares: the SE of a sum or difference of independent estimates."""
    return math.sqrt(sum(float(e) ** 2 for e in errors))


def difference_resolved(high: float, low: float, high_se: float, low_se: float,
                        factor: float = RESOLVED_SE) -> bool:
    """Whether `high` - `low` is positive by more than `factor` of their combined standard error."""
    return high - low > factor * combined_se((high_se, low_se))
