"""Exact order statistics of float32 similarities without sorting them all.

A float32 maps to an int key with the same order (`float_keys`), so counting keys is counting values
exactly. A `Window` keeps, for one target rank, the exact multiset of the values in [lo, hi] (a histogram
over their keys, or the values themselves when hi is +inf) plus the count of values above hi. After a
scan, the rank's value is read off the window if the rank fell inside it; otherwise the window says on
which side it lies and a wider search runs (see `thresholds`).
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from pipeline.search.backends import FLOOR_ALL

COARSE_SHIFT = 16  # coarse radix bins hold 2**16 consecutive float32 values
COARSE_BINS = 1 << (32 - COARSE_SHIFT)
_FLUSH_KEYS = 1 << 22


def float_keys(values: np.ndarray) -> np.ndarray:
    """int64 keys ordered like the float32 values (-0.0 counts as +0.0; NaN must not occur)."""
    bits = (np.asarray(values, np.float32) + np.float32(0)).view(np.int32).astype(np.int64)
    return np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def keys_to_floats(keys: np.ndarray) -> np.ndarray:
    """Inverse of `float_keys`."""
    keys = np.asarray(keys, np.int64)
    return np.where(keys < 0, keys ^ 0x7FFFFFFF, keys).astype(np.int32).view(np.float32)


def fpr_rank(fpr: float, n: int) -> int:
    """0-based descending index floor(fpr * n), computed exactly for the decimal fpr (1e-3 is 1/1000)."""
    return min(int(Fraction(repr(float(fpr))) * n), n - 1)


class Window:
    """Exact multiset of values in [lo, hi] (hi may be +inf) and the count of values above hi.

    `rank` is the 0-based descending index wanted; `expected_fraction` estimates the share of all values
    that are >= lo (the scan uses it to decide how to extract them cheaply).
    """

    def __init__(self, rank: int, lo: float, hi: float, expected_fraction: float = 1.0):
        self.rank = int(rank)
        self.lo = np.float32(lo)
        self.hi = np.float32(hi)
        self.expected_fraction = float(expected_fraction)
        self.above = 0
        self.bounded = bool(np.isfinite(self.hi))
        if self.bounded:
            self.key_lo = int(float_keys(self.lo))
            self.key_hi = int(float_keys(self.hi))
            self.hist = np.zeros(self.key_hi - self.key_lo + 1, np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_size = 0

    @property
    def bins(self) -> int:
        return self.hist.size if self.bounded else 0

    def add(self, count_ge_lo: int, band: np.ndarray) -> None:
        """One block's contribution: how many values were >= lo, and those of them that are <= hi."""
        self.above += int(count_ge_lo) - band.size
        if band.size:
            self._pending.append(band.astype(np.float32, copy=False))
            self._pending_size += band.size
            # a bounded window folds its values into the histogram every _FLUSH_KEYS (memory: one buffer,
            # whatever N); an unbounded one keeps the rank+1 largest, so it may buffer 2 (rank + 1) first
            if self._pending_size >= (_FLUSH_KEYS if self.bounded else max(_FLUSH_KEYS, 2 * (self.rank + 1))):
                self._flush()

    def add_ge(self, values: np.ndarray) -> None:
        """Contribution from a block's values that are all >= lo (and are all of them that are)."""
        self.add(values.size, values[values <= self.hi] if self.bounded else values)

    def _flush(self) -> None:
        if not self._pending:
            return
        values = np.concatenate(self._pending)
        self._pending, self._pending_size = [], 0
        if self.bounded:
            self.hist += np.bincount(float_keys(values) - self.key_lo, minlength=self.hist.size)
            return
        # Unbounded: only the rank+1 largest can matter (nothing is counted above an infinite hi).
        keep = self.rank + 1
        if values.size > keep:
            values = np.partition(values, values.size - keep)[values.size - keep :]
            self.lo = max(self.lo, values.min())  # later values below the kept ones cannot matter
        self._pending, self._pending_size = [values], values.size

    def state(self) -> dict[str, np.ndarray]:
        """What a resumed scan needs (search/checkpoint.py): the count above hi and the values kept."""
        self._flush()
        kept = self.hist if self.bounded else (self._pending[0] if self._pending else np.empty(0, np.float32))
        return {"above": np.int64(self.above), "lo": self.lo, "kept": kept}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        self.above, self.lo = int(state["above"]), np.float32(state["lo"])
        if self.bounded:
            self.hist = np.array(state["kept"], np.int64)
        else:
            self._pending = [np.array(state["kept"], np.float32)]
            self._pending_size = self._pending[0].size

    def side(self) -> str:
        """'inside', 'above' (the rank's value is > hi) or 'below' (< lo)."""
        self._flush()
        inside = int(self.hist.sum()) if self.bounded else self._pending_size
        if self.rank < self.above:
            return "above"
        return "inside" if self.rank < self.above + inside else "below"

    def value(self) -> float:
        """The value at `rank` (descending); only when side() == 'inside'."""
        if self.side() != "inside":
            raise ValueError(f"rank {self.rank} is {self.side()} the window [{self.lo}, {self.hi}]")
        local = self.rank - self.above
        if not self.bounded:
            values = self._pending[0] if self._pending else np.empty(0, np.float32)
            return float(-np.partition(-values, local)[local])
        from_top = np.cumsum(self.hist[::-1])
        offset = int(np.searchsorted(from_top, local + 1, side="left"))
        return float(keys_to_floats(np.int64(self.key_hi - offset)))


class CoarseHistogram:
    """Counts of values >= floor per coarse radix bin (2**16 consecutive float32 values each)."""

    def __init__(self, floor: float = FLOOR_ALL):
        self.floor = np.float32(floor)
        self.counts = np.zeros(COARSE_BINS, np.int64)

    def add(self, values: np.ndarray) -> None:
        if values.size:
            coarse = (float_keys(values) >> COARSE_SHIFT) + COARSE_BINS // 2
            self.counts += np.bincount(coarse, minlength=COARSE_BINS)

    def state(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        self.counts = np.array(state["counts"], np.int64)

    def window(self, rank: int, total: int) -> Window:
        """The exact window (one coarse bin) holding descending rank `rank` (`rank` < values counted)."""
        from_top = np.cumsum(self.counts[::-1])
        if rank >= from_top[-1]:
            raise ValueError(f"rank {rank} is beyond the {from_top[-1]} values counted above the floor")
        offset = int(np.searchsorted(from_top, rank + 1, side="left"))
        coarse = COARSE_BINS - 1 - offset - COARSE_BINS // 2
        key_lo = coarse << COARSE_SHIFT
        lo, hi = keys_to_floats(np.array([key_lo, key_lo + (1 << COARSE_SHIFT) - 1]))
        return Window(rank, lo, hi, expected_fraction=from_top[offset] / max(total, 1))
