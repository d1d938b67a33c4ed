"""pipeline.search.pools and the build-pools stage: contents against brute force, the files' contract, bad input."""
import hashlib
import json
import logging

import h5py
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from pipeline.cache.contract import contract_attrs
from pipeline.cache.format import TeacherCache
from pipeline.errors import DataError, PipelineError
from pipeline.search.pool_files import DATASETS, load_pools, load_thresholds
from pipeline.search.pools import build_pools, write_pools
from stages.build_pools import COMMANDS

FPR_KEYS = ["1e-1", "1e-2", "1e-3", "1e-4", "1e-5", "1e-6"]


def views_data(n=240, dim=16, classes=30, seed=0):
    """(N, 2, D) raw (unnormalised) embeddings: identity centre + noise, the 2nd view a perturbed copy."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    labels[:2] = [classes, classes + 1]  # single-image identities
    base = rng.normal(size=(classes + 2, dim))[labels] + rng.normal(size=(n, dim)) * 0.9
    views = np.stack([base, base + rng.normal(size=(n, dim)) * 0.2], axis=1) * rng.uniform(0.5, 3, (n, 1, 1))
    return views.astype(np.float32), labels.astype(np.int64)


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def brute_force(views, labels, classes, k, m, centre_views):
    x = unit(views[:, 0])
    s = x @ x.T
    i, j = np.triu_indices(len(x), 1)
    negative = labels[i] != labels[j]
    neg_sims = s[i, j][negative]
    ordered = np.sort(neg_sims)[::-1]
    thresholds = {key: float(ordered[ordered.size // 10**e]) for e, key in enumerate(FPR_KEYS, start=1)}
    best = sorted(zip((-neg_sims).tolist(), i[negative].tolist(), j[negative].tolist()))[:m]
    used = unit(views) if centre_views == "both" else unit(views[:, :1])
    centres = np.zeros((classes, x.shape[1]))
    for c in range(classes):
        members = used[labels == c].reshape(-1, x.shape[1]).astype(np.float64)
        if members.size:
            centres[c] = members.mean(0) / np.linalg.norm(members.mean(0))
    present = np.flatnonzero(np.bincount(labels, minlength=classes) > 0)
    cs = centres[present] @ centres[present].T
    neighbours = np.full((classes, k), -1)
    for row, c in enumerate(present):
        others = [o for o in range(present.size) if o != row]
        neighbours[c] = present[sorted(others, key=lambda o: (-cs[row, o], o))[:k]]
    return {"thresholds": thresholds, "pairs": np.array([[a, b] for _, a, b in best]),
            "sims": np.array([-v for v, _, _ in best], np.float32), "centres": centres, "neighbours": neighbours}


@pytest.mark.parametrize("centre_views", ["original", "both"])
def test_build_pools_matches_brute_force(centre_views):
    views, labels = views_data()
    classes = int(labels.max()) + 2  # one identity without images
    results = build_pools(views, labels, classes, neighbours=5, hard_pairs=150, centre_views=centre_views, block_rows=70,
                          pilot_rows=32)
    ref = brute_force(views, labels, classes, 5, 150, centre_views)
    np.testing.assert_allclose(results.centres, ref["centres"], atol=1e-6)
    np.testing.assert_array_equal(results.class_sizes, np.bincount(labels, minlength=classes))
    np.testing.assert_array_equal(results.neighbours, ref["neighbours"])
    assert np.all(np.isnan(results.neighbour_sims[-1]))
    np.testing.assert_allclose(results.neg_sims, ref["sims"], atol=1e-6)
    assert {tuple(p) for p in results.neg_pairs} == {tuple(p) for p in ref["pairs"]}
    for key, value in ref["thresholds"].items():
        assert abs(results.thresholds["thresholds"][key] - value) <= 1e-6
    counts = results.thresholds["counts"]
    assert counts["single_image_identities"] == 2 and counts["identities"] == classes - 1
    assert results.attrs["centre_views"] == centre_views and results.attrs["k"] == 5


def test_files_round_trip_and_thresholds_json_is_dvc_metrics(tmp_path):
    views, labels = views_data()
    results = build_pools(views, labels, neighbours=4, hard_pairs=50)
    pools_path, thresholds_path = write_pools(tmp_path / "out", results)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pools.h5", "thresholds.json"]
    pools = load_pools(pools_path)
    for name in DATASETS:
        np.testing.assert_array_equal(pools[name], getattr(results, name))
    assert pools["centres"].dtype == np.float32 and pools["neg_pairs"].dtype == np.int64
    assert pools["neighbours"].dtype == np.int64 and pools["class_sizes"].dtype == np.int64
    assert pools["attrs"]["complete"] and pools["attrs"]["format_version"] == 2
    assert pools["attrs"]["thresholds_json_sha256"] == hashlib.sha256(thresholds_path.read_bytes()).hexdigest()

    document = json.load(open(thresholds_path))
    assert [key for key in document if not isinstance(document[key], dict)] == FPR_KEYS
    assert set(document["tpr"]) == set(FPR_KEYS)

    def leaves(node):
        return [x for v in node.values() for x in (leaves(v) if isinstance(v, dict) else [v])]

    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in leaves(document))
    assert load_thresholds(thresholds_path) == {key: results.thresholds["thresholds"][key] for key in FPR_KEYS}
    assert document["counts"]["n_neg"] + document["counts"]["n_pos"] == len(labels) * (len(labels) - 1) // 2


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    views, labels = views_data(n=40)
    results = build_pools(views, labels, neighbours=2, hard_pairs=5)
    results.attrs["unstorable"] = object()  # h5py raises while writing attributes, before `complete`
    with pytest.raises(TypeError):
        write_pools(tmp_path, results)
    assert list(tmp_path.iterdir()) == []


def test_load_pools_refuses_incomplete_and_malformed_files(tmp_path):
    path = tmp_path / "pools.h5"
    with h5py.File(path, "w") as f:  # every dataset, but the writer never reached `complete`
        f.attrs["format_version"] = 2
        f["centres"], f["class_sizes"] = np.zeros((3, 4), np.float32), np.ones(3, np.int64)
        f["neighbours"], f["neighbour_sims"] = np.zeros((3, 2), np.int64), np.zeros((3, 2), np.float32)
        f["neg_pairs"], f["neg_sims"] = np.zeros((5, 2), np.int64), np.zeros(5, np.float32)
    with pytest.raises(DataError, match="incomplete"):
        load_pools(path)
    for mark in (False, "no"):  # only the boolean True marks a complete file
        with h5py.File(path, "a") as f:
            f.attrs["complete"] = mark
        with pytest.raises(DataError, match="incomplete"):
            load_pools(path)
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = True
        del f["neg_sims"]
        f["neg_sims"] = np.zeros(4, np.float32)
    with pytest.raises(DataError, match="neg_pairs"):
        load_pools(path)
    path.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="not a readable HDF5"):
        load_pools(path)


def test_load_thresholds_rejects_non_numeric_values(tmp_path):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"1e-1": 0.3, "1e-2": "high", "counts": {"n_neg": 3}}))
    with pytest.raises(DataError, match="'1e-2'"):
        load_thresholds(path)
    path.write_text("{broken")
    with pytest.raises(DataError, match="not valid JSON"):
        load_thresholds(path)


def test_k_and_m_beyond_the_data_are_clamped_with_a_warning(caplog):
    views, labels = views_data(n=30, classes=4)
    n_neg = sum(labels[a] != labels[b] for a in range(30) for b in range(a + 1, 30))
    with caplog.at_level(logging.WARNING, logger="pipeline.search"):
        results = build_pools(views, labels, neighbours=50, hard_pairs=10**6)
    assert results.neighbours.shape == (6, 5) and results.neg_pairs.shape == (n_neg, 2)
    assert "k=50 is more than possible (5)" in caplog.text
    assert f"m=1000000 is more than possible ({n_neg})" in caplog.text
    assert results.attrs["k"] == 5 and results.attrs["k_requested"] == 50 and results.attrs["m"] == n_neg


def test_sampled_rows_index_the_full_cache():
    views, labels = views_data(n=200)
    results = build_pools(views, labels, neighbours=3, hard_pairs=40, threshold_rows=120, seed=3)
    rows = np.sort(np.random.default_rng(3).choice(200, 120, replace=False))
    sub = brute_force(views[rows], labels[rows], int(labels.max()) + 1, 3, 40, "original")
    np.testing.assert_array_equal(results.neg_pairs, rows[sub["pairs"]])
    assert results.thresholds["counts"]["N"] == 120 and results.thresholds["counts"]["N_total"] == 200
    assert results.attrs["sample"] == 120


def write_cache(path, views, labels, nan_row=None):
    """A teacher cache written with h5py from the documented contract (float16, keys = row + 1)."""
    data = views.astype(np.float16)
    if nan_row is not None:
        data[nan_row, 1, 2] = np.nan
    keys = np.arange(len(labels), dtype=np.int64) + 1
    attrs = contract_attrs(teacher_fingerprint="t" * 64, teacher_name="r18", dataset_fingerprint="d" * 64,
                           preprocessing={"size": 112}, rows=len(labels), dim=views.shape[2], dtype="float16")
    for name, values in (("embeddings", data), ("labels", labels), ("keys", keys)):
        attrs[f"{name}_sha256"] = hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()
    with h5py.File(path, "w") as f:
        f["embeddings"], f["labels"], f["keys"] = data, labels, keys
        for name, value in attrs.items():
            f.attrs[name] = value
        f.attrs["complete"] = True


def test_nan_in_the_cache_names_file_row_and_key(tmp_path):
    views, labels = views_data(n=60)
    write_cache(tmp_path / "cache.h5", views, labels, nan_row=41)
    with pytest.raises(DataError, match=r"cache\.h5: embedding row 41 \(key 42\) contains NaN"):
        build_pools(TeacherCache.open(tmp_path / "cache.h5"), centre_views="both")


def test_stage_writes_pools_from_a_cache(tmp_path):
    views, labels = views_data(n=150)
    write_cache(tmp_path / "cache.h5", views, labels)
    app = typer.Typer()
    app.command()(COMMANDS["build-pools"])
    out = tmp_path / "pools"
    run = CliRunner().invoke(app, ["--cache", str(tmp_path / "cache.h5"), "--out", str(out), "--neighbours", "3",
                                   "--hard-pairs", "20", "--centre-views", "both", "--block-rows", "64"])
    assert run.exit_code == 0, run.output
    assert f"wrote {out / 'pools.h5'}" in run.output and "1e-6" in run.output
    pools = load_pools(out / "pools.h5")
    assert pools["attrs"]["teacher_fingerprint"] == "t" * 64 and pools["attrs"]["dataset_fingerprint"] == "d" * 64
    ref = brute_force(views.astype(np.float16).astype(np.float32), labels, int(labels.max()) + 1, 3, 20, "both")
    np.testing.assert_array_equal(pools["neighbours"], ref["neighbours"])
    thresholds = load_thresholds(out / "thresholds.json")
    for key, value in ref["thresholds"].items():
        assert abs(thresholds[key] - value) <= 1e-6


def test_the_scan_memory_is_checked_before_allocating(monkeypatch):
    """Refused with one line naming --block-rows and --hard-pairs when the peak would not fit: class sums
    (32 x 16 float64), embeddings (240 x 16 float32), three 70 x 70 float32 blocks, 150 pairs of 20 B twice."""
    import pipeline.machine.resources as resources

    views, labels = views_data()
    peak = 8 * 32 * 16 + 4 * 240 * 16 + 3 * 4 * 70 * 70 + 2 * 20 * 150
    monkeypatch.setattr(resources, "available_memory", lambda: peak - 1)
    with pytest.raises(PipelineError, match=r"build-pools of 240 rows x 16 \(--block-rows 70, --hard-pairs 150\): "
                                            r"needs 82\.3 KiB"):
        build_pools(views, labels, 32, neighbours=5, hard_pairs=150, block_rows=70, pilot_rows=32)
    monkeypatch.setattr(resources, "available_memory", lambda: peak)
    build_pools(views, labels, 32, neighbours=5, hard_pairs=150, block_rows=70, pilot_rows=32)
    # a block larger than the data is only as large as the data
    monkeypatch.setattr(resources, "available_memory", lambda: 8 * 32 * 16 + 4 * 240 * 16 + 12 * 240**2 + 40 * 150)
    build_pools(views, labels, 32, neighbours=5, hard_pairs=150, block_rows=10**6, pilot_rows=32)
