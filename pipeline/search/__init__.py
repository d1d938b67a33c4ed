"""Exact similarity search over teacher embeddings and the pools built from it.

Engines (backends), label-sorted blockwise pair scans (layout), exact order statistics (select), FPR
thresholds (thresholds), top-M pairs (pairs), kNN and class centres (knn), the public entry points
(statistics) and `pools.h5` / `thresholds.json` (pools).
"""
from pipeline.search.pools import (
                                        PoolResults,
                                        build_pools,
                                        load_pools,
                                        load_thresholds,
                                        write_pools,
)
from pipeline.search.statistics import (
                                        BACKENDS,
                                        DEFAULT_FPRS,
                                        class_centres,
                                        identity_neighbours,
                                        knn_ip,
                                        negative_statistics,
                                        negative_thresholds,
                                        sample_rows,
                                        top_negative_pairs,
)

__all__ = [
    "BACKENDS", "DEFAULT_FPRS", "PoolResults", "build_pools", "class_centres", "identity_neighbours", "knn_ip",
    "load_pools", "load_thresholds", "negative_statistics", "negative_thresholds", "sample_rows",
    "top_negative_pairs", "write_pools",
]
