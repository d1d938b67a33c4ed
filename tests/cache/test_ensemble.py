"""pipeline.cache.ensemble: build-pools on an ensemble of cached teachers against a brute-force weighted mean of
the members' cosine similarities (numpy, from the stored values); members of other training sets refused in
one line naming both caches; an ensemble of one cache is that cache, to the byte."""
import hashlib
import re

import h5py
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from pipeline.cache.contract import contract_attrs
from pipeline.cache.ensemble import TeacherEnsemble
from pipeline.weights import parse_weights
from pipeline.cache.format import TeacherCache
from pipeline.errors import DataError, PipelineError
from pipeline.search.pool_files import load_pools, load_thresholds
from pipeline.search.pools import build_pools, write_pools
from stages.build_pools import COMMANDS

FPR_KEYS = ["1e-1", "1e-2", "1e-3", "1e-4", "1e-5", "1e-6"]


def identities(n=240, classes=30, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    labels[:2] = [classes, classes + 1]  # single-image identities
    return labels.astype(np.int64)


def member_views(labels, dim, seed):
    """(N, 2, D) raw embeddings of one teacher: its own identity centres + noise, scaled per row."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(int(labels.max()) + 1, dim))[labels] + rng.normal(size=(labels.size, dim)) * 0.9
    views = np.stack([base, base + rng.normal(size=base.shape) * 0.2], axis=1) * rng.uniform(0.5, 3, (labels.size, 1, 1))
    return views.astype(np.float16)


def write_member(path, views, labels, keys=None, dataset_fp="d" * 64, teacher=None):
    """A teacher cache written with h5py from the documented contract; returns its stored values (float32)."""
    keys = np.arange(len(labels), dtype=np.int64) + 1 if keys is None else np.asarray(keys, np.int64)
    attrs = contract_attrs(teacher_fingerprint=teacher or hashlib.sha256(str(path).encode()).hexdigest(),
                           teacher_name="r18", dataset_fingerprint=dataset_fp, preprocessing={"size": 112},
                           rows=len(labels), dim=views.shape[2], dtype="float16")
    for name, values in (("embeddings", views), ("labels", labels), ("keys", keys)):
        attrs[f"{name}_sha256"] = hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()
    with h5py.File(path, "w") as f:
        f["embeddings"], f["labels"], f["keys"] = views, labels, keys
        for name, value in attrs.items():
            f.attrs[name] = value
        f.attrs["complete"] = True
    return views.astype(np.float32)


def unit(x):
    return x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)


def brute_force(members, weights, labels, classes, k, m, centre_views):
    """Pools of the similarity sum_k s_k cos_k, from each member's stored embeddings separately."""
    shares = np.asarray(weights, np.float64) / np.sum(weights)
    s = sum(w * unit(v[:, 0]) @ unit(v[:, 0]).T for w, v in zip(shares, members))  # weighted mean cosine
    i, j = np.triu_indices(len(labels), 1)
    negative = labels[i] != labels[j]
    neg_sims = s[i, j][negative]
    ordered = np.sort(neg_sims)[::-1]
    thresholds = {key: float(ordered[ordered.size // 10**e]) for e, key in enumerate(FPR_KEYS, start=1)}
    best = sorted(zip((-neg_sims).tolist(), i[negative].tolist(), j[negative].tolist()))[:m]
    # class centres: per member the mean of its unit rows (the chosen views); the ensemble's centre is their
    # concatenation times sqrt(share), normalised, so centre similarities are sum_k s_k <m_k(a), m_k(b)> / norms
    means = []
    for v in members:
        used = unit(v) if centre_views == "both" else unit(v[:, :1])
        mean = np.zeros((classes, v.shape[2]))
        for c in range(classes):
            if (labels == c).any():
                mean[c] = used[labels == c].reshape(-1, v.shape[2]).mean(0)
        means.append(mean)
    gram = sum(w * mean @ mean.T for w, mean in zip(shares, means))
    norms = np.sqrt(np.diag(gram))
    present = np.flatnonzero(np.bincount(labels, minlength=classes) > 0)
    centres = np.zeros((classes, sum(v.shape[2] for v in members)))
    centres[present] = np.concatenate([np.sqrt(w) * mean for w, mean in zip(shares, means)], 1)[present] \
        / norms[present, None]
    cs = gram[np.ix_(present, present)] / np.outer(norms[present], norms[present])
    neighbours = np.full((classes, k), -1)
    for row, c in enumerate(present):
        others = [o for o in range(present.size) if o != row]
        neighbours[c] = present[sorted(others, key=lambda o: (-cs[row, o], o))[:k]]
    return {"thresholds": thresholds, "pairs": {(a, b) for _, a, b in best},
            "sims": np.array([-v for v, _, _ in best]), "centres": centres, "neighbours": neighbours}


def members(tmp_path, dims, labels, seed=0):
    paths, stored = [], []
    for number, dim in enumerate(dims):
        paths.append(tmp_path / f"teacher{number}.h5")
        stored.append(write_member(paths[-1], member_views(labels, dim, seed + number), labels))
    return paths, stored


@pytest.mark.parametrize("dims, weights, centre_views", [
    ((16, 8), None, "original"),
    ((16, 8, 24), (1.0, 2.0, 0.5), "both"),
])
def test_ensemble_pools_match_a_brute_force_weighted_mean_of_cosines(tmp_path, dims, weights, centre_views):
    labels = identities()
    classes = int(labels.max()) + 2  # one identity without images
    paths, stored = members(tmp_path, dims, labels)
    ensemble = TeacherEnsemble.open(paths, weights)
    assert len(ensemble) == labels.size and ensemble.dim == sum(dims)
    results = build_pools(ensemble, num_classes=classes, neighbours=5, hard_pairs=150, centre_views=centre_views,
                          block_rows=70, pilot_rows=32)
    ref = brute_force(stored, weights or [1.0] * len(dims), labels, classes, 5, 150, centre_views)
    np.testing.assert_allclose(results.centres, ref["centres"], atol=1e-6)
    np.testing.assert_array_equal(results.class_sizes, np.bincount(labels, minlength=classes))
    np.testing.assert_array_equal(results.neighbours, ref["neighbours"])
    np.testing.assert_allclose(results.neg_sims, ref["sims"], atol=1e-6)
    assert {tuple(p) for p in results.neg_pairs.tolist()} == ref["pairs"]
    for key, value in ref["thresholds"].items():
        assert abs(results.thresholds["thresholds"][key] - value) <= 1e-6
    assert results.attrs["cache_fingerprint"] == ensemble.fingerprint
    assert results.attrs["dataset_fingerprint"] == "d" * 64


def test_the_ensemble_embedding_is_the_scaled_concatenation_and_its_fingerprint_the_members(tmp_path):
    labels = identities(n=60)
    paths, stored = members(tmp_path, (8, 12), labels)
    ensemble = TeacherEnsemble.open(paths, [1, 3])
    rows = [5, 1, 5, 40]
    got = ensemble.embeddings(rows, views=(0, 1))
    expected = np.concatenate([np.sqrt(0.25) * unit(stored[0][rows]), np.sqrt(0.75) * unit(stored[1][rows])], -1)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1, atol=1e-6)
    same_shares = TeacherEnsemble.open(paths, [2, 6])
    assert same_shares.fingerprint == ensemble.fingerprint
    assert TeacherEnsemble.open(paths, [3, 1]).fingerprint != ensemble.fingerprint
    assert TeacherEnsemble.open(paths[::-1], [3, 1]).fingerprint != ensemble.fingerprint
    assert TeacherEnsemble.open(paths).fingerprint not in {ensemble.fingerprint, *(TeacherCache.open(p).fingerprint
                                                                                    for p in paths)}
    assert ensemble.teacher_fingerprint != TeacherEnsemble.open(paths).teacher_fingerprint


def mismatch(tmp_path, labels, other_labels, other_keys=None, other_views=None):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_member(a, member_views(labels, 8, 0), labels)
    write_member(b, member_views(other_labels, 12, 1) if other_views is None else other_views, other_labels,
                 keys=other_keys)
    with pytest.raises(DataError) as caught:
        TeacherEnsemble.open([a, b])
    message = str(caught.value)
    assert "\n" not in message and str(a) in message and str(b) in message, message
    assert "not caches of the same training set" in message
    return message


def test_members_of_another_training_set_are_refused_naming_both_and_the_first_mismatch(tmp_path):
    labels = identities(n=50)
    other = labels.copy()
    other[7] += 1
    assert "row 7 has label" in mismatch(tmp_path, labels, other)
    assert "50 rows != 49 rows" in mismatch(tmp_path, labels, labels[:49])
    order = np.random.default_rng(3).permutation(50)
    views = member_views(labels, 12, 1)[order]
    first = int(np.flatnonzero(order != np.arange(50))[0])
    message = mismatch(tmp_path, labels, labels[order], other_keys=np.arange(50)[order] + 1, other_views=views)
    assert f"row {first} has key {first + 1} != {order[first] + 1}" in message
    c = tmp_path / "c.h5"
    write_member(c, member_views(labels, 8, 2), labels, dataset_fp="e" * 64)
    with pytest.raises(DataError, match=r"a\.h5 and .*c\.h5 are not caches of the same training set: "
                                        r"dataset_fingerprint d+ != e+"):
        TeacherEnsemble.open([tmp_path / "a.h5", c])


def test_bad_weights_and_a_bad_member_row_are_one_line(tmp_path):
    labels = identities(n=40)
    paths, _ = members(tmp_path, (8, 4), labels)
    for text, fragment in (("1", "1 weight(s) for 2 cache(s)"), ("1,0", "0 is not a finite number > 0"),
                           ("1,nan", "nan is not a finite"), ("1,x", "not a comma-separated list")):
        with pytest.raises(PipelineError, match=rf"^--cache-weights {re.escape(text)}: .*{re.escape(fragment)}"):
            parse_weights(text, 2)
    assert parse_weights(None, 2) is None and parse_weights("1, 2.5", 2) == [1.0, 2.5]
    with pytest.raises(PipelineError, match="-1.0 is not a finite number > 0"):
        TeacherEnsemble.open(paths, [1, -1])
    views = member_views(labels, 4, 9)
    views[13, 0] = 0
    write_member(paths[1], views, labels)
    with pytest.raises(DataError, match=r"teacher1\.h5: embedding row 13 \(key 14\) is all zeros"):
        build_pools(TeacherEnsemble.open(paths), neighbours=2, hard_pairs=5)


def run_stage(*args):
    app = typer.Typer()
    app.command()(COMMANDS["build-pools"])
    run = CliRunner().invoke(app, [str(a) for a in args])
    assert run.exit_code == 0, run.output
    return run


def test_one_cache_is_the_single_cache_bytes_and_an_ensemble_records_its_members(tmp_path):
    labels = identities(n=120)
    paths, stored = members(tmp_path, (16, 8), labels)
    options = ["--neighbours", 3, "--hard-pairs", 20, "--block-rows", 64]
    write_pools(tmp_path / "today", build_pools(TeacherCache.open(paths[0]), neighbours=3, hard_pairs=20,
                                                 block_rows=64))
    run_stage("--cache", paths[0], "--out", tmp_path / "one", *options)
    run_stage("--cache", paths[0], "--cache-weights", 3, "--out", tmp_path / "weighted", *options)
    for name in ("pools.h5", "thresholds.json"):
        today = (tmp_path / "today" / name).read_bytes()
        assert (tmp_path / "one" / name).read_bytes() == today
        assert (tmp_path / "weighted" / name).read_bytes() == today
    single = TeacherEnsemble.open(paths[:1])
    assert (single.fingerprint, single.path) == (TeacherCache.open(paths[0]).fingerprint, paths[0])

    run = run_stage("--cache", paths[0], "--cache", paths[1], "--cache-weights", "1,2", "--out", tmp_path / "two",
                    *options)
    assert f"wrote {tmp_path / 'two' / 'pools.h5'}" in run.output
    pools = load_pools(tmp_path / "two" / "pools.h5")
    ensemble = TeacherEnsemble.open(paths, [1, 2])
    attrs = pools["attrs"]
    assert attrs["caches"] == f'["{paths[0]}", "{paths[1]}"]' and attrs["cache_weights"] == "[1.0, 2.0]"
    assert attrs["cache_fingerprint"] == ensemble.fingerprint and attrs["cache"] == f"{paths[0]} + {paths[1]}"
    assert pools["centres"].shape[1] == 24
    ref = brute_force(stored, [1, 2], labels, int(labels.max()) + 1, 3, 20, "original")
    np.testing.assert_array_equal(pools["neighbours"], ref["neighbours"])
    for key, value in load_thresholds(tmp_path / "two" / "thresholds.json").items():
        assert abs(value - ref["thresholds"][key]) <= 1e-6
