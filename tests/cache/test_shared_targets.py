"""One copy of the teacher targets per machine: the cache's embeddings memory-mapped at their file offset.

References: caches written by hand with h5py (helpers.data.write_cache_by_hand), the kernel's own list of a
process's mappings (/proc/PID/maps) and HDF5's reads. Refusals of caches that would read as zeros or read
wrong bytes; older chunked caches read into RAM as before, with the way to convert them, and the conversion.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
from concurrent.futures import ProcessPoolExecutor

import h5py
import numpy as np
import pytest
import torch
from helpers.data import write_cache_by_hand

from pipeline.cache.format import TeacherCache
from pipeline.cache.mapped import map_embeddings
from pipeline.errors import DataError, PipelineError
from pipeline.training.distill import CachedTargets

CHUNKED = {"chunks": (7, 2, 8), "compression": "gzip"}


def file_mapping_of(address: int, pid: int | str = "self") -> str | None:
    """The file mapped at `address` in process `pid`, as the kernel lists it (None: anonymous memory)."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) == 6 and fields[5].startswith("/") else None
    return None


def lookups(table: torch.Tensor, rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    indices, flips = torch.randint(0, rows, (64,), generator=g), torch.rand(64, generator=g) < 0.5
    return CachedTargets(table)(None, indices, flips, torch.device("cpu")), indices, flips


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_mapped_targets_are_the_written_bytes_and_equal_the_ram_copy(tmp_path, dtype):
    path = tmp_path / "c.h5"
    embeddings, _, _ = write_cache_by_hand(path, rows=3000, dim=8, dtype=dtype)
    cache = TeacherCache.open(path)
    assert cache.shareable
    shared = cache.to_torch()
    assert file_mapping_of(shared.data_ptr()) == str(path.resolve())  # the file's pages, not a RAM copy
    in_ram = TeacherCache.open(path).to_torch(shared=False)
    assert file_mapping_of(in_ram.data_ptr()) is None
    assert shared.numpy().tobytes() == embeddings.tobytes() == in_ram.numpy().tobytes()
    got, indices, flips = lookups(shared, 3000)
    expected, _, _ = lookups(in_ram, 3000)
    assert got.numpy().tobytes() == expected.numpy().tobytes()
    np.testing.assert_array_equal(got.numpy(), embeddings[indices.numpy(), flips.long().numpy()].astype(np.float32))
    np.testing.assert_array_equal(cache.embeddings([2999, 0, 7]), embeddings[[2999, 0, 7]].astype(np.float32))


def test_a_user_block_before_the_hdf5_data_is_accounted_for(tmp_path):
    embeddings, _, _ = write_cache_by_hand(tmp_path / "c.h5", userblock_size=1024)
    assert TeacherCache.open(tmp_path / "c.h5").to_torch().numpy().tobytes() == embeddings.tobytes()


def _map_in_child(cache, rows):
    table = cache.to_torch()
    return file_mapping_of(table.data_ptr()), table[rows].numpy()


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_other_processes_map_the_same_file(tmp_path, start):
    """A pickled or forked cache maps the file again in the other process (DataLoader workers, DDP ranks)."""
    path = tmp_path / "c.h5"
    embeddings, _, _ = write_cache_by_hand(path, rows=200)
    cache = TeacherCache.open(path)
    cache.to_torch()  # mapped in the parent
    assert pickle.loads(pickle.dumps(cache))._mapped is None  # the mapping is not shipped
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(start)) as pool:
        mapping, rows = pool.submit(_map_in_child, cache, [5, 199]).result()
    assert mapping == str(path.resolve())
    np.testing.assert_array_equal(rows, embeddings[[5, 199]])


# --------------------------------------------------------------------------------------- older chunked caches
def test_chunked_cache_is_read_into_ram_with_the_way_to_convert(tmp_path):
    path = tmp_path / "old.h5"
    embeddings, _, _ = write_cache_by_hand(path, rows=60, layout=CHUNKED)
    cache = TeacherCache.open(path)
    assert not cache.shareable
    messages = []
    table = cache.to_torch(log=messages.append)
    assert table.numpy().tobytes() == embeddings.tobytes()
    [message] = messages
    assert str(path) in message and "chunks" in message and f"pipeline convert-cache {path}" in message
    with pytest.raises(PipelineError, match="convert-cache"):
        TeacherCache.open(path).mapped()
    assert TeacherCache.open(path).summary()["layout"]["memory_mapped"] is False


def test_convert_cache_rewrites_it_contiguous_with_the_same_content(tmp_path, cli):
    path = tmp_path / "old.h5"
    # more rows than one streaming read (READ_ROWS): the copy goes block by block
    embeddings, labels, keys = write_cache_by_hand(path, rows=70000, dim=4,
                                                   layout={"chunks": (4096, 2, 4), "compression": "gzip"})
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
    result = cli("convert-cache", path, "--out", tmp_path / "new.h5")
    assert result.exit_code == 0, result.output
    assert TeacherCache.open(path).shareable is False  # --out leaves the original alone
    result = cli("convert-cache", path)
    assert result.exit_code == 0, result.output
    for converted in (path, tmp_path / "new.h5"):
        with h5py.File(converted, "r") as f:
            assert f["embeddings"].chunks is None and f["embeddings"].compression is None
            assert f["embeddings"][()].tobytes() == embeddings.tobytes()
            np.testing.assert_array_equal(f["labels"][()], labels)
            np.testing.assert_array_equal(f["keys"][()], keys)
            assert dict(f.attrs) == attrs and list(f.attrs)[-1] == "complete"
        cache = TeacherCache.open(converted)
        assert cache.shareable and cache.to_torch().numpy().tobytes() == embeddings.tobytes()
    assert "nothing to do" in cli("convert-cache", path).output
    assert not list(tmp_path.glob("*.tmp-*"))


# ------------------------------------------------------------------------------------------------ bad input
def one_line_refusal(path, action, match):
    with pytest.raises(DataError, match=match) as info:
        action()
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_embeddings_never_written_are_refused_not_read_as_zeros(tmp_path):
    path = tmp_path / "c.h5"
    write_cache_by_hand(path, written=False)
    with h5py.File(path, "r") as f:
        assert not f["embeddings"][()].any()  # what HDF5 alone would hand out: zeros
    one_line_refusal(path, lambda: TeacherCache.open(path), "never written")


def test_chunked_cache_with_missing_chunks_is_refused(tmp_path):
    path = tmp_path / "c.h5"
    write_cache_by_hand(path, rows=60, written=False, layout={"chunks": (10, 2, 8)})
    with h5py.File(path, "a") as f:
        f["embeddings"][:20] = 1.0  # 2 of the 6 chunks
    one_line_refusal(path, lambda: TeacherCache.open(path), "2 of its 6 chunks")


def test_truncated_caches_are_refused(tmp_path):
    path = tmp_path / "c.h5"
    embeddings, _, _ = write_cache_by_hand(path, rows=3000)
    cache = TeacherCache.open(path)  # metadata read while the file was whole (another rank, say)
    os.truncate(path, cache.layout.offset + embeddings.nbytes // 2)  # a copy cut off in the middle
    one_line_refusal(path, cache.mapped, "truncated")
    one_line_refusal(path, lambda: TeacherCache.open(path), "truncated")  # HDF5's own end-of-file check


def test_a_mapping_that_disagrees_with_hdf5_is_refused(tmp_path):
    """The offset check: bytes mapped at another offset than HDF5's are caught by the sample-row comparison."""
    path = tmp_path / "c.h5"
    embeddings, _, _ = write_cache_by_hand(path, rows=100)
    cache = TeacherCache.open(path)
    right = map_embeddings(path, cache.layout.offset, embeddings.shape, "float16", cache._read_hdf5_rows)
    assert right.tobytes() == embeddings.tobytes()
    message = one_line_refusal(path, lambda: map_embeddings(path, cache.layout.offset + 2, embeddings.shape,
                                                            "float16", cache._read_hdf5_rows), "differ")
    assert "row 0" in message
