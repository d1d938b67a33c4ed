"""Benchmark: exact global FPR thresholds relative to the cheapest possible exact pass, and faiss kNN
relative to a plain numpy blockwise kNN.

Data: N random clustered float32 embeddings (D = 512, ~100 images per identity, labels grouped like a
RecordIO training set), L2-normalised. Measured in the same run, same engine and block size:
  one_pass_s   - every block pair i <= j multiplied once, nothing else: the lower bound of any exact
                 method that looks at every negative similarity;
  thresholds_s - `negative_thresholds` (1e-1 .. 1e-6, exact, including its pilot and the TPR pass);
  thresholds_over_one_pass = thresholds_s / one_pass_s (target <= 1.5);
  knn: `knn_ip(backend="faiss")` vs numpy blockwise matmul + argpartition, `--knn` queries against
  `--knn` base rows, k = 32: knn_speedup = numpy_s / faiss_s.
With --repeats R the two timings alternate R times and the best of each is kept (shared machines).
`exact_check` (only when N <= 30000): thresholds equal a full sort of every negative similarity.

    python benchmarks/pools.py                # N = 200000 (minutes on 2 cores)
    python benchmarks/pools.py --n 50000      # quick

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from arguments import integer, non_negative_int, positive_int, run_main

from pipeline.fpr import fpr_key
from pipeline.machine.resources import require_memory
from pipeline.search.backends import BACKENDS, scan_engine
from pipeline.search.layout import block_pairs
from pipeline.search.select import fpr_rank
from pipeline.search.statistics import (
    DEFAULT_FPRS,
    knn_ip,
    negative_thresholds,
)


K = 32  # neighbours of the kNN comparison


def clustered_embeddings(n: int, dim: int, per_identity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Identity centres on the sphere plus per-image noise (same-identity cosine ~0.5, others ~0)."""
    rng = np.random.default_rng(seed)
    identities = max(2, n // per_identity)
    labels = np.sort(rng.integers(0, identities, n))
    centres = rng.standard_normal((identities, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[labels] + rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32), labels.astype(np.int64)


def one_pass_seconds(x: np.ndarray, block_rows: int, backend: str) -> float:
    engine = scan_engine(backend)
    emb = engine.put(x)
    started = time.perf_counter()
    for r0, r1, c0, c1 in block_pairs(x.shape[0], block_rows):
        engine.sims(emb[r0:r1], emb[c0:c1])
    return time.perf_counter() - started


def numpy_knn(q: np.ndarray, b: np.ndarray, k: int, block_rows: int) -> np.ndarray:
    """Baseline: blockwise matmul, argpartition per block, merge; returns indices (unsorted)."""
    best_s = np.full((q.shape[0], 0), -np.inf, np.float32)
    best_i = np.empty((q.shape[0], 0), np.int64)
    for b0 in range(0, b.shape[0], block_rows):
        s = np.concatenate([best_s, q @ b[b0 : b0 + block_rows].T], axis=1)
        ids = np.concatenate([best_i, np.broadcast_to(np.arange(b0, b0 + s.shape[1] - best_s.shape[1]),
                                                      (q.shape[0], s.shape[1] - best_s.shape[1]))], axis=1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, top, axis=1), np.take_along_axis(ids, top, axis=1)
    return best_i


EXACT_CHECK_N = 30_000  # up to here the thresholds are also checked against a brute-force sort of every pair


def exact_reference(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    s = x @ x.T
    i, j = np.triu_indices(x.shape[0], 1)
    negatives = np.sort(s[i, j][labels[i] != labels[j]])[::-1]
    return {fpr_key(f): float(negatives[fpr_rank(f, negatives.size)]) for f in DEFAULT_FPRS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=integer(K), default=200_000, help=f"embeddings (at least {K}, the kNN's k)")
    parser.add_argument("--dim", type=positive_int, default=512)
    parser.add_argument("--per-identity", type=positive_int, default=100)
    parser.add_argument("--block-rows", type=positive_int, default=4096)
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--knn", type=integer(K), default=20_000, help=f"kNN queries (at least {K}, its k)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--repeats", type=positive_int, default=1)
    args = parser.parse_args()
    # the embeddings, the noise drawn for them and the search engine's copy; up to EXACT_CHECK_N also the exact
    # reference: the n x n similarities, their upper triangle's indices and values, the sorted negatives
    exact = args.n <= EXACT_CHECK_N
    require_memory(f"--n {args.n} with --dim {args.dim}" + (" (and the exact check, n <= 30000)" if exact else ""),
                   3 * args.n * args.dim * 4 + (19 * args.n**2 if exact else 0))

    x, labels = clustered_embeddings(args.n, args.dim, args.per_identity, args.seed)
    one_pass, thresholds_s = [], []
    for _ in range(args.repeats):  # interleaved; the best of each is the least disturbed by other load
        one_pass.append(one_pass_seconds(x, args.block_rows, args.backend))
        started = time.perf_counter()
        result = negative_thresholds(x, labels, backend=args.backend, block_rows=args.block_rows)
        thresholds_s.append(time.perf_counter() - started)
    one_pass, thresholds_s = min(one_pass), min(thresholds_s)

    q = x[: args.knn]
    started = time.perf_counter()
    faiss_idx = knn_ip(q, q, K, backend="faiss", block_rows=args.block_rows)[1]
    faiss_s = time.perf_counter() - started
    started = time.perf_counter()
    numpy_idx = numpy_knn(q, q, K, args.block_rows)
    numpy_s = time.perf_counter() - started
    same_sets = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(faiss_idx[:1000], numpy_idx[:1000])]))

    line = {
        "n": args.n, "dim": args.dim, "block_rows": args.block_rows, "engine": result["method"]["engine"],
        "thresholds_over_one_pass": round(thresholds_s / one_pass, 3),
        "one_pass_s": round(one_pass, 3), "thresholds_s": round(thresholds_s, 3),
        "scans": result["method"]["scans"], "pilot_misses": result["method"]["pilot_misses"],
        "n_neg": result["counts"]["n_neg"],
        "knn_n": int(q.shape[0]), "knn_speedup": round(numpy_s / faiss_s, 3),
        "knn_faiss_s": round(faiss_s, 3), "knn_numpy_s": round(numpy_s, 3), "knn_same_sets": same_sets,
        "thresholds": result["thresholds"],
    }
    if exact:
        line["exact_check"] = exact_reference(x, labels) == result["thresholds"]
    print(json.dumps(line))


if __name__ == "__main__":
    run_main(main)
