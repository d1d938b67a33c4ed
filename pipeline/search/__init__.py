"""Exact similarity search over teacher embeddings and the pools built from it.

Engines (backends), label-sorted blockwise pair scans (layout), exact order statistics (select), FPR
thresholds (thresholds), top-M pairs (pairs), kNN and class centres (knn), the public entry points
(statistics) and `pools.h5` / `thresholds.json` (pools).

Deliberately empty: import from the defining module, so importing one piece does not import them all.
"""
