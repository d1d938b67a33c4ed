"""pipeline.search against brute force over the full similarity matrix.

Two kinds of data. "Lattice" rows have 16 entries of +-1/4 in 32 dimensions: unit norm exactly, and every
product is a multiple of 1/16, exact in float32 whatever the summation order -- so every backend and block
size must agree bit for bit, and the many exact ties (plus duplicated rows) exercise the tie rules.
"Clustered" rows are generic floats; there results are compared to 1e-6 (block products may round
differently from one big product) and the test data is checked to have no near-ties where order matters.
"""
import logging
import math

import numpy as np
import pytest

from pipeline.errors import DataError, PipelineError
from pipeline.fpr import fpr_key
from pipeline.search.backends import NumpyEngine, TorchEngine
from pipeline.search.layout import PairLayout
from pipeline.search.select import Window, float_keys, keys_to_floats
from pipeline.search.statistics import (
    class_centres,
    identity_neighbours,
    knn_ip,
    negative_thresholds,
    top_negative_pairs,
)
from pipeline.search.thresholds import (
    WindowSet,
    exact_thresholds,
    run_scan,
    threshold_ranks,
)

# FPR -> (numerator, denominator): the reference index is n * num // den, in integers.
FPRS = {0.1: (1, 10), 0.01: (1, 100), 0.001: (1, 1000), 0.0001: (1, 10000)}
BACKENDS = ["numpy", "torch", "faiss"]


def lattice(n=300, classes=40, seed=0, duplicates=20):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    base = np.zeros((classes, 32))
    for c in range(classes):
        base[c, rng.choice(32, 16, replace=False)] = rng.choice([-0.25, 0.25], 16)
    x = base[labels].copy()
    for row in x:  # move a few of the 16 entries: members stay similar, not identical
        on, off = np.flatnonzero(row), np.flatnonzero(row == 0)
        moved = rng.choice(on, 3, replace=False)
        row[rng.choice(off, 3, replace=False)] = rng.choice([-0.25, 0.25], 3)
        row[moved] = 0
    for a, b in rng.integers(0, n, (duplicates, 2)):  # exact duplicates, same or other identity
        x[b] = x[a]
    labels[:3] = [classes, classes + 1, classes + 2]  # single-image identities
    return x.astype(np.float32), labels.astype(np.int64)


def clustered(n=360, dim=24, classes=50, seed=1):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    labels[:4] = classes + np.arange(4)
    x = rng.normal(size=(classes + 4, dim))[labels] * 0.8 + rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels.astype(np.int64)


def brute_pairs(x, labels):
    s = x.astype(np.float32) @ x.T.astype(np.float32)
    i, j = np.triu_indices(len(x), 1)
    return s[i, j], i, j, labels[i] != labels[j]


def brute_thresholds(x, labels, fprs=FPRS):
    sims, _, _, negative = brute_pairs(x, labels)
    ordered = np.sort(sims[negative])[::-1]
    positives = sims[~negative]
    out = {}
    for f, (num, den) in fprs.items():
        t = ordered[ordered.size * num // den]
        out[fpr_key(f)] = (float(t), float(np.mean(positives > t)))
    return out


def assert_thresholds(result, reference, exact=True):
    for key, (t, tpr) in reference.items():
        got = result["thresholds"][key]
        assert got == t if exact else abs(got - t) <= 1e-6, (key, got, t)
        assert result["tpr"][key] == tpr  # no positive lies within float rounding of a threshold here


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_rows,pilot_rows", [(37, 0), (128, 0), (64, 48), (1000, 40)])
def test_thresholds_exact_on_lattice_ties(backend, block_rows, pilot_rows):
    x, labels = lattice()
    result = negative_thresholds(x, labels, fprs=tuple(FPRS), backend=backend, block_rows=block_rows,
                                 pilot_rows=pilot_rows)
    assert_thresholds(result, brute_thresholds(x, labels))
    assert result["method"]["pilot"] == (pilot_rows > 0)


@pytest.mark.parametrize("block_rows,pilot_rows", [(50, 0), (97, 64), (360, 40)])
def test_thresholds_on_generic_floats(block_rows, pilot_rows):
    x, labels = clustered()
    result = negative_thresholds(x, labels, fprs=tuple(FPRS), block_rows=block_rows, pilot_rows=pilot_rows)
    assert_thresholds(result, brute_thresholds(x, labels), exact=False)


def test_counts_include_single_image_identities():
    x, labels = clustered()
    counts = negative_thresholds(x, labels, fprs=(0.1,), pilot_rows=0)["counts"]
    sizes = np.bincount(labels)
    sizes = sizes[sizes > 0]
    n = len(labels)
    _, _, _, negative = brute_pairs(x, labels)
    assert counts == {"n_neg": int(negative.sum()), "n_pos": int((~negative).sum()), "N": n, "N_total": n,
                      "identities": sizes.size, "single_image_identities": 4, "sampled": 0}


def test_pilot_misses_are_recovered_exactly():
    x, labels = clustered()
    layout = PairLayout.build(x, labels)
    ranks = threshold_ranks(tuple(FPRS), layout.n_neg)
    # z = 0: windows of zero width at the pilot's guesses, so the ranks fall outside them.
    values, method = exact_thresholds(layout, NumpyEngine(), ranks, block_rows=50, pilot_rows=40, pilot_z=0.0)
    assert method["pilot"] and len(method["pilot_misses"]) >= 3 and method["scans"] == 3
    direct, method = exact_thresholds(layout, NumpyEngine(), ranks, block_rows=50, pilot_rows=0)
    assert not method["pilot"] and method["scans"] == 2
    assert values == direct
    for key, (t, _) in brute_thresholds(x, labels).items():
        assert abs(values[key] - t) <= 1e-6


class Spy:
    """An engine wrapper recording which extraction each block used."""

    def __init__(self, engine):
        self.engine, self.calls = engine, set()

    def __getattr__(self, name):
        if name.startswith("values_"):
            self.calls.add(name[len("values_"):])
        return getattr(self.engine, name)


@pytest.mark.parametrize("fractions,calls", [
    ((0.5, 0.1, 0.01), {"between", "outside_gap"}),  # a wide window, a bulk one, a top one: gap left out
    ((0.1, 0.05), {"ge"}),                          # only bulk windows: one contiguous extraction
    ((0.4,), {"between"}),
])
@pytest.mark.parametrize("engine", [NumpyEngine, lambda: TorchEngine("cpu")])
def test_every_extraction_path_counts_exactly(fractions, calls, engine):
    x, labels = clustered(n=300, seed=5)
    sims, _, _, negative = brute_pairs(x, labels)
    ordered = np.sort(sims[negative])[::-1]
    windows = []
    for f in fractions:  # windows around the true rank, built from brute force
        r = int(ordered.size * f)
        windows.append(Window(r, ordered[min(r + 40, ordered.size - 1)], ordered[max(r - 40, 0)], f))
    engine = Spy(engine())
    consumer = WindowSet(windows)
    run_scan(PairLayout.build(x, labels), engine, 64, [consumer], False, "test")
    assert engine.calls == calls
    for window in windows:
        assert window.side() == "inside"
        assert abs(window.value() - ordered[window.rank]) <= 1e-6


def test_sample_uses_the_documented_rows():
    x, labels = clustered()
    result = negative_thresholds(x, labels, fprs=tuple(FPRS), sample=200, seed=7, pilot_rows=0)
    rows = np.sort(np.random.default_rng(7).choice(len(x), 200, replace=False))
    assert_thresholds(result, brute_thresholds(x[rows], labels[rows]), exact=False)
    assert result["counts"]["N"] == 200 and result["counts"]["N_total"] == len(x) and result["counts"]["sampled"] == 1


def brute_top_pairs(x, labels, m):
    sims, i, j, negative = brute_pairs(x, labels)
    best = sorted(zip((-sims[negative]).tolist(), i[negative].tolist(), j[negative].tolist()))[:m]
    return np.array([[a, b] for _, a, b in best]), np.array([-s for s, _, _ in best], np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_rows", [37, 64, 1000])
def test_top_pairs_exact_with_tie_rule(backend, block_rows):
    x, labels = lattice()
    pairs, sims = top_negative_pairs(x, labels, 700, backend=backend, block_rows=block_rows)
    ref_pairs, ref_sims = brute_top_pairs(x, labels, 700)
    assert np.unique(ref_sims).size < 700 / 4  # plenty of exact ties decided by (i, j)
    np.testing.assert_array_equal(pairs, ref_pairs)
    np.testing.assert_array_equal(sims, ref_sims)
    assert pairs.dtype == np.int64 and np.all(pairs[:, 0] < pairs[:, 1])


def test_top_pairs_on_generic_floats():
    x, labels = clustered()
    pairs, sims = top_negative_pairs(x, labels, 300, block_rows=50)
    ref_pairs, ref_sims = brute_top_pairs(x, labels, 301)
    np.testing.assert_allclose(sims, ref_sims[:300], atol=1e-6)
    gap = -np.diff(ref_sims)
    assert gap[-1] > 1e-6  # the 300th and 301st differ: the set is unambiguous
    clear = np.r_[True, gap[:-1] > 1e-6] & (gap > 1e-6)  # places whose order float rounding cannot flip
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(pairs[clear], ref_pairs[:300][clear])
    assert {tuple(p) for p in pairs} == {tuple(p) for p in ref_pairs[:300]}


def test_top_pairs_clamped_with_warning(caplog):
    x, labels = lattice(n=40, classes=5)
    _, _, _, negative = brute_pairs(x, labels)
    with caplog.at_level(logging.WARNING, logger="pipeline.search"):
        pairs, sims = top_negative_pairs(x, labels, 10**6)
    assert pairs.shape == (negative.sum(), 2) and sims.shape == (negative.sum(),)
    assert "m=1000000 is more than possible" in caplog.text


def brute_knn(s, k, exclude_self):
    out = []
    for r, row in enumerate(s):
        candidates = [c for c in range(row.size) if not (exclude_self and c == r)]
        out.append(sorted(candidates, key=lambda c: (-row[c], c))[:k])
    return np.array(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exclude", [None, "self"])
def test_knn_exact_with_tie_rule(backend, exclude):
    x, _ = lattice(n=150)
    queries = x if exclude else x[:70]
    sims, idx = knn_ip(queries, x, 9, exclude=exclude, backend=backend, block_rows=41)
    s = queries @ x.T
    reference = brute_knn(s, 9, exclude == "self")
    np.testing.assert_array_equal(idx, reference)
    np.testing.assert_array_equal(sims, np.take_along_axis(s, reference, axis=1))


def test_knn_clamps_k_with_warning(caplog):
    x, _ = clustered(n=20)
    with caplog.at_level(logging.WARNING, logger="pipeline.search"):
        sims, idx = knn_ip(x, x, 50, exclude="self", backend="numpy")
    assert idx.shape == (20, 19) and "k=50 is more than possible (19)" in caplog.text
    np.testing.assert_array_equal(np.sort(idx, axis=1), [[c for c in range(20) if c != r] for r in range(20)])


def test_centres_and_identity_neighbours_match_brute_force():
    x, labels = clustered(n=300, seed=4)
    views = np.stack([x, np.roll(x, 1, axis=1)], axis=1)  # a second "view" per image
    classes = int(labels.max()) + 3  # two identities without images
    centres, sizes = class_centres(views, labels, classes)
    for c in range(classes):
        members = views[labels == c].reshape(-1, x.shape[1]).astype(np.float64)
        assert sizes[c] == (labels == c).sum()
        if members.size == 0:
            assert not centres[c].any()
            continue
        mean = members.mean(axis=0)
        np.testing.assert_allclose(centres[c], mean / np.linalg.norm(mean), atol=1e-6)
    neighbours, sims = identity_neighbours(centres, 6, sizes, backend="faiss", block_rows=16)
    present = np.flatnonzero(sizes > 0)
    s = centres[present] @ centres[present].T
    gaps = -np.diff(np.sort(s, axis=1)[:, ::-1][:, :8], axis=1)
    assert gaps.min() > 1e-5  # no near-ties among the first neighbours
    reference = present[brute_knn(s, 6, True)]
    np.testing.assert_array_equal(neighbours[present], reference)
    np.testing.assert_allclose(sims[present], np.take_along_axis(centres[present] @ centres.T, reference, 1),
                               atol=1e-6)
    empty = sizes == 0
    assert np.all(neighbours[empty] == -1) and np.all(np.isnan(sims[empty]))
    assert not np.isin(np.flatnonzero(empty), neighbours).any()


def test_nan_rows_are_named():
    x, labels = clustered(n=50)
    x[17, 3] = np.nan
    for call in (lambda: negative_thresholds(x, labels), lambda: top_negative_pairs(x, labels, 5),
                 lambda: knn_ip(x, x, 3)):
        with pytest.raises(DataError, match="row 17 contains NaN"):
            call()


def test_no_negative_pairs_is_an_error():
    x, _ = clustered(n=10)
    with pytest.raises(PipelineError, match="no negative pairs"):
        negative_thresholds(x, np.zeros(10, np.int64))


def test_float_keys_order_and_round_trip():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=1000), [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30]]).astype(np.float32)
    keys = float_keys(values)
    order = np.argsort(values, kind="stable")
    assert np.all(np.diff(keys[order]) >= 0)
    assert np.all((np.diff(keys[order]) == 0) == (np.diff(values[order]) == 0))
    np.testing.assert_array_equal(keys_to_floats(keys), values)  # -0.0 comes back as 0.0, which compares equal


def test_fpr_keys_and_ranks_use_decimal_fractions():
    assert [fpr_key(f) for f in (1e-1, 1e-6, 5e-3, 0.25)] == ["1e-1", "1e-6", "5e-3", "2.5e-1"]
    for n in (10, 30, 999, 1000, 1001, 123457):
        ranks = threshold_ranks((0.1, 0.001, 0.3), n)
        assert ranks == {"1e-1": n // 10, "1e-3": n // 1000, "3e-1": 3 * n // 10}
    assert math.isclose(0.1 * 30, 3.0000000000000004)  # why the float product is not used
