"""The global top-M most similar negative pairs (different identities), exact, in one blockwise scan.

Order (and tie rule): similarity descending, then i ascending, then j ascending, with (i, j), i < j, the
original row indices. A running floor (the M-th best similarity so far) keeps per-block extraction small;
entries equal to the floor are kept, because they can still win on the index tie rule.
"""
from __future__ import annotations

import numpy as np

from pipeline.search.backends import FLOOR_ALL
from pipeline.search.layout import PairLayout


def rank_pairs(sims: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Permutation putting pairs in the documented order (sim desc, i asc, j asc)."""
    return np.lexsort((j, i, -sims))


class TopPairs:
    """Scan consumer keeping the M best negative pairs seen so far."""

    def __init__(self, m: int, layout: PairLayout):
        self.m = int(m)
        self.order = layout.order
        self.floor = FLOOR_ALL
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._size = 0

    def key(self) -> list:
        return ["top pairs", self.m]

    def state(self) -> dict[str, np.ndarray]:
        self._compact()
        sims, i, j = self._parts[0] if self._parts else (np.empty(0, np.float32), np.empty(0, np.int64),
                                                         np.empty(0, np.int64))
        return {"sims": sims, "i": i, "j": j, "floor": np.float32(self.floor)}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        sims = np.array(state["sims"], np.float32)
        self._parts = [(sims, np.array(state["i"]), np.array(state["j"]))] if sims.size else []
        self._size, self.floor = sims.size, np.float32(state["floor"])

    def consume(self, engine, s, r0: int, c0: int) -> None:
        if self.m == 0:
            return
        floor = self.floor
        if floor == FLOOR_ALL:  # not M pairs yet: find the block's own M-th value before taking positions
            values = engine.values_ge(s, floor)
            if values.size > self.m:
                floor = np.partition(values, values.size - self.m)[values.size - self.m]
        positions, values = engine.positions_ge(s, floor)
        if values.size > self.m:  # no block can contribute more than M, except ties at its M-th value
            cut = np.partition(values, values.size - self.m)[values.size - self.m]
            keep = values >= cut
            positions, values = positions[keep], values[keep]
        width = s.shape[1]
        a = self.order[r0 + positions // width]
        b = self.order[c0 + positions % width]
        self._parts.append((values.astype(np.float32, copy=False), np.minimum(a, b), np.maximum(a, b)))
        self._size += values.size
        if self._size >= max(2 * self.m, 1 << 20):
            self._compact()

    def _compact(self) -> None:
        if not self._parts:
            return
        sims, i, j = (np.concatenate(column) for column in zip(*self._parts))
        best = rank_pairs(sims, i, j)[: self.m]
        sims, i, j = sims[best], i[best], j[best]
        self._parts, self._size = [(sims, i, j)], sims.size
        if sims.size == self.m:
            self.floor = max(self.floor, sims[-1])

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(pairs (M, 2) int64 with i < j, sims (M,) float32) in the documented order."""
        self._compact()
        if not self._parts:
            return np.empty((0, 2), np.int64), np.empty(0, np.float32)
        sims, i, j = self._parts[0]
        return np.stack([i, j], axis=1).astype(np.int64), sims.astype(np.float32)
