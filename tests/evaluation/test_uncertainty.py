"""Each TPR@FPR's standard error and resolution (`pipeline.evaluation.uncertainty`), against a direct
computation on a hand-made score list: the threshold found by counting impostors, the TPR by counting
genuine pairs, the SE by the binomial formula written out."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.ijb import verification_metrics
from pipeline.evaluation.uncertainty import (
    MIN_IMPOSTORS,
    difference_resolved,
    impostors_at,
    is_resolved,
    tpr_standard_error,
)
from pipeline.evaluation.verification import evaluate_identities

# 1,000 impostors at 0.000, 0.001, ..., 0.999 and 20 genuine pairs: 5 above every impostor, the rest spread
IMPOSTORS = np.arange(1000) / 1000
GENUINE = np.array([1.5, 1.4, 1.3, 1.2, 1.1, 0.995, 0.993, 0.991, 0.985, 0.95,
                    0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])


def direct(fpr: float) -> tuple[float, float, int]:
    """(TPR, its SE, impostors above the threshold) at the best threshold accepting at most fpr * 1000
    impostors, counted by hand."""
    allowed = int(fpr * 1000 + 1e-9)
    threshold = np.sort(IMPOSTORS)[::-1][allowed - 1] if allowed else np.inf  # the allowed-th highest impostor
    accepted = int(np.sum(IMPOSTORS >= threshold))
    tpr = float(np.mean(GENUINE >= threshold)) if allowed else float(np.mean(GENUINE > IMPOSTORS.max()))
    return tpr, math.sqrt(tpr * (1 - tpr) / GENUINE.size), accepted


def test_se_and_resolution_match_a_direct_count():
    scores = np.r_[GENUINE, IMPOSTORS]
    labels = np.r_[np.ones(GENUINE.size), np.zeros(IMPOSTORS.size)].astype(np.int8)
    metrics, _ = verification_metrics(scores, labels, "exact")
    for key, fpr in (("1e-1", 0.1), ("1e-2", 0.01), ("1e-3", 0.001), ("1e-4", 1e-4)):
        tpr, se, accepted = direct(fpr)
        assert metrics[f"tpr@fpr={key}"] == pytest.approx(tpr)
        assert metrics["tpr_se"][key] == pytest.approx(se)
        assert metrics["impostor_pairs"][key] == accepted
        assert metrics["resolved"][key] is (accepted >= MIN_IMPOSTORS)
    # by hand: 1e-2 accepts 10 impostors (resolved), 1e-3 one (not); TPR@1e-2 = 8/20 (scores >= 0.990)
    assert metrics["tpr@fpr=1e-2"] == pytest.approx(8 / 20)
    assert metrics["tpr_se"]["1e-2"] == pytest.approx(math.sqrt(0.4 * 0.6 / 20))
    assert metrics["resolved"] == {"1e-6": False, "1e-5": False, "1e-4": False, "1e-3": False, "1e-2": True,
                                   "1e-1": True}


def test_the_test_set_metrics_carry_the_same_fields():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(40), 5)
    embeddings = rng.normal(size=(40, 16))[labels] + 0.8 * rng.normal(size=(200, 16))
    metrics, _ = evaluate_identities(embeddings, labels, fprs=(1e-1, 1e-2, 1e-3))
    assert metrics["positive_pairs"] == 400 and metrics["negative_pairs"] == 19500
    assert metrics["resolved"] == {"1e-1": True, "1e-2": True, "1e-3": True}  # 1,950 / 195 / 19 impostors
    assert metrics["impostor_pairs"] == {"1e-1": 1950, "1e-2": 195, "1e-3": 19}
    for key in ("1e-1", "1e-2", "1e-3"):
        p = metrics[f"tpr@fpr={key}"]
        assert metrics["tpr_se"][key] == pytest.approx(math.sqrt(p * (1 - p) / 400))


def test_resolution_rule_and_se_edges():
    assert impostors_at(1e-4, 123_750) == 12 and is_resolved(1e-4, 123_750)  # the 100 x 5 IJB set
    assert impostors_at(1e-4, 4_750) == 0 and not is_resolved(1e-3, 4_750)  # the old 20 x 5 set: 4 at 1e-3
    assert impostors_at(1e-3, 10_000) == 10 and is_resolved(1e-3, 10_000)  # no float round-down at the edge
    assert tpr_standard_error(1.0, 100) == 0.0 and math.isnan(tpr_standard_error(0.5, 0))
    assert difference_resolved(0.60, 0.55, 0.01, 0.01)  # 0.05 > 2 * 0.0141
    assert not difference_resolved(0.60, 0.58, 0.01, 0.01)
    assert not difference_resolved(0.55, 0.60, 0.01, 0.01)  # the teacher must be the higher one
