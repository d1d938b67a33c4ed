"""pipeline.evaluation.metrics against loop-based re-computations of the insightface / sklearn procedures."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluation.metrics import (
    contiguous_folds,
    downsample_roc,
    roc_curve,
    tpr_at_fpr,
    verification_accuracy,
)
from pipeline.fpr import fpr_key


# ---------------------------------------------------------------------------------------------- references
def _reference_accuracy_at(threshold, dist, same):
    """insightface calculate_accuracy: predict 'same' when the squared distance is below the threshold."""
    predict = dist < threshold
    tp = np.sum(predict & same)
    tn = np.sum(~predict & ~same)
    return float(tp + tn) / dist.size


def _reference_verification(embeddings, issame, nfolds, flipped=None):
    """The insightface 10-fold protocol written out with loops (one threshold at a time)."""
    emb = embeddings.astype(np.float64)
    if flipped is not None:
        emb = emb + flipped.astype(np.float64)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    dist = np.sum((emb[0::2] - emb[1::2]) ** 2, axis=1)
    thresholds = np.arange(0, 4, 0.01)
    n = len(issame)
    folds, start = [], 0
    for f in range(nfolds):  # KFold(shuffle=False): the first n % nfolds folds are one longer
        size = n // nfolds + (1 if f < n % nfolds else 0)
        folds.append(np.arange(start, start + size))
        start += size
    accuracies, best_thresholds, ties = [], [], 0
    for f in range(nfolds):
        test = folds[f]
        train = np.concatenate([folds[g] for g in range(nfolds) if g != f])
        train_acc = [_reference_accuracy_at(t, dist[train], issame[train]) for t in thresholds]
        best = int(np.argmax(train_acc))
        ties += sum(a == train_acc[best] for a in train_acc) > 1
        best_thresholds.append(float(thresholds[best]))
        accuracies.append(_reference_accuracy_at(thresholds[best], dist[test], issame[test]))
    return float(np.mean(accuracies)), float(np.std(accuracies)), best_thresholds, ties


def _pairs(rng, n_pairs, dim=8, noise=0.9):
    """Pair embeddings with signal: 'same' pairs share an identity vector."""
    issame = rng.random(n_pairs) < 0.5
    emb = np.empty((2 * n_pairs, dim), np.float32)
    for k in range(n_pairs):
        a = rng.normal(size=dim)
        b = a if issame[k] else rng.normal(size=dim)
        emb[2 * k] = a + noise * rng.normal(size=dim)
        emb[2 * k + 1] = b + noise * rng.normal(size=dim)
    return emb, issame


# ------------------------------------------------------------------------------------ verification accuracy
def test_contiguous_folds_match_kfold_boundaries():
    # sklearn KFold(10).split(range(23)) test folds: sizes 3,3,3,2,2,2,2,2,2,2
    assert contiguous_folds(23, 10) == [(0, 3), (3, 6), (6, 9), (9, 11), (11, 13), (13, 15), (15, 17), (17, 19), (19, 21), (21, 23)]
    assert contiguous_folds(30, 10) == [(3 * i, 3 * i + 3) for i in range(10)]
    with pytest.raises(PipelineError):
        contiguous_folds(9, 10)


@pytest.mark.parametrize("n_pairs, with_flips", [(203, False), (157, True), (60, False)])
def test_verification_accuracy_equals_loop_reference(n_pairs, with_flips):
    rng = np.random.default_rng(n_pairs)
    emb, issame = _pairs(rng, n_pairs)
    flipped = (emb + 0.5 * rng.normal(size=emb.shape)).astype(np.float32) if with_flips else None
    result = verification_accuracy(emb, issame, folds=10, flipped=flipped)
    accuracy, std, thresholds, ties = _reference_verification(emb, issame, 10, flipped)
    assert ties > 0  # plateaus of equal train accuracy exist, so the first-maximum rule is exercised
    assert result["thresholds"] == thresholds
    assert result["accuracy"] == accuracy
    assert result["std"] == std
    assert 0.55 < accuracy < 1.0  # a meaningful, non-trivial case


def test_flips_are_summed_before_normalisation():
    rng = np.random.default_rng(1)
    emb, issame = _pairs(rng, 80)
    flipped = rng.normal(size=emb.shape).astype(np.float32) * 3
    with_flips = verification_accuracy(emb, issame, flipped=flipped)
    summed = verification_accuracy(emb.astype(np.float64) + flipped, issame)
    assert with_flips["thresholds"] == summed["thresholds"]
    assert with_flips["accuracy"] == summed["accuracy"]


def test_verification_rejects_mismatched_input():
    emb = np.ones((21, 4), np.float32)
    with pytest.raises(PipelineError, match="2 per pair"):
        verification_accuracy(emb, [True] * 10)
    with pytest.raises(PipelineError, match="flipped"):
        verification_accuracy(emb[:20], [True] * 10, flipped=emb[:10])


# --------------------------------------------------------------------------------------------------- ROC
def _brute_roc(scores, labels):
    """Counts at every distinct threshold (descending), by direct counting; origin first."""
    fps, tps, thresholds = [0], [0], [math.inf]
    for t in sorted(set(scores.tolist()), reverse=True):
        accepted = scores >= t
        tps.append(int(np.sum(accepted & labels)))
        fps.append(int(np.sum(accepted & ~labels)))
        thresholds.append(t)
    return fps, tps, thresholds


def _drop_collinear(fps, tps, thresholds):
    """Remove interior points (origin excluded, as sklearn does) lying on a straight segment with equal steps."""
    points = list(zip(fps[1:], tps[1:], thresholds[1:]))
    kept = [points[0]]
    for i in range(1, len(points) - 1):
        (f0, t0, _), (f1, t1, _), (f2, t2, _) = points[i - 1], points[i], points[i + 1]
        if not (f1 - f0 == f2 - f1 and t1 - t0 == t2 - t1):
            kept.append(points[i])
    kept.append(points[-1])
    return [0] + [p[0] for p in kept], [0] + [p[1] for p in kept], [math.inf] + [p[2] for p in kept]


def _tied_scores(rng, n=400, levels=25):
    """Half quantised scores (many ties, diagonal ROC steps), half continuous (runs of one-label steps)."""
    labels = rng.random(n) < 0.3
    quantised = (rng.integers(0, levels, n) + 6 * labels) / levels
    continuous = rng.normal(size=n) / 3 + 0.5 + labels
    scores = np.where(np.arange(n) % 2 == 0, quantised, continuous)
    return scores.astype(np.float32), labels


def test_roc_curve_known_example():
    # the example of sklearn's roc_curve documentation (positive class = 2)
    fpr, tpr, thr = roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.5, 0.5, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    # three negatives then a positive: the middle negative point is collinear and dropped by default-sklearn
    fpr, tpr, thr = roc_curve(np.array([4.0, 3.0, 2.0, 1.0]), np.array([0, 0, 0, 1]), drop_intermediate=True)
    np.testing.assert_array_equal(thr, [np.inf, 4.0, 2.0, 1.0])
    np.testing.assert_array_equal(fpr, [0.0, 1 / 3, 1.0, 1.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_curve_equals_brute_force_with_ties(seed):
    scores, labels = _tied_scores(np.random.default_rng(seed))
    fps, tps, thresholds = _brute_roc(scores, labels)
    fpr, tpr, thr = roc_curve(scores, labels)
    np.testing.assert_array_equal(fpr, np.array(fps) / fps[-1])
    np.testing.assert_array_equal(tpr, np.array(tps) / tps[-1])
    np.testing.assert_array_equal(thr, np.array(thresholds, dtype=np.float32))
    dropped = _drop_collinear(fps, tps, thresholds)
    assert len(dropped[0]) < len(fps)  # the case really has collinear points
    fpr, tpr, thr = roc_curve(scores, labels, drop_intermediate=True)
    np.testing.assert_array_equal(fpr, np.array(dropped[0]) / fps[-1])
    np.testing.assert_array_equal(tpr, np.array(dropped[1]) / tps[-1])
    np.testing.assert_array_equal(thr, np.array(dropped[2], dtype=np.float32))


def test_roc_curve_continuous_scores_and_int_labels():
    rng = np.random.default_rng(5)
    labels = (rng.random(300) < 0.5).astype(np.int64)
    scores = rng.normal(size=300) + labels
    fps, tps, _ = _brute_roc(scores, labels.astype(bool))
    fpr, tpr, _ = roc_curve(scores, labels)
    np.testing.assert_array_equal(fpr, np.array(fps) / fps[-1])
    np.testing.assert_array_equal(tpr, np.array(tps) / tps[-1])


def test_roc_rejects_bad_input():
    with pytest.raises(PipelineError, match="both positive and negative"):
        roc_curve(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(PipelineError, match="NaN"):
        roc_curve(np.array([0.1, np.nan]), np.array([1, 0]))
    with pytest.raises(PipelineError, match="0/1"):
        roc_curve(np.array([0.1, 0.2]), np.array([2, 0]))


# ------------------------------------------------------------------------------------------- TPR @ FPR
def _insightface_nearest(fps, tps, target):
    """eval_ijbc.py: flip the (default, dropped) curve, then min over (|fpr - x|, index) tuples."""
    fpr = np.flipud(np.array(fps) / fps[-1])
    tpr = np.flipud(np.array(tps) / tps[-1])
    _, index = min(zip(abs(fpr - target), range(len(fpr))))
    return float(tpr[index])


@pytest.mark.parametrize("seed", [3, 4])
def test_tpr_at_fpr_against_brute_force(seed):
    scores, labels = _tied_scores(np.random.default_rng(seed), n=600, levels=40)
    fps, tps, thresholds = _brute_roc(scores, labels)
    dropped = _drop_collinear(fps, tps, thresholds)
    levels = sorted(set(f / fps[-1] for f in fps))
    midpoints = [(a + b) / 2 for a, b in zip(levels[:-1], levels[1:])]  # (near-)ties between two FPRs
    targets = [0.0, 1e-3, 0.01, 0.05, 0.1, 0.3, 0.5, 1.0] + levels[1:8] + midpoints[:8]
    nearest = tpr_at_fpr(scores, labels, targets)
    exact = tpr_at_fpr(scores, labels, targets, method="exact")
    n_neg, n_pos = fps[-1], tps[-1]
    for target in targets:
        assert nearest[target] == _insightface_nearest(dropped[0], dropped[1], target)
        best = max(tp for fp, tp in zip(fps, tps) if fp / n_neg <= target)
        assert exact[target] == best / n_pos


def test_tpr_at_fpr_nearest_tie_prefers_the_later_point():
    # 4 negatives: FPR steps of 0.25; a target of 0.375 is exactly as near to 0.25 as to 0.5
    scores = np.array([10, 9, 8, 7, 6, 5, 4, 3], dtype=np.float64)
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    # curve: (0,0) (0,.25) (.25,.25) (.25,.5) (.5,.5) (.5,.75) (.75,.75) (.75,1) (1,1)
    assert tpr_at_fpr(scores, labels, [0.375]) == {0.375: 0.75}  # FPR 0.5, its highest TPR
    assert tpr_at_fpr(scores, labels, [0.375], method="exact") == {0.375: 0.5}
    with pytest.raises(PipelineError, match="method"):
        tpr_at_fpr(scores, labels, [0.1], method="interpolate")


# ----------------------------------------------------------------------------------------------- helpers
def test_downsample_roc_keeps_ends_and_stays_on_the_curve():
    rng = np.random.default_rng(7)
    labels = rng.random(60000) < 0.02
    scores = rng.normal(size=labels.size) + 2.5 * labels
    fpr, tpr, thr = roc_curve(scores.astype(np.float32), labels)
    keep = downsample_roc(fpr, tpr, thr, points=300)
    assert len(keep) <= 300
    assert np.all(np.diff(keep) > 0)
    first_positive = int(np.flatnonzero(fpr > 0)[0])
    assert first_positive in keep and (fpr.size - 1) in keep
    assert 0 not in keep  # the +inf origin is not written
    assert np.isfinite(thr[keep]).all()
    # log spacing: every decade of FPR between the smallest and 1 is represented
    for decade in range(int(np.floor(np.log10(fpr[first_positive]))) + 1, 0):
        assert np.any((fpr[keep] >= 10.0**decade) & (fpr[keep] < 10.0 ** (decade + 1)))


def test_fpr_key():
    assert [fpr_key(f) for f in (1e-1, 1e-4, 1e-6, 0.05, 2.5e-3)] == ["1e-1", "1e-4", "1e-6", "5e-2", "2.5e-3"]
