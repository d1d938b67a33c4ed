"""Crash-safe pieces of the teacher cache writer: fixed-range shard files, their manifest, the final merge.

Work is split into fixed row ranges. Each shard is written to `shard-00012.h5.tmp-<pid>-<random>` and renamed to
`shard-00012.h5` only once complete, so any `shard-*.h5` that validates can be trusted after a crash. The
final cache is always assembled from scratch, in order, from the shards: the merge adds nothing that depends
on which runs, workers or interruptions produced them (what the shards' own bytes depend on: build.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.cache.contract import (
    DATASETS,
    VIEW_NAMES,
    is_marked_complete,
    mark_complete,
    write_attrs,
)
from pipeline.errors import DataError
from pipeline.storage.hdf5 import open_hdf5, write_hdf5
from pipeline.storage.io import array_sha256, remove_tree, write_text_atomic

MANIFEST = "manifest.json"
SHARD_META = ("teacher_fingerprint", "dataset_fingerprint", "dim", "dtype")  # what every shard must agree on


@dataclass(frozen=True)
class Shard:
    """One fixed row range `[start, stop)` and the file it goes to."""

    index: int
    start: int
    stop: int
    path: Path

    @property
    def rows(self) -> int:
        return self.stop - self.start


def shard_dir(out: Path) -> Path:
    """`data/cache.h5` -> `data/cache.h5.shards`."""
    return out.with_name(out.name + ".shards")


def plan_shards(folder: Path, rows: int, shard_size: int) -> list[Shard]:
    """Fixed ranges: shard i holds rows [i * shard_size, min((i + 1) * shard_size, rows))."""
    return [
        Shard(i, start, min(start + shard_size, rows), folder / f"shard-{i:05d}.h5")
        for i, start in enumerate(range(0, rows, shard_size))
    ]


def read_manifest(folder: Path) -> dict | None:
    """The shard folder's manifest, or None when there is none (or it cannot be read: start over)."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_manifest(folder: Path, manifest: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def remove_temporaries(folder: Path) -> int:
    """Delete half-written shard files left by killed runs; returns how many."""
    stale = list(folder.glob("shard-*.h5.tmp-*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def write_shard(shard: Shard, embeddings: np.ndarray, labels: np.ndarray, keys: np.ndarray, meta: dict) -> None:
    """Write one finished shard under a temporary name, mark it complete, fsync, rename into place."""
    expected = (shard.rows, len(VIEW_NAMES), int(meta["dim"]))
    if embeddings.shape != expected or embeddings.dtype.name != meta["dtype"]:
        raise ValueError(f"shard {shard.index}: embeddings {embeddings.shape} {embeddings.dtype}, expected {expected}")
    with write_hdf5(shard.path, data_bytes=embeddings.nbytes + 16 * shard.rows) as handle:
        handle.create_dataset("embeddings", data=embeddings, track_times=False)
        handle.create_dataset("labels", data=np.asarray(labels, np.int64), track_times=False)
        handle.create_dataset("keys", data=np.asarray(keys, np.int64), track_times=False)
        write_attrs(handle, {"start": shard.start, "stop": shard.stop, **{k: meta[k] for k in SHARD_META}})
        mark_complete(handle)


def shard_is_valid(shard: Shard, meta: dict) -> bool:
    """True if the shard file exists, is complete, covers its range and came from this teacher/dataset."""
    try:
        with open_hdf5(shard.path) as handle:
            attrs = handle.attrs
            return (
                is_marked_complete(handle)
                and int(attrs["start"]) == shard.start
                and int(attrs["stop"]) == shard.stop
                and all(_same(attrs[k], meta[k]) for k in SHARD_META)
                and handle["embeddings"].shape == (shard.rows, len(VIEW_NAMES), int(meta["dim"]))
                and handle["labels"].shape == handle["keys"].shape == (shard.rows,)
            )
    except (OSError, KeyError, DataError):  # missing, truncated, foreign or linking outside: redo it
        return False


def _same(stored, expected) -> bool:
    stored = stored.decode() if isinstance(stored, bytes) else stored
    return type(expected)(stored) == expected


def assemble(out: Path, shards: list[Shard], attrs: dict) -> None:
    """Concatenate complete shards into the final cache (see `write_cache`), in shard order.

    Always rebuilt from scratch in shard order, so the bytes are identical whatever happened before.
    """

    def parts():
        for shard in shards:
            with open_hdf5(shard.path) as part:
                yield shard.start, part["embeddings"][()], part["labels"][()], part["keys"][()]

    with contextlib.closing(parts()) as iterator:  # a failed write closes the shard being read at once
        write_cache(out, attrs, iterator)


def write_cache(out: Path, attrs: dict, parts: Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Write a teacher cache from `(start row, embeddings, labels, keys)` parts covering every row: into a
    temporary file, attributes in their fixed order, `complete` last, then renamed to `out`.

    `embeddings` is stored contiguous and uncompressed (the HDF5 default layout) with no timestamps: the same
    parts give the same bytes, and the array can be memory-mapped at its file offset (`cache/mapped.py`).
    """
    rows, dim, dtype = int(attrs["rows"]), int(attrs["dim"]), attrs["dtype"]
    data_bytes = rows * (len(VIEW_NAMES) * dim * np.dtype(dtype).itemsize + 16)
    with write_hdf5(out, data_bytes=data_bytes, track_order=True) as handle:  # attribute order: `complete` last
        embeddings = handle.create_dataset(
            "embeddings", shape=(rows, len(VIEW_NAMES), dim), dtype=dtype, track_times=False
        )
        labels = handle.create_dataset("labels", shape=(rows,), dtype=np.int64, track_times=False)
        keys = handle.create_dataset("keys", shape=(rows,), dtype=np.int64, track_times=False)
        targets = {"embeddings": embeddings, "labels": labels, "keys": keys}
        digests = {name: hashlib.sha256() for name in DATASETS}
        for start, *arrays in parts:
            stop = start + len(arrays[0])
            for name, array in zip(DATASETS, arrays):
                values = np.ascontiguousarray(array, dtype=targets[name].dtype)
                targets[name][start:stop] = values
                array_sha256(values, digest=digests[name])
        write_attrs(handle, {**attrs, **{f"{name}_sha256": digests[name].hexdigest() for name in DATASETS}})
        mark_complete(handle)


def remove_shard_dir(folder: Path) -> None:
    remove_tree(folder, "shards")
