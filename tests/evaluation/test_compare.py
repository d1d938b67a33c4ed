"""Paired statistics of the quality benchmark against a hand computation on fixed numbers."""
import math

from pipeline.evaluation.compare import gap_closed, mean_and_se, paired


def test_paired_difference_mean_and_standard_error_by_hand():
    method = {0: 0.50, 1: 0.46, 2: 0.52, 3: 0.47, 9: 0.99}  # seed 9 has no baseline: left out
    baseline = {0: 0.40, 1: 0.41, 2: 0.38, 3: 0.43}
    result = paired(method, baseline)
    # differences 0.10, 0.05, 0.14, 0.04: mean 0.0825; deviations 0.0175, -0.0325, 0.0575, -0.0425
    # sum of squares 0.00030625 + 0.00105625 + 0.00330625 + 0.00180625 = 0.006475; / 3 = 0.0021583...
    # SE = sqrt(0.0021583 / 4) = 0.023229...
    assert result["seeds"] == [0, 1, 2, 3] and result["n"] == 4
    assert math.isclose(result["mean"], 0.0825, abs_tol=1e-12)
    assert math.isclose(result["se"], math.sqrt(0.006475 / 3 / 4), rel_tol=1e-12)
    assert math.isclose(result["se"], 0.0232289, rel_tol=1e-5)
    assert math.isclose(result["z"], 0.0825 / 0.0232289, rel_tol=1e-5)


def test_gap_closed_per_seed_by_hand():
    method, baseline = {0: 0.5, 1: 0.45, 2: 0.9}, {0: 0.3, 1: 0.35, 2: 0.7}
    result = gap_closed(method, baseline, teacher=0.6)  # seed 2: baseline beats the teacher, left out
    # (0.5 - 0.3) / (0.6 - 0.3) = 0.6667, (0.45 - 0.35) / (0.6 - 0.35) = 0.4
    assert result["n"] == 2
    assert math.isclose(result["mean"], (2 / 3 + 0.4) / 2, rel_tol=1e-12)
    assert math.isclose(result["se"], abs(2 / 3 - 0.4) / 2, rel_tol=1e-12)  # two values: sd/sqrt(2) = |a-b|/2


def test_degenerate_inputs():
    assert math.isnan(mean_and_se([])[0]) and math.isnan(mean_and_se([1.0])[1])
    assert mean_and_se([1.0])[0] == 1.0
    assert math.isnan(paired({0: 1.0}, {1: 1.0})["mean"])
