"""The teacher-cache reader and the shard/merge pieces, on HDF5 files written by hand with h5py."""
import hashlib
import json
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import h5py
import numpy as np
import pytest
from helpers.data import DATASET_FP, TEACHER_FP, sha256_of, write_cache_by_hand

from pipeline.cache.contract import contract_attrs
from pipeline.cache.format import TeacherCache
from pipeline.cache.shards import (
    Shard,
    assemble,
    plan_shards,
    shard_is_valid,
    write_shard,
)
from pipeline.errors import DataError, PipelineError


def test_open_exposes_the_contract(tmp_path):
    embeddings, labels, keys = write_cache_by_hand(tmp_path / "c.h5")
    cache = TeacherCache.open(tmp_path / "c.h5")
    assert (len(cache), cache.dim, cache.views, cache.dtype) == (50, 8, 2, "float16")
    assert cache.view_names == ("original", "flipped")
    assert cache.teacher_fingerprint == TEACHER_FP and cache.dataset_fingerprint == DATASET_FP
    assert cache.preprocessing == {"size": 112, "mean": 0.5, "std": 0.5, "flip": "horizontal"}
    np.testing.assert_array_equal(cache.labels, labels)
    np.testing.assert_array_equal(cache.keys, keys)
    np.testing.assert_array_equal(cache.embeddings(), embeddings.astype(np.float32))


def test_contract_attrs_match_the_documented_names():
    attrs = contract_attrs(teacher_fingerprint=TEACHER_FP, teacher_name="r18", dataset_fingerprint=DATASET_FP,
                           preprocessing={"size": 112}, rows=3, dim=8, dtype="float16")
    assert attrs["views"] == 2 and json.loads(attrs["view_names"]) == ["original", "flipped"]
    assert {"teacher_fingerprint", "dataset_fingerprint", "preprocessing", "dim", "views", "format_version",
            "dtype"} <= set(attrs) and "complete" not in attrs
    with pytest.raises(PipelineError, match="bfloat16"):
        contract_attrs(teacher_fingerprint="t", teacher_name="x", dataset_fingerprint="d", preprocessing={},
                       rows=1, dim=1, dtype="bfloat16")


def test_embeddings_gather_views(tmp_path):
    embeddings, _, _ = write_cache_by_hand(tmp_path / "c.h5")
    cache = TeacherCache.open(tmp_path / "c.h5")
    reference = embeddings.astype(np.float32)
    got = cache.embeddings([7, 3, 7, 0], views=(1,))
    np.testing.assert_array_equal(got, reference[[7, 3, 7, 0]][:, [1]])
    np.testing.assert_array_equal(cache.embeddings([4, 9], views=(0, 1)), reference[[4, 9]])
    with pytest.raises(PipelineError, match="out of range"):
        cache.embeddings([50])
    with pytest.raises(PipelineError, match="views"):
        cache.embeddings([0], views=(2,))


def test_sparse_reads_and_ram_copy_agree(tmp_path):
    # 3000 rows: rows 0 and 2999 alone are too sparse for one slab, the point-read path is taken.
    embeddings, _, _ = write_cache_by_hand(tmp_path / "c.h5", rows=3000, dim=4)
    cache = TeacherCache.open(tmp_path / "c.h5")
    rows = [2999, 0, 1500, 0]
    np.testing.assert_array_equal(cache.embeddings(rows), embeddings[rows].astype(np.float32))
    assert cache.load_all(max_bytes=10) is False  # does not fit: stays on disk
    assert cache.load_all() is True
    np.testing.assert_array_equal(cache.embeddings(rows), embeddings[rows].astype(np.float32))
    tensor = cache.to_torch(views=(1,))
    assert tensor.dtype.itemsize == 2 and tuple(tensor.shape) == (3000, 1, 4)
    np.testing.assert_array_equal(tensor.numpy(), embeddings[:, [1]])


def _read_rows_in_child(cache, rows):
    return cache.embeddings(rows)


def test_cache_survives_pickling_and_fork(tmp_path):
    embeddings, _, _ = write_cache_by_hand(tmp_path / "c.h5")
    cache = TeacherCache.open(tmp_path / "c.h5")
    cache.embeddings([1])  # the parent's h5py handle is now open
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone.embeddings([2, 3]), embeddings[[2, 3]].astype(np.float32))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        got = pool.submit(_read_rows_in_child, cache, [5, 6]).result()
    np.testing.assert_array_equal(got, embeddings[[5, 6]].astype(np.float32))


def test_summary_norms_match_brute_force(tmp_path):
    embeddings, _, _ = write_cache_by_hand(tmp_path / "c.h5", rows=40)
    summary = TeacherCache.open(tmp_path / "c.h5").summary(sample=1000)
    norms = np.linalg.norm(embeddings.astype(np.float32), axis=-1)
    for view, name in enumerate(["original", "flipped"]):
        stats = summary["norms"][name]
        assert stats["min"] == pytest.approx(norms[:, view].min())
        assert stats["mean"] == pytest.approx(norms[:, view].mean())
        assert stats["max"] == pytest.approx(norms[:, view].max())
    assert (summary["rows"], summary["dim"], summary["dtype"], summary["classes"]) == (40, 8, "float16", 8)
    assert summary["teacher"]["fingerprint"] == TEACHER_FP and summary["complete"] is True


@pytest.mark.parametrize(
    "mutation, error, words",
    [
        ({"complete": False}, PipelineError, "incomplete"),
        ({"complete": None}, PipelineError, "incomplete"),
        ({"complete": "no"}, PipelineError, "incomplete"),  # a truthy string is not the mark
        ({"skip_attr": "dataset_fingerprint"}, DataError, "dataset_fingerprint"),
    ],
)
def test_open_refuses_broken_caches(tmp_path, mutation, error, words):
    write_cache_by_hand(tmp_path / "c.h5", **mutation)
    with pytest.raises(error, match=words) as info:
        TeacherCache.open(tmp_path / "c.h5")
    assert "c.h5" in str(info.value)


def test_open_refuses_missing_garbage_and_inconsistent_files(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        TeacherCache.open(tmp_path / "absent.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="junk.h5"):
        TeacherCache.open(tmp_path / "junk.h5")
    write_cache_by_hand(tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5", "a") as f:
        f.attrs["dim"] = 16  # the array is (50, 2, 8)
    with pytest.raises(DataError, match="shape"):
        TeacherCache.open(tmp_path / "c.h5")


@pytest.mark.parametrize("column", ["labels", "keys"])
def test_an_edited_label_or_key_column_is_refused(tmp_path, column):
    """Shifted labels (or keys) no longer match the checksum written with them."""
    _, labels, keys = write_cache_by_hand(tmp_path / "c.h5")
    shifted = np.roll(labels if column == "labels" else keys, 1)
    with h5py.File(tmp_path / "c.h5", "a") as f:
        f[column][...] = shifted
    with pytest.raises(DataError, match=rf"c\.h5: dataset '{column}' does not match its checksum"):
        TeacherCache.open(tmp_path / "c.h5")


def test_check_compatible_prints_both_fingerprints(tmp_path):
    write_cache_by_hand(tmp_path / "c.h5")
    cache = TeacherCache.open(tmp_path / "c.h5")
    cache.check_compatible(TEACHER_FP, DATASET_FP)
    with pytest.raises(PipelineError) as info:
        cache.check_compatible("c" * 64, DATASET_FP)
    message = str(info.value)
    assert TEACHER_FP in message and "c" * 64 in message and "--overwrite" in message
    with pytest.raises(PipelineError, match="d" * 64):
        cache.check_compatible(TEACHER_FP, "d" * 64)


# ------------------------------------------------------------------------------------------- shards / merge
META = {"teacher_fingerprint": TEACHER_FP, "dataset_fingerprint": DATASET_FP, "dim": 4, "dtype": "float16"}


def _shard_payload(shard, seed):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(shard.rows, 2, 4)).astype(np.float16)
    return emb, np.arange(shard.start, shard.stop) // 3, np.arange(shard.start, shard.stop) + 100


def test_plan_shards_covers_rows_in_fixed_ranges(tmp_path):
    shards = plan_shards(tmp_path, rows=10, shard_size=4)
    assert [(s.start, s.stop) for s in shards] == [(0, 4), (4, 8), (8, 10)]
    assert shards[1].path == tmp_path / "shard-00001.h5"


def test_shard_validation(tmp_path):
    shard = Shard(0, 0, 5, tmp_path / "shard-00000.h5")
    write_shard(shard, *_shard_payload(shard, 0), META)
    assert shard_is_valid(shard, META)
    assert not list(tmp_path.glob("*.tmp-*"))  # the temporary was renamed, not left behind
    assert not shard_is_valid(shard, {**META, "teacher_fingerprint": "e" * 64})
    assert not shard_is_valid(Shard(0, 0, 6, shard.path), META)  # different range
    data = shard.path.read_bytes()
    shard.path.write_bytes(data[: len(data) // 2])  # truncated (e.g. a disk filling up)
    assert not shard_is_valid(shard, META)
    assert not shard_is_valid(Shard(1, 5, 10, tmp_path / "shard-00001.h5"), META)  # missing


def test_assemble_concatenates_deterministically_with_complete_last(tmp_path):
    shards = plan_shards(tmp_path, rows=11, shard_size=4)
    payloads = [_shard_payload(s, s.index) for s in shards]
    for shard, payload in zip(shards, payloads):
        write_shard(shard, *payload, META)
    attrs = contract_attrs(teacher_fingerprint=TEACHER_FP, teacher_name="r18", dataset_fingerprint=DATASET_FP,
                           preprocessing={"size": 112}, rows=11, dim=4, dtype="float16")
    assemble(tmp_path / "a.h5", shards, attrs)
    assemble(tmp_path / "b.h5", shards, attrs)
    digests = {hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.h5", "b.h5")}
    assert len(digests) == 1
    cache = TeacherCache.open(tmp_path / "a.h5")
    np.testing.assert_array_equal(cache.embeddings(), np.concatenate([p[0] for p in payloads]).astype(np.float32))
    assert cache.shareable  # what training memory-maps: contiguous, uncompressed
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert f["embeddings"].chunks is None and f["embeddings"].compression is None
    np.testing.assert_array_equal(cache.keys, np.arange(11) + 100)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert list(f.attrs)[-1] == "complete"  # creation order is tracked in the final file
        for name in ("embeddings", "labels", "keys"):  # the checksums, against a direct re-computation
            assert f.attrs[f"{name}_sha256"] == sha256_of(f[name][()])
