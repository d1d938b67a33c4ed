"""Exact similarity search over teacher embeddings: kNN, identity neighbours, top-M negative pairs and the
teacher's global FPR thresholds. Blockwise throughout: memory is bounded by `block_rows` (a few
block_rows x block_rows float32 buffers), never N x N.

Backends (`backend=`): "faiss" (faiss-gpu when it runs, else torch on CUDA, else faiss CPU), "torch"
(CUDA or CPU), "numpy", or "auto" (the fastest that runs). Pair scans use numpy on CPU and torch on CUDA.
All similarities are float32 inner products of the rows given: pass L2-normalised embeddings. "Exact"
means no approximation beyond the float32 rounding of each product (two backends may differ in the last
bit of a product; results agree wherever that cannot change the order).

Tie rules: kNN - similarity desc, then index asc. Top-M pairs - similarity desc, then i asc, then j asc
(original row indices, i < j). Thresholds are order statistics (values), so ties do not matter there.

The pieces (this package): `backends` (engines), `layout` (label-sorted blocks), `select` (exact order
statistics), `thresholds`, `pairs`, `knn`.
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError
from pipeline.search.backends import BACKENDS, check_rows, scan_engine
from pipeline.search.knn import clamp, class_centres, identity_neighbours, knn_ip
from pipeline.search.layout import PairLayout
from pipeline.search.pairs import TopPairs, rank_pairs
from pipeline.search.thresholds import (
    DEFAULT_FPRS,
    exact_thresholds,
    pair_counts,
    positive_tpr,
    run_scan,
    threshold_ranks,
)

__all__ = [
    "BACKENDS", "DEFAULT_FPRS", "class_centres", "identity_neighbours", "knn_ip",
    "negative_statistics", "negative_thresholds", "rank_pairs", "sample_rows", "top_negative_pairs",
]


def sample_rows(n: int, sample: int | None, seed: int = 0) -> np.ndarray | None:
    """Sorted uniform sample of `sample` distinct rows (without replacement, numpy default_rng(seed));
    None when no sampling is asked for or `sample` >= n."""
    if sample is None or sample >= n:
        return None
    if sample < 2:
        raise PipelineError(f"sample must be >= 2 rows, got {sample}")
    return np.sort(np.random.default_rng(seed).choice(n, int(sample), replace=False)).astype(np.int64)


def top_negative_pairs(emb: np.ndarray, labels: np.ndarray, m: int, backend: str = "auto",
                       block_rows: int = 4096, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The global top-M most similar pairs with different labels, exact: (pairs (M, 2) int64, i < j,
    sims (M,) float32), ordered by sim desc, i asc, j asc. M larger than possible is clamped (warning)."""
    layout = PairLayout.build(check_rows(emb), labels)
    consumer = TopPairs(clamp(int(m), layout.n_neg, "m"), layout)
    engine = scan_engine(backend)
    run_scan(layout, engine, block_rows, [consumer], progress, "top pairs")
    return consumer.result()


def negative_thresholds(emb: np.ndarray, labels: np.ndarray, fprs=DEFAULT_FPRS, sample: int | None = None,
                        seed: int = 0, backend: str = "auto", block_rows: int = 4096, pilot_rows: int = 4096,
                        progress: bool = False) -> dict:
    """The teacher's exact thresholds over ALL negative pairs i < j and its TPR at each.

    threshold(f): element floor(f * n) (0-based, floor taken on the decimal value of f) of the n negative
    similarities sorted descending. tpr(f): fraction of positive pairs with similarity > threshold(f).
    `sample`: use a uniform subsample of that many rows (`sample_rows(N, sample, seed)`) instead of all N.
    Returns {"thresholds": {"1e-1": t, ...}, "tpr": {...}, "ranks": {...}, "counts": {...}, "method": {...}}.
    """
    return negative_statistics(emb, labels, 0, fprs=fprs, sample=sample, seed=seed, backend=backend,
                               block_rows=block_rows, pilot_rows=pilot_rows, progress=progress)[0]


def negative_statistics(emb: np.ndarray, labels: np.ndarray, m: int, fprs=DEFAULT_FPRS,
                        sample: int | None = None, seed: int = 0, backend: str = "auto", block_rows: int = 4096,
                        pilot_rows: int = 4096, progress: bool = False,
                        checkpoint=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Thresholds (as `negative_thresholds`) and the top-M negative pairs (as `top_negative_pairs`, on the
    same rows) sharing their scans; `checkpoint` (search/checkpoint.ScanCheckpoint) makes the scans
    resumable. Returns (thresholds result, pairs, sims); pairs index the input rows."""
    emb = check_rows(emb)
    labels = np.asarray(labels).reshape(-1)
    n_total = emb.shape[0]
    rows = sample_rows(n_total, sample, seed)
    if rows is not None:
        emb, labels = emb[rows], labels[rows]
    layout = PairLayout.build(emb, labels)
    ranks = threshold_ranks(fprs, layout.n_neg)
    engine = scan_engine(backend)
    pairs = TopPairs(clamp(int(m), layout.n_neg, "m"), layout)
    values, method = exact_thresholds(layout, engine, ranks, block_rows, pilot_rows, seed, progress,
                                      ride_along=(pairs,) if pairs.m else (), checkpoint=checkpoint)
    top, sims = pairs.result()
    if rows is not None:
        top = rows[top]
    counts = pair_counts(layout, n_total)
    counts["sampled"] = int(rows is not None)
    result = {
        "thresholds": values,
        "tpr": positive_tpr(layout, engine, values, block_rows),
        "ranks": ranks,
        "counts": counts,
        "method": method,
    }
    return result, top, sims
