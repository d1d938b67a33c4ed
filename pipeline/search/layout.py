"""Rows grouped by identity, and the blockwise scan over every image pair i < j.

Sorting rows by label makes each identity one contiguous run, so the positive (same-identity) pairs of a
block pair are a handful of rectangles that can be masked in O(positives) instead of comparing labels for
every entry. Only `block_rows` x `block_rows` similarities exist at any time; nothing N x N.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pipeline.errors import PipelineError
from pipeline.progress import progress_bar


@dataclass
class PairLayout:
    """Label-sorted rows: `emb[p]` is original row `order[p]`; identity runs are [starts[r], ends[r])."""

    emb: np.ndarray
    order: np.ndarray
    labels: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def build(cls, emb: np.ndarray, labels: np.ndarray) -> "PairLayout":
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != emb.shape[0]:
            raise PipelineError(f"{emb.shape[0]} embedding rows but {labels.shape[0]} labels")
        labels = labels.astype(np.int64, copy=False)
        if labels.size and np.all(labels[1:] >= labels[:-1]):
            order = np.arange(labels.size, dtype=np.int64)  # already grouped: no copy of the embeddings
        else:
            order = np.argsort(labels, kind="stable").astype(np.int64)
            emb, labels = emb[order], labels[order]
        change = np.flatnonzero(labels[1:] != labels[:-1]) + 1
        starts = np.concatenate([[0], change]).astype(np.int64) if labels.size else np.empty(0, np.int64)
        ends = np.concatenate([change, [labels.size]]).astype(np.int64) if labels.size else np.empty(0, np.int64)
        return cls(np.ascontiguousarray(emb), order, labels, starts, ends)

    @property
    def n(self) -> int:
        return int(self.emb.shape[0])

    @property
    def run_sizes(self) -> np.ndarray:
        return self.ends - self.starts

    @property
    def n_pos(self) -> int:
        sizes = self.run_sizes
        return int(np.sum(sizes * (sizes - 1) // 2))

    @property
    def n_neg(self) -> int:
        return self.n * (self.n - 1) // 2 - self.n_pos

    def positive_rects(self, r0: int, r1: int, c0: int, c1: int) -> Iterator[tuple[slice, slice]]:
        """Same-identity rectangles of block rows [r0, r1) x cols [c0, c1) (requires r0 <= c0)."""
        # A run meets both ranges iff it starts before min(r1, c1) and ends after c0 (>= r0).
        first = int(np.searchsorted(self.ends, c0, side="right"))
        last = int(np.searchsorted(self.starts, min(r1, c1), side="left"))
        for run in range(first, last):
            s, e = int(self.starts[run]), int(self.ends[run])
            rows = slice(max(s, r0) - r0, min(e, r1) - r0)
            cols = slice(max(s, c0) - c0, min(e, c1) - c0)
            if rows.stop > rows.start and cols.stop > cols.start:
                yield rows, cols


def block_pairs(n: int, block_rows: int) -> list[tuple[int, int, int, int]]:
    """Upper-triangular block pairs (r0, r1, c0, c1), r0 <= c0, covering every pair i < j once."""
    if block_rows < 1:
        raise PipelineError(f"block_rows must be >= 1, got {block_rows}")
    edges = list(range(0, n, block_rows)) + [n]
    spans = list(zip(edges[:-1], edges[1:]))
    return [(r0, r1, c0, c1) for a, (r0, r1) in enumerate(spans) for (c0, c1) in spans[a:]]


def scan_negatives(layout: PairLayout, engine, block_rows: int, progress: bool = False,
                   desc: str = "pairs", start: int = 0) -> Iterator[tuple[object, int, int]]:
    """Yield (S, r0, c0) per block pair: S = similarities with positives and pairs i >= j set to -inf.

    S lives in the engine's reused buffer: consume it before asking for the next block. `start`: skip the
    first `start` block pairs (a resumed scan; the bar starts there).
    """
    emb = engine.put(layout.emb)
    blocks = block_pairs(layout.n, block_rows)
    bar = progress_bar(blocks[start:], desc=desc, unit="block", initial=start, total=len(blocks),
                       show=progress, leave=False)
    for r0, r1, c0, c1 in bar:
        s = engine.sims(emb[r0:r1], emb[c0:c1])
        for rows, cols in layout.positive_rects(r0, r1, c0, c1):
            engine.fill(s, rows, cols)
        if r0 == c0:
            engine.fill_lower(s)
        yield s, r0, c0


def positive_sims(layout: PairLayout, engine, block_rows: int) -> Iterator[np.ndarray]:
    """Similarities of every same-identity pair i < j, in chunks (each pair exactly once)."""
    emb = engine.put(layout.emb)
    chunk_rows = max(1, min(block_rows, 512))  # small: products between identities are wasted
    runs = [(int(s), int(e)) for s, e in zip(layout.starts, layout.ends) if e - s >= 2]
    group: list[tuple[int, int]] = []
    for run in runs + [None]:
        # Small identities share one product (a block-diagonal mask picks their pairs); big ones are tiled.
        if run is not None and run[1] - run[0] <= chunk_rows and (
            not group or run[1] - group[0][0] <= chunk_rows
        ):
            group.append(run)
            continue
        if group:
            yield _grouped_positives(engine, emb, group)
            group = []
        if run is None:
            break
        if run[1] - run[0] > chunk_rows:
            yield from _tiled_positives(engine, emb, run, chunk_rows)
        else:
            group.append(run)


def _grouped_positives(engine, emb, group: list[tuple[int, int]]) -> np.ndarray:
    start, stop = group[0][0], group[-1][1]
    s = engine.to_numpy(engine.sims(emb[start:stop], emb[start:stop]))
    run_id = np.full(stop - start, -1, np.int64)  # -1: single-image identities lying between the runs
    for i, (a, b) in enumerate(group):
        run_id[a - start : b - start] = i
    same = (run_id[:, None] == run_id[None, :]) & (run_id[:, None] >= 0) & ~np.tri(stop - start, dtype=bool)
    return s[same].copy()


def _tiled_positives(engine, emb, run: tuple[int, int], chunk_rows: int) -> Iterator[np.ndarray]:
    for r0, r1, c0, c1 in block_pairs(run[1] - run[0], chunk_rows):
        a, b = run[0] + r0, run[0] + c0
        s = engine.to_numpy(engine.sims(emb[a : a + r1 - r0], emb[b : b + c1 - c0]))
        yield (s[~np.tri(s.shape[0], dtype=bool)] if r0 == c0 else s.reshape(-1)).copy()
