"""The false-positive-rate levels the project reports and distils at, and their one spelling as keys.

EKD thresholds, the teacher's exact global thresholds (thresholds.json), TPR@FPR read-outs and the report
all use these levels; FPR f corresponds to the EKD "anchor" 1/f.
"""
from __future__ import annotations

FPR_LEVELS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
ANCHORS = tuple(round(1 / f) for f in FPR_LEVELS)  # 10 .. 1e6, the official EKD anchors
TEST_FPRS = FPR_LEVELS[:5]  # what a test set of a few thousand images can measure (evaluate)


def fpr_key(fpr: float) -> str:
    """A short, stable name for an FPR level: 1e-4 -> '1e-4', 0.05 -> '5e-2', 2.5e-3 -> '2.5e-3'."""
    mantissa, exponent = f"{float(fpr):e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


LEVEL_KEYS = tuple(fpr_key(f) for f in FPR_LEVELS)  # "1e-1" .. "1e-6": thresholds.json and report keys
REPORT_KEYS = LEVEL_KEYS[1:5]  # the report's table columns
