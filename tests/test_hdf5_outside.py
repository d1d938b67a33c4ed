"""HDF5 files that reach outside themselves (an external link, external raw-data storage, a virtual dataset),
written with h5py, are refused by every reader of the pipeline: the teacher cache (cache-info, build-pools),
pools.h5, a shard, the IJB feature file; the file they point at is never read."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers.data import write_cache_by_hand
from helpers.processes import error_line

from pipeline.cache.shards import Shard, shard_is_valid
from pipeline.errors import DataError
from pipeline.evaluation.ijb_features import cached_features
from pipeline.storage.hdf5 import open_hdf5
from pipeline.search.pool_files import load_pools

ROWS, DIM = 50, 8


def point_embeddings_outside(path, kind, tmp_path):
    """Replace `embeddings` of the cache at `path` by one of the three ways of keeping its data elsewhere."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 200)  # an /etc/passwd stand-in
    with h5py.File(path, "a") as handle:
        shape, dtype = handle["embeddings"].shape, handle["embeddings"].dtype
        del handle["embeddings"]
        if kind == "external storage":
            handle.create_dataset("embeddings", shape=shape, dtype=dtype,
                                  external=[(str(outside), 0, int(np.prod(shape)) * dtype.itemsize)])
        elif kind == "external link":
            with h5py.File(tmp_path / "other.h5", "w") as other:
                other["embeddings"] = np.ones(shape, dtype)
            handle["embeddings"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/embeddings")
        else:
            with h5py.File(tmp_path / "other.h5", "w") as other:
                other["data"] = np.ones(shape, dtype)
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            layout[...] = h5py.VirtualSource(str(tmp_path / "other.h5"), "data", shape=shape)
            handle.create_virtual_dataset("embeddings", layout)


KINDS = ["external storage", "external link", "virtual dataset"]
WORDS = {"external storage": "stores its data in an external file", "external link": "is an external link",
         "virtual dataset": "is a virtual dataset"}


@pytest.mark.parametrize("kind", KINDS)
def test_a_cache_keeping_its_embeddings_elsewhere_is_refused_by_every_command(tmp_path, cli, kind):
    path = tmp_path / "teacher.h5"
    write_cache_by_hand(path, rows=ROWS, dim=DIM)
    point_embeddings_outside(path, kind, tmp_path)
    for command in (["cache-info", path], ["build-pools", "--cache", path, "--out", tmp_path / "pools"],
                    ["convert-cache", path, "--out", tmp_path / "converted.h5"]):
        result = cli(*command)
        assert result.exit_code == 2, result.output
        line = error_line(result.output)
        assert line.startswith(f"error: {path}: ") and WORDS[kind] in line, line
    assert not (tmp_path / "pools" / "thresholds.json").exists() and not (tmp_path / "converted.h5").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_pools_shards_and_feature_files_keeping_data_elsewhere_are_refused(tmp_path, kind):
    path = tmp_path / "any.h5"
    write_cache_by_hand(path, rows=ROWS, dim=DIM)
    point_embeddings_outside(path, kind, tmp_path)
    with pytest.raises(DataError, match=WORDS[kind]):
        open_hdf5(path).close()
    with pytest.raises(DataError, match=WORDS[kind]):
        load_pools(path)  # the pools reader opens through the same check before looking at its contents
    shard = Shard(0, 0, ROWS, path)
    assert not shard_is_valid(shard, {"teacher_fingerprint": "x", "dataset_fingerprint": "y", "dim": DIM,
                                      "dtype": "float16"})
    features = tmp_path / "features.h5"
    with h5py.File(features, "w") as handle:
        handle["features"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/data")
        handle.attrs["complete"] = True
    assert not cached_features(features, {}, ROWS)  # recomputed and replaced, never read


def test_a_soft_link_inside_the_file_is_fine(tmp_path):
    path = tmp_path / "teacher.h5"
    write_cache_by_hand(path, rows=ROWS, dim=DIM)
    with h5py.File(path, "a") as handle:
        handle["alias"] = h5py.SoftLink("/labels")
    open_hdf5(path).close()
