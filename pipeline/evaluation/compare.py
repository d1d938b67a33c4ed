"""Comparing students over seeds: paired differences with standard errors, and the teacher-baseline gap closed.

A method is compared with another (usually the no-KD baseline) seed by seed: d_s = m_s - b_s for every seed s
both have; the mean of d and its standard error sd(d) / sqrt(n) (sample sd, n - 1). "Gap closed" per seed is
(m_s - b_s) / (T - b_s) with the teacher's value T (one teacher per dataset: it is trained once).
"""
from __future__ import annotations

import math
from collections.abc import Mapping


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN SE for fewer than two values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def paired(method: Mapping, other: Mapping) -> dict:
    """Mean and SE of method - other over the seeds both have, with the seeds and the per-seed differences."""
    seeds = sorted(set(method) & set(other))
    diffs = [method[s] - other[s] for s in seeds]
    mean, se = mean_and_se(diffs)
    return {"mean": mean, "se": se, "n": len(seeds), "seeds": seeds, "diffs": diffs,
            "z": mean / se if se and se > 0 else math.nan}


def gap_closed(method: Mapping, baseline: Mapping, teacher: float | Mapping) -> dict:
    """Mean and SE over seeds of (m_s - b_s) / (T_s - b_s), T the teacher's value (one number, or one per seed
    key when runs come from several datasets); seeds where the teacher does not beat the baseline are left
    out (the gap is undefined there)."""
    teacher_of = teacher if isinstance(teacher, Mapping) else {s: teacher for s in method}
    seeds = [s for s in sorted(set(method) & set(baseline)) if teacher_of[s] > baseline[s]]
    closed = [(method[s] - baseline[s]) / (teacher_of[s] - baseline[s]) for s in seeds]
    mean, se = mean_and_se(closed)
    return {"mean": mean, "se": se, "n": len(seeds)}
