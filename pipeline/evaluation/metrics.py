"""Face-verification metrics in plain numpy: LFW-style 10-fold accuracy, ROC, TPR at fixed FPR.

`verification_accuracy` reproduces insightface's `eval/verification.py` (arcface_torch) bit for bit, without
sklearn: flip-sum then L2-normalise in float64, squared-L2 distance, thresholds `np.arange(0, 4, 0.01)`,
contiguous (unshuffled KFold) folds, the first best threshold on the other folds, accuracy on the held-out one.

`roc_curve` follows `sklearn.metrics.roc_curve` (higher score = more likely positive) and `tpr_at_fpr` the
insightface IJB table convention. Both handle tens of millions of scores: one value sort of all scores plus
one of the positives, no argsort, no Python loop over thresholds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from pipeline.errors import PipelineError
from pipeline.settings import Choice

VERIFICATION_THRESHOLDS = np.arange(0, 4, 0.01)  # squared-L2 distances between unit vectors lie in [0, 4]


class TprMethod(Choice):
    """How TPR@FPR is read off a ROC curve (see `tpr_at_fpr`)."""

    nearest = "nearest"
    exact = "exact"


def contiguous_folds(n: int, folds: int) -> list[tuple[int, int]]:
    """`(start, stop)` of each fold of `range(n)`, as sklearn's KFold without shuffling splits it:
    the first `n % folds` folds hold one extra element."""
    if folds < 2 or n < folds:
        raise PipelineError(f"cannot split {n} pairs into {folds} folds (need 2 <= folds <= pairs)")
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    stops = np.cumsum(sizes)
    return [(int(stop - size), int(stop)) for size, stop in zip(sizes, stops)]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm in float64 (all-zero rows stay zero), computed like
    sklearn.preprocessing.normalize so that distances match insightface's evaluation exactly."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0.0] = 1.0
    return x / norms[:, None]


def _count_below(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many values are strictly below each threshold (the `dist < threshold` decision)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def verification_accuracy(
    embeddings: np.ndarray,
    issame: Sequence[bool] | np.ndarray,
    folds: int = 10,
    flipped: np.ndarray | None = None,
) -> dict:
    """Accuracy of pair verification with a threshold tuned by cross-validation (insightface protocol).

    `embeddings` holds the two members of pair k in rows 2k and 2k+1; `flipped`, when given, the embeddings
    of the horizontally flipped images, added to the originals before normalisation. Returns
    `{"accuracy": mean over folds, "std": population std over folds, "thresholds": best squared-L2
    threshold of each fold, "fold_accuracy": per-fold accuracy}`.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    if emb.ndim != 2 or emb.shape[0] != 2 * same.size:
        raise PipelineError(
            f"verification: expected {2 * same.size} embeddings (2 per pair) in 2-D, got shape {emb.shape}"
        )
    if flipped is not None:
        flip = np.asarray(flipped, dtype=np.float64)
        if flip.shape != emb.shape:
            raise PipelineError(f"verification: flipped embeddings have shape {flip.shape}, expected {emb.shape}")
        emb = emb + flip
    if not np.isfinite(emb).all():
        raise PipelineError("verification: embeddings contain NaN or infinity")
    emb = l2_normalize(emb)
    dist = np.sum(np.square(emb[0::2] - emb[1::2]), 1)

    bounds = contiguous_folds(same.size, folds)
    thresholds = VERIFICATION_THRESHOLDS
    # per fold and threshold: positives / negatives predicted "same" (distance below the threshold)
    tp = np.stack([_count_below(np.sort(dist[a:b][same[a:b]]), thresholds) for a, b in bounds])
    fp = np.stack([_count_below(np.sort(dist[a:b][~same[a:b]]), thresholds) for a, b in bounds])
    n_neg = np.array([np.count_nonzero(~same[a:b]) for a, b in bounds])
    sizes = np.array([b - a for a, b in bounds])

    fold_accuracy = np.zeros(folds)
    best_thresholds = []
    for f in range(folds):
        # correct decisions on the other folds; one denominator for all thresholds, so counts rank like
        # accuracies and argmax picks the same (first) best threshold
        train_correct = (tp.sum(0) - tp[f]) + ((n_neg.sum() - n_neg[f]) - (fp.sum(0) - fp[f]))
        best = int(np.argmax(train_correct))
        best_thresholds.append(float(thresholds[best]))
        fold_accuracy[f] = (tp[f, best] + n_neg[f] - fp[f, best]) / sizes[f]
    return {
        "accuracy": float(np.mean(fold_accuracy)),
        "std": float(np.std(fold_accuracy)),
        "thresholds": best_thresholds,
        "fold_accuracy": fold_accuracy.tolist(),
    }


def _check_scores(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise PipelineError(f"ROC: scores {scores.shape} and labels {labels.shape} must be 1-D of the same length")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            raise PipelineError("ROC: labels must be 0/1 or boolean")
        labels = labels.astype(bool)
    return scores, labels


def _nearest_index(fpr: np.ndarray, target: float) -> int:
    """insightface eval_ijbc: the ROC point whose FPR is nearest the target; among equally near points the
    one latest in the curve (it flips the curve and takes the first minimum), i.e. the highest TPR.

    `fpr` is non-decreasing, so the nearest value is the last one below the target or the first one at or
    above it; no pass over the whole curve is needed."""
    above = int(np.searchsorted(fpr, target, side="left"))
    if above == fpr.size:
        return above - 1
    last_of_above = int(np.searchsorted(fpr, fpr[above], side="right")) - 1
    if above == 0 or abs(fpr[above] - target) <= abs(fpr[above - 1] - target):
        return last_of_above
    return above - 1


@dataclass(frozen=True)
class Roc:
    """Integer ROC counts at every distinct score, highest first: a point accepts scores >= its threshold.

    `fps[i]`, `tps[i]`: negatives / positives with score >= `thresholds[i]` (the (0, 0) origin excluded).
    """

    fps: np.ndarray
    tps: np.ndarray
    thresholds: np.ndarray

    @classmethod
    def from_pos_neg(cls, positive_scores, negative_scores) -> "Roc":
        """Counts from the scores of positive and negative pairs: one value sort of all scores and one of the
        positives (no argsort, so tens of millions of float32 scores stay cheap)."""
        pos = np.asarray(positive_scores).reshape(-1)
        neg = np.asarray(negative_scores).reshape(-1)
        if pos.size == 0 or neg.size == 0:
            raise PipelineError(f"ROC: need both positive and negative pairs, got {pos.size} and {neg.size}")
        ascending = np.sort(np.concatenate([pos, neg]))
        if not (np.isfinite(ascending[0]) and np.isfinite(ascending[-1])):  # NaN sorts last
            raise PipelineError("ROC: scores contain NaN or infinity")
        run_starts = np.flatnonzero(np.r_[True, ascending[1:] != ascending[:-1]])
        values = ascending[run_starts]
        del ascending
        accepted = pos.size + neg.size - run_starts  # scores >= each distinct value
        tps = pos.size - np.searchsorted(np.sort(pos), values, side="left").astype(np.int64)
        return cls(fps=(accepted - tps)[::-1], tps=tps[::-1], thresholds=values[::-1])

    @classmethod
    def from_scores(cls, scores, labels) -> "Roc":
        """Counts from scores and 0/1 (or boolean) labels, 1 = positive pair."""
        scores, labels = _check_scores(scores, labels)
        return cls.from_pos_neg(scores[labels], scores[~labels])

    def curve(self, drop_intermediate: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(fpr, tpr, thresholds)` with the (0, 0) origin at threshold +inf prepended."""
        fps, tps, thresholds = self.fps, self.tps, self.thresholds
        if drop_intermediate and fps.size > 2:
            corner = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
            keep = np.flatnonzero(corner)
            fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
        fps = np.r_[0, fps]
        tps = np.r_[0, tps]
        thresholds = np.r_[np.array([np.inf], dtype=thresholds.dtype), thresholds]
        return fps / fps[-1], tps / tps[-1], thresholds

    def tpr_at(self, fprs: Iterable[float], method: str = "nearest") -> dict[float, float]:
        """See `tpr_at_fpr`."""
        targets = [float(f) for f in fprs]
        if any(not (0.0 <= f <= 1.0) for f in targets):
            raise PipelineError(f"target FPRs must lie in [0, 1], got {targets}")
        if method == "nearest":
            fpr, tpr, _ = self.curve(drop_intermediate=True)
            return {f: float(tpr[_nearest_index(fpr, f)]) for f in targets}
        if method == "exact":
            fpr, tpr, _ = self.curve()
            return {f: float(tpr[np.searchsorted(fpr, f, side="right") - 1]) for f in targets}
        raise PipelineError(f"unknown TPR@FPR method {method!r} (use {' or '.join(TprMethod.values())})")


def roc_curve(scores, labels, drop_intermediate: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(fpr, tpr, thresholds)` exactly as `sklearn.metrics.roc_curve(labels, scores, drop_intermediate=...)`
    (sklearn >= 1.3): one point per distinct score, thresholds descending, a point accepts scores >= its
    threshold; the first point is (0, 0) with threshold `+inf` (older sklearn used max score + 1).
    `drop_intermediate=True` removes the collinear points that sklearn removes by default (the curve
    insightface's IJB evaluation reads)."""
    return Roc.from_scores(scores, labels).curve(drop_intermediate)


def tpr_at_fpr(scores, labels, fprs: Iterable[float], method: str = "nearest") -> dict[float, float]:
    """`{target_fpr: tpr}` for each target.

    `method="nearest"`: the insightface IJB convention (eval_ijbc.py: sklearn's default ROC, intermediate
    points dropped, the point with the nearest FPR, ties to the later point = higher TPR).
    `method="exact"`: the highest TPR among all ROC points whose FPR does not exceed the target.
    """
    return Roc.from_scores(scores, labels).tpr_at(fprs, method)


def downsample_roc(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray, points: int = 2000) -> np.ndarray:
    """Indices of at most ~`points` ROC points, log-spaced in FPR, for plotting.

    Keeps the highest-TPR point at FPR 0 (unless it is the threshold=+inf origin), the first point above
    FPR 0 (the low-FPR end) and the final (1, 1) point; in between, for each log-spaced FPR level the
    highest-TPR point not beyond it."""
    positive = np.flatnonzero(fpr > 0)
    first = int(positive[0])
    levels = np.logspace(math.log10(fpr[first]), 0.0, max(points - 3, 2))
    chosen = np.searchsorted(fpr, levels, side="right") - 1
    keep = np.unique(np.r_[first - 1, first, chosen, fpr.size - 1])
    return keep[np.isfinite(thresholds[keep])]
