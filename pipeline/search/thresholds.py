"""Exact FPR thresholds over all negative pairs, in one pass over the pairs when the pilot guesses well.

threshold(f) = the element at 0-based index floor(f * n) of the n negative similarities (pairs i < j with
different labels) sorted in descending order -- the official EKD convention, computed exactly.

How, without sorting n ~ N^2/2 values:
  1. pilot: similarities between two random row samples estimate each threshold and its sampling error
     (row and column effects included); each target gets a window [lo, hi] a few standard errors wide;
  2. one scan: per block, the count of values > hi and the exact multiset of values in [lo, hi] (key
     histograms, `select.Window`); for small f one shared "values >= lo" extraction feeds all;
  3. a target whose rank fell outside its window (pilot unlucky) is found by the exact two-scan radix
     select: coarse histogram of float keys, then the one coarse bin that holds the rank. Small inputs
     (n below ~16 pilot samples) go there directly.
TPR(f) = fraction of positive pairs with similarity strictly greater than threshold(f) (a pair is accepted
when its score exceeds the threshold, so FPR(threshold) <= f).
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.errors import PipelineError
from pipeline.fpr import FPR_LEVELS, fpr_key
from pipeline.search.backends import FLOOR_ALL
from pipeline.search.layout import PairLayout, block_pairs, positive_sims, scan_negatives
from pipeline.search.select import (
    CoarseHistogram,
    Window,
    float_keys,
    fpr_rank,
    keys_to_floats,
)

DEFAULT_FPRS = FPR_LEVELS
EXTRACT_FRACTION = 0.15  # windows reaching at most this share of the values share one extraction
SPLIT_FRACTION = 0.03  # ... in which windows reaching more ("bulk") may be cut off from the "top" ones
PILOT_Z = 6.0  # window half-width in pilot standard errors
MAX_WINDOW_BINS = 1 << 22  # float32 values one window may span (its histogram: 32 MiB)


class WindowSet:
    """Scan consumer feeding every window from as few block passes as possible.

    Windows reaching more than `extract_fraction` of the values are counted and extracted one by one.
    The others share one extraction: every entry >= their lowest `lo`, except that when the "bulk"
    windows (reaching more than `split_fraction`) all end below the first "top" window, the gap between
    them is left out (at FPR 1e-1 that gap is most of the 10%). Counts above each hi stay exact: the
    count of entries >= the lowest lo is taken, and everything above it but the gap is extracted.
    """

    def __init__(self, windows: list[Window], extract_fraction: float = EXTRACT_FRACTION,
                 split_fraction: float = SPLIT_FRACTION):
        self.direct = [w for w in windows if w.expected_fraction > extract_fraction]
        self.shared = [w for w in windows if w.expected_fraction <= extract_fraction]
        self.split_fraction = split_fraction

    def key(self) -> list:
        return [[w.rank, float(w.lo), float(w.hi)] for w in self.direct + self.shared]

    def state(self) -> dict[str, np.ndarray]:
        return {f"{i}.{k}": v for i, w in enumerate(self.direct + self.shared) for k, v in w.state().items()}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        for i, window in enumerate(self.direct + self.shared):
            window.restore({k: state[f"{i}.{k}"] for k in ("above", "lo", "kept")})

    def consume(self, engine, s, r0: int, c0: int) -> None:
        for window in self.direct:
            window.add(*engine.values_between(s, window.lo, window.hi))
        if not self.shared:
            return
        bulk = [w for w in self.shared if w.expected_fraction > self.split_fraction]
        top = [w for w in self.shared if w.expected_fraction <= self.split_fraction]
        bulk_hi = max((w.hi for w in bulk), default=None)
        top_lo = min((w.lo for w in top), default=None)
        if bulk and top and bulk_hi < top_lo:
            count, values = engine.values_outside_gap(s, min(w.lo for w in bulk), bulk_hi, top_lo)
            band = values[values <= bulk_hi]
            for window in bulk:
                below = int(np.count_nonzero(band < window.lo))
                window.add(count - below, band[(band >= window.lo) & (band <= window.hi)])
            _feed_nested(top, values[values > bulk_hi])
        else:
            _feed_nested(self.shared, engine.values_ge(s, min(w.lo for w in self.shared)))


def _feed_nested(windows: list[Window], values: np.ndarray) -> None:
    """Feed windows from values holding every entry >= the lowest lo, narrowing in ascending lo order."""
    floor = None
    for window in sorted(windows, key=lambda w: w.lo):  # unbounded windows raise lo as they fill
        if floor is not None and window.lo > floor:
            values = values[values >= window.lo]
        floor = window.lo
        window.add_ge(values)


class CoarseConsumer:
    """Scan consumer filling a coarse radix histogram (first half of the exact two-scan selection)."""

    def __init__(self, histogram: CoarseHistogram):
        self.histogram = histogram

    def key(self) -> list:
        return ["coarse", float(self.histogram.floor)]

    def state(self) -> dict[str, np.ndarray]:
        return self.histogram.state()

    def restore(self, state: dict[str, np.ndarray]) -> None:
        self.histogram.restore(state)

    def consume(self, engine, s, r0: int, c0: int) -> None:
        self.histogram.add(engine.values_ge(s, self.histogram.floor))


def run_scan(layout: PairLayout, engine, block_rows: int, consumers: list, progress: bool, desc: str,
             checkpoint=None) -> None:
    """One pass over every negative pair, each block handed to every consumer (`consume(engine, S, r0, c0)`);
    with a `checkpoint` (search/checkpoint.ScanCheckpoint) it resumes a saved scan and saves its own."""
    blocks = len(block_pairs(layout.n, block_rows))
    start = checkpoint.start(f"{desc} ({engine.name})", consumers, blocks) if checkpoint else 0
    scan = scan_negatives(layout, engine, block_rows, progress=progress, desc=desc, start=start)
    for done, (s, r0, c0) in enumerate(scan, start + 1):
        for consumer in consumers:
            consumer.consume(engine, s, r0, c0)
        if checkpoint:
            checkpoint.after_block(done, consumers)


def pilot_windows(layout: PairLayout, engine, ranks: dict[str, int], pilot_rows: int, seed: int,
                  z: float = PILOT_Z, max_bins: int = MAX_WINDOW_BINS) -> dict[str, Window]:
    """Windows from the similarities between two random samples of `pilot_rows` rows each."""
    n_neg = layout.n_neg
    rng = np.random.default_rng(seed)
    p = min(pilot_rows, layout.n)
    rows, cols = rng.choice(layout.n, p, replace=False), rng.choice(layout.n, p, replace=False)
    emb = layout.emb
    s = np.array(engine.to_numpy(engine.sims(engine.put(emb[rows]), engine.put(emb[cols]))))
    negative = layout.labels[rows][:, None] != layout.labels[cols][None, :]
    values = s[negative]
    m = values.size
    if m == 0:
        return {}
    fractions = {key: rank / n_neg for key, rank in ranks.items()}
    estimate = _descending_stats(values, {key: min(int(q * m), m - 1) for key, q in fractions.items()})
    reach = {key: z * _pilot_error(s, negative, estimate[key], q, m) for key, q in fractions.items()}
    edges = {}
    for key, q in fractions.items():
        j_lo, j_hi = math.ceil((q + reach[key]) * m), math.floor((q - reach[key]) * m)
        if j_lo < m:
            edges[(key, "lo")] = j_lo
        if j_hi >= 1:
            edges[(key, "hi")] = j_hi
    edge_values = _descending_stats(values, edges) if edges else {}
    windows = {}
    for key, q in fractions.items():
        lo = edge_values.get((key, "lo"), FLOOR_ALL)
        hi = edge_values.get((key, "hi"), np.inf)
        lo, hi = _cap_bins(lo, hi, estimate[key], max_bins)
        windows[key] = Window(ranks[key], lo, hi, expected_fraction=min(1.0, q + reach[key]))
    return windows


def _descending_stats(values: np.ndarray, indices: dict) -> dict:
    """{name: the value at 0-based descending index} via one partial sort."""
    m = values.size
    ascending = sorted({m - 1 - j for j in indices.values()})
    part = np.partition(values, ascending)
    return {name: np.float32(part[m - 1 - j]) for name, j in indices.items()}


def _pilot_error(s: np.ndarray, negative: np.ndarray, t: float, q: float, m: int) -> float:
    """Standard error of the pilot's exceedance fraction at t: row effects + column effects + binomial."""
    above = (s > t) & negative
    spread = 0.0
    for axis in (0, 1):
        counts = negative.sum(axis=axis)
        used = counts > 0
        if used.sum() > 1:
            share = above.sum(axis=axis)[used] / counts[used]
            spread += float(share.var(ddof=1)) / int(used.sum())
    return math.sqrt(spread + q * (1 - q) / m)


def _cap_bins(lo, hi, centre, max_bins: int):
    """Shrink a bounded window to at most `max_bins` float32 values around the estimate."""
    if not np.isfinite(hi):
        return lo, hi
    key_lo, key_hi, key_c = (int(k) for k in float_keys(np.array([lo, hi, centre], np.float32)))
    if key_hi - key_lo + 1 <= max_bins:
        return lo, hi
    key_lo = max(key_lo, min(key_c - max_bins // 2, key_hi - max_bins + 1))
    key_hi = key_lo + max_bins - 1
    new_lo, new_hi = keys_to_floats(np.array([key_lo, key_hi]))
    return new_lo, new_hi


def exact_thresholds(layout: PairLayout, engine, ranks: dict[str, int], block_rows: int = 4096,
                     pilot_rows: int = 4096, seed: int = 0, progress: bool = False,
                     ride_along: tuple = (), pilot_z: float = PILOT_Z,
                     checkpoint=None) -> tuple[dict[str, float], dict]:
    """{key: value at descending rank} over all negative pairs, exact; `ride_along` consumers see the
    first full scan (so top-M pairs cost no extra pass); `checkpoint` makes the scans resumable
    (search/checkpoint.py). Returns (values, method summary)."""
    extra = list(ride_along)
    values: dict[str, float] = {}
    todo, floor, scans = dict(ranks), FLOOR_ALL, 0
    p = min(pilot_rows, layout.n)
    use_pilot = pilot_rows > 0 and layout.n * (layout.n - 1) // 2 >= 16 * p * p
    if use_pilot:
        windows = pilot_windows(layout, engine, ranks, pilot_rows, seed, z=pilot_z)
        if windows:
            run_scan(layout, engine, block_rows, [WindowSet(list(windows.values()))] + extra, progress, "thresholds",
                     checkpoint)
            extra, scans = [], scans + 1
            sides = {key: w.side() for key, w in windows.items()}
            values = {key: w.value() for key, w in windows.items() if sides[key] == "inside"}
            todo = {key: rank for key, rank in ranks.items() if key not in values}
            if any(sides[key] == "below" for key in todo):
                floor = FLOOR_ALL
            elif todo:  # every miss lies above its window: values below the lowest hi cannot matter
                floor = min(windows[key].hi for key in todo)
    missed = sorted(todo) if use_pilot else []
    if todo:
        coarse = CoarseHistogram(floor)
        run_scan(layout, engine, block_rows, [CoarseConsumer(coarse)] + extra, progress, "coarse ranks",
                 checkpoint)
        windows = {key: coarse.window(rank, layout.n_neg) for key, rank in todo.items()}
        run_scan(layout, engine, block_rows, [WindowSet(list(windows.values()))], progress, "exact ranks",
                 checkpoint)
        scans += 2
        for key, window in windows.items():
            if window.side() != "inside":  # cannot happen unless the float keys are inconsistent
                raise RuntimeError(f"exact selection lost rank {window.rank} for {key}")
            values[key] = window.value()
    method = {"engine": engine.name, "pilot": bool(use_pilot), "pilot_misses": missed, "scans": scans}
    return {key: values[key] for key in ranks}, method


def positive_tpr(layout: PairLayout, engine, thresholds: dict[str, float], block_rows: int) -> dict[str, float]:
    """Fraction of positive pairs with similarity strictly above each threshold (NaN without positives)."""
    keys = list(thresholds)
    cut = np.array([thresholds[k] for k in keys], np.float32)
    above = np.zeros(len(keys), np.int64)
    for chunk in positive_sims(layout, engine, block_rows):
        ordered = np.sort(chunk)
        above += ordered.size - np.searchsorted(ordered, cut, side="right")
    n_pos = layout.n_pos
    return {k: (float(a) / n_pos if n_pos else float("nan")) for k, a in zip(keys, above)}


def pair_counts(layout: PairLayout, n_total: int) -> dict[str, int]:
    """Pair and identity counts of the rows used (N) out of `n_total`."""
    sizes = layout.run_sizes
    return {
        "n_neg": layout.n_neg,
        "n_pos": layout.n_pos,
        "N": layout.n,
        "N_total": int(n_total),
        "identities": int(sizes.size),
        "single_image_identities": int(np.count_nonzero(sizes == 1)),
    }


def threshold_ranks(fprs, n_neg: int) -> dict[str, int]:
    """{"1e-1": floor(f * n_neg), ...}; PipelineError without negatives or for f outside (0, 1)."""
    if n_neg <= 0:
        raise PipelineError("no negative pairs (every image has the same identity): thresholds are undefined")
    ranks = {}
    for f in fprs:
        if not 0 < float(f) < 1:
            raise PipelineError(f"FPR {f!r} must lie strictly between 0 and 1")
        ranks[fpr_key(f)] = fpr_rank(f, n_neg)
    return ranks
