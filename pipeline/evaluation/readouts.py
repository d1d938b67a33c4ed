"""What the report prints of TPR@FPR read-outs: each TPR with its standard error ("0.612 ± 0.015"), and
"gap closed" only where the measurement supports it.

Gap closed = (student - baseline) / (teacher - baseline) at FPR f is shown when
1. every model of the comparison has f resolved (`uncertainty.is_resolved`: enough impostor pairs above its
   threshold), and
2. teacher - baseline exceeds RESOLVED_SE combined standard errors (a gap inside the noise makes the ratio
   noise: the committed 20-identity IJB set printed -1.667 from a 0.005 gap);
otherwise the cell reads "n/r" and the table's footnote says which condition failed at which level.
A read-out without a standard error (a result file written before they were stored, with no pair counts)
is printed bare and does not block the gap: there is nothing to judge it by.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.evaluation.uncertainty import MIN_IMPOSTORS, RESOLVED_SE, combined_se, difference_resolved

NOT_RESOLVED = "n/r"


@dataclass
class Readout:
    """One model's TPR at each FPR key ("1e-4") on one pair set, with its SE and whether the level is resolved."""

    tpr: dict[str, float]
    se: dict[str, float] = field(default_factory=dict)
    resolved: dict[str, bool] = field(default_factory=dict)

    def se_of(self, key: str) -> float:
        """The SE at `key`, 0 when unknown (so that an old file's gap is judged by its sign alone)."""
        value = self.se.get(key, math.nan)
        return 0.0 if math.isnan(value) else value


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def with_se(value: float | None, se: float | None, digits: int = 3, sign: bool = False) -> str:
    """"0.612 ± 0.015" ("+0.050 ± 0.022" with `sign`); the bare value when the SE is unknown."""
    if value is None or math.isnan(value):
        return "–"
    text = f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    return text if se is None or math.isnan(se) else f"{text} ± {se:.{digits}f}"


def tpr_cell(readout: Readout, key: str) -> str:
    return with_se(readout.tpr.get(key), readout.se.get(key))


def unresolved_levels(readouts: list[Readout], keys) -> list[str]:
    """The FPR keys that some model's read-out marks as not resolved."""
    return [k for k in keys if any(r.resolved.get(k) is False for r in readouts)]


def gap_blocker(key: str, readouts: list[Readout], teacher: Readout, baseline: Readout) -> str | None:
    """Why gap closed at `key` is not shown (one phrase), or None when it is."""
    if key not in teacher.tpr or key not in baseline.tpr:
        return "no teacher or baseline TPR"
    if key in unresolved_levels(readouts, [key]):
        return f"FPR not resolved (fewer than {MIN_IMPOSTORS} impostor pairs above its threshold)"
    high, low = teacher.tpr[key], baseline.tpr[key]
    if not difference_resolved(high, low, teacher.se_of(key), baseline.se_of(key)):
        spread = combined_se((teacher.se_of(key), baseline.se_of(key)))
        return (f"teacher - baseline = {high - low:+.3f}, not above {RESOLVED_SE:g} x its standard error "
                f"{spread:.3f}")
    return None


def gap_blockers(keys, readouts: list[Readout], teacher: Readout, baseline: Readout) -> dict[str, str | None]:
    """`gap_blocker` of each FPR key."""
    return {k: gap_blocker(k, readouts, teacher, baseline) for k in keys}


def gap_cell(readout: Readout, key: str, teacher: Readout, baseline: Readout, blockers: dict[str, str | None]) -> str:
    """A model's gap closed at `key`: "n/r" where blocked, "–" where the model has no TPR there."""
    if blockers[key] is not None:
        return NOT_RESOLVED
    if key not in readout.tpr:
        return "–"
    base = baseline.tpr[key]
    return fmt((readout.tpr[key] - base) / (teacher.tpr[key] - base))


def gap_footnote(blockers: dict[str, str | None], where: str) -> str:
    """One line naming each level whose gap closed is "n/r" and why ("" when none is)."""
    reasons = [f"@{k}: {reason}" for k, reason in blockers.items() if reason is not None]
    if not reasons:
        return ""
    return (f"{NOT_RESOLVED} ({where}): gap closed not shown where the measurement cannot carry it: "
            + "; ".join(reasons) + ".")


def gain_cell(student: Readout, baseline: Readout, key: str) -> str:
    """student - baseline with the two SEs combined (independent errors: conservative for models scored on
    the same pairs)."""
    if key not in student.tpr or key not in baseline.tpr:
        return "–"
    se = combined_se((student.se.get(key, math.nan), baseline.se.get(key, math.nan)))
    return with_se(student.tpr[key] - baseline.tpr[key], se, sign=True)
