"""Exact inner-product kNN (faiss / torch / numpy), class centres and identity neighbours.

Result order and tie rule: similarity descending, then base index ascending. Backends return the top
k+1 candidates in any tie order; the (k+1)-th tells whether the k-th place is contested: if the k-th and
(k+1)-th similarities are equal, that query row is recomputed exactly with a stable sort, otherwise the
top-k set is unique and only needs sorting. Similarities are each backend's float32 products of the rows
as given (pass L2-normalised rows for cosine similarity).
"""
from __future__ import annotations

import logging

import numpy as np

from pipeline.errors import DataError, PipelineError
from pipeline.search.backends import check_rows, knn_kind

log = logging.getLogger("pipeline.search")


def clamp(requested: int, possible: int, what: str) -> int:
    """min(requested, possible), logging a warning that says so when it clamps."""
    if requested < 0:
        raise PipelineError(f"{what} must be >= 0, got {requested}")
    if requested > possible:
        log.warning("%s=%d is more than possible (%d); using %d", what, requested, possible, possible)
        return possible
    return requested


def knn_ip(queries: np.ndarray, base: np.ndarray, k: int, exclude: str | None = None,
           backend: str = "auto", block_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest base rows by inner product for every query: (sims (Q, k) float32, idx (Q, k) int64).

    exclude="self": queries are the base rows themselves (query q never returns base q). k larger than
    possible is clamped with a warning.
    """
    q = check_rows(queries, "queries")
    b = check_rows(base, "base")
    if q.shape[1] != b.shape[1]:
        raise PipelineError(f"queries have dimension {q.shape[1]} but base rows {b.shape[1]}")
    if exclude not in (None, "self"):
        raise PipelineError(f"exclude must be None or 'self', got {exclude!r}")
    self_excluded = exclude == "self"
    if self_excluded and q.shape[0] != b.shape[0]:
        raise PipelineError(f"exclude='self' needs queries == base, got {q.shape[0]} and {b.shape[0]} rows")
    k = clamp(int(k), b.shape[0] - int(self_excluded), "k")
    if k == 0 or q.shape[0] == 0:
        return np.empty((q.shape[0], k), np.float32), np.empty((q.shape[0], k), np.int64)
    wanted = min(k + 1, b.shape[0] - int(self_excluded))  # one more, to see whether place k is contested
    kind = knn_kind(backend)
    sims, idx = _CANDIDATES[kind.split("-")[0]](q, b, wanted, self_excluded, block_rows, kind)
    return _finalise(sims, idx, k, q, b, self_excluded, block_rows)


def _finalise(sims, idx, k, q, b, self_excluded, block_rows):
    order = np.lexsort((idx, -sims), axis=1)
    sims = np.take_along_axis(sims, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    contested = np.flatnonzero(sims[:, k - 1] == sims[:, k]) if sims.shape[1] > k else np.empty(0, np.int64)
    sims, idx = np.ascontiguousarray(sims[:, :k]), np.ascontiguousarray(idx[:, :k]).astype(np.int64)
    step = max(1, min(block_rows, (1 << 26) // b.shape[0]))  # rows x N products per recomputation
    for start in range(0, contested.size, step):
        rows = contested[start : start + step]
        exact = q[rows] @ b.T
        if self_excluded:
            exact[np.arange(rows.size), rows] = -np.inf
        best = np.argsort(-exact, axis=1, kind="stable")[:, :k]  # stable: equal sims keep index order
        sims[rows], idx[rows] = np.take_along_axis(exact, best, axis=1), best
    return sims, idx


def _numpy_candidates(q, b, wanted, self_excluded, block_rows, kind):
    out_s = np.empty((q.shape[0], wanted), np.float32)
    out_i = np.empty((q.shape[0], wanted), np.int64)
    for q0 in range(0, q.shape[0], block_rows):
        q1 = min(q0 + block_rows, q.shape[0])
        best_s = np.full((q1 - q0, 0), -np.inf, np.float32)
        best_i = np.empty((q1 - q0, 0), np.int64)
        for b0 in range(0, b.shape[0], block_rows):
            b1 = min(b0 + block_rows, b.shape[0])
            s = q[q0:q1] @ b[b0:b1].T
            if self_excluded:
                _mask_self(s, q0, q1, b0, b1)
            cand_s = np.concatenate([best_s, s], axis=1)
            cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(b0, b1), s.shape)], axis=1)
            if cand_s.shape[1] > wanted:
                top = np.argpartition(-cand_s, wanted - 1, axis=1)[:, :wanted]
                cand_s = np.take_along_axis(cand_s, top, axis=1)
                cand_i = np.take_along_axis(cand_i, top, axis=1)
            best_s, best_i = cand_s, cand_i
        out_s[q0:q1], out_i[q0:q1] = best_s, best_i
    return out_s, out_i


def _mask_self(s, q0, q1, b0, b1):
    lo, hi = max(q0, b0), min(q1, b1)
    if lo < hi:
        diag = np.arange(lo, hi)
        s[diag - q0, diag - b0] = -np.inf


def _torch_candidates(q, b, wanted, self_excluded, block_rows, kind):
    import torch

    device = torch.device("cuda" if kind == "torch-cuda" else "cpu")
    base = torch.from_numpy(b).to(device)
    out_s = np.empty((q.shape[0], wanted), np.float32)
    out_i = np.empty((q.shape[0], wanted), np.int64)
    for q0 in range(0, q.shape[0], block_rows):
        q1 = min(q0 + block_rows, q.shape[0])
        queries = torch.from_numpy(q[q0:q1]).to(device)
        best_s = torch.empty((q1 - q0, 0), device=device)
        best_i = torch.empty((q1 - q0, 0), dtype=torch.int64, device=device)
        for b0 in range(0, b.shape[0], block_rows):
            b1 = min(b0 + block_rows, b.shape[0])
            s = _exact_mm(torch, queries, base[b0:b1])
            if self_excluded:
                lo, hi = max(q0, b0), min(q1, b1)
                if lo < hi:
                    diag = torch.arange(lo, hi, device=device)
                    s[diag - q0, diag - b0] = float("-inf")
            cand_s = torch.cat([best_s, s], dim=1)
            cand_i = torch.cat([best_i, torch.arange(b0, b1, device=device).expand(q1 - q0, -1)], dim=1)
            top_s, top = torch.topk(cand_s, min(wanted, cand_s.shape[1]), dim=1)
            best_s, best_i = top_s, torch.gather(cand_i, 1, top)
        out_s[q0:q1], out_i[q0:q1] = best_s.cpu().numpy(), best_i.cpu().numpy()
    return out_s, out_i


def _exact_mm(torch, a, b):
    if a.device.type == "cuda":
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would not be float32 similarities
        try:
            return a @ b.T
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return a @ b.T


def _faiss_candidates(q, b, wanted, self_excluded, block_rows, kind):
    import faiss

    extra = int(self_excluded)  # the query itself may take one place: ask for one more, then drop it
    fetch = min(wanted + extra, b.shape[0])
    resources = faiss.StandardGpuResources() if kind == "faiss-gpu" else None
    out_s = np.empty((q.shape[0], wanted), np.float32)
    out_i = np.empty((q.shape[0], wanted), np.int64)
    for q0 in range(0, q.shape[0], block_rows):
        q1 = min(q0 + block_rows, q.shape[0])
        if resources is not None:
            s, i = faiss.knn_gpu(resources, q[q0:q1], b, fetch, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            s, i = faiss.knn(q[q0:q1], b, fetch, metric=faiss.METRIC_INNER_PRODUCT)
        if np.any(i < 0):
            raise RuntimeError("faiss returned fewer neighbours than requested")
        if self_excluded:
            s, i = _drop_self(s, i, np.arange(q0, q1), wanted)
        out_s[q0:q1], out_i[q0:q1] = s[:, :wanted], i[:, :wanted]
    return out_s, out_i


def _drop_self(s, i, query_ids, wanted):
    """Remove each row's own index (or, when absent, its last candidate), keeping `wanted` per row."""
    drop = i == query_ids[:, None]
    no_self = ~drop.any(axis=1)
    drop[no_self, -1] = True
    keep = ~drop
    return s[keep].reshape(s.shape[0], -1)[:, :wanted], i[keep].reshape(i.shape[0], -1)[:, :wanted]


_CANDIDATES = {"numpy": _numpy_candidates, "torch": _torch_candidates, "faiss": _faiss_candidates}


def class_centres(emb_normalised: np.ndarray, labels: np.ndarray, num_classes: int,
                  chunk_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(centres (C, D) float32, sizes (C,) int64): per identity the mean of its L2-normalised embeddings
    (all views when given (N, V, D)), re-normalised. Empty classes (sizes == 0) get zero rows."""
    emb = np.asarray(emb_normalised)
    labels = np.asarray(labels).reshape(-1)
    if emb.ndim not in (2, 3) or emb.shape[0] != labels.size:
        raise PipelineError(f"centres: embeddings {emb.shape} do not match {labels.size} labels")
    sums = np.zeros((num_classes, emb.shape[-1]), np.float64)
    sizes = np.zeros(num_classes, np.int64)
    for start in range(0, labels.size, chunk_rows):
        accumulate_centres(sums, sizes, emb[start : start + chunk_rows], labels[start : start + chunk_rows])
    return normalise_centres(sums), sizes


def accumulate_centres(sums: np.ndarray, sizes: np.ndarray, emb: np.ndarray, labels: np.ndarray) -> None:
    """Add a chunk's embeddings (N, D) or (N, V, D) to per-class float64 sums and its images to sizes."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    num_classes = sums.shape[0]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        row = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
        raise DataError(f"labels: row {row} of the chunk has identity {labels[row]} outside [0, {num_classes})")
    rows = np.asarray(emb, np.float64)
    if rows.ndim == 3:
        rows = rows.sum(axis=1)
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    if ordered.size:
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        sums[ordered[starts]] += np.add.reduceat(rows[order], starts, axis=0)
    sizes += np.bincount(labels, minlength=num_classes)


def normalise_centres(sums: np.ndarray) -> np.ndarray:
    """Unit-length float32 centres from class sums (zero rows stay zero)."""
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0).astype(np.float32)


def identity_neighbours(centres: np.ndarray, k: int, sizes: np.ndarray | None = None, backend: str = "auto",
                        block_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Each identity's k nearest other identities by centre similarity: (neighbours (C, k) int64,
    sims (C, k) float32), order and ties as `knn_ip`. Empty identities (size 0 or zero centre) are never
    neighbours and get -1 / NaN rows. k is clamped (with a warning) to the non-empty identities - 1."""
    centres = check_rows(centres, "centres")
    present = np.linalg.norm(centres, axis=1) > 0
    if sizes is not None:
        present &= np.asarray(sizes).reshape(-1) > 0
    ids = np.flatnonzero(present)
    k = clamp(int(k), max(ids.size - 1, 0), "k")
    neighbours = np.full((centres.shape[0], k), -1, np.int64)
    sims = np.full((centres.shape[0], k), np.nan, np.float32)
    if k and ids.size:
        s, idx = knn_ip(centres[ids], centres[ids], k, exclude="self", backend=backend, block_rows=block_rows)
        neighbours[ids], sims[ids] = ids[idx], s
    return neighbours, sims
