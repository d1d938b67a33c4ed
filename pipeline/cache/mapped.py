"""The cache's embeddings memory-mapped at their file offset: one copy per machine, shared by every process.

extract-teacher writes `embeddings` contiguous and uncompressed, so its bytes lie in one run of the HDF5 file
at `Dataset.id.get_offset()` (absolute, a user block included). Mapped read-only (MAP_SHARED), every DDP
rank and DataLoader worker reads the same page-cache pages: nothing is copied per process, and the values
are the bytes HDF5 itself returns (checked on sample rows whenever an array is mapped).

Embeddings stored chunked, compressed, in external files or in a foreign byte order cannot be mapped: they
are read into each process's RAM as before, and `pipeline convert-cache` rewrites them contiguous once.

Refused with a DataError naming the file, never read as zeros: storage that was never written (HDF5 would
return its fill value), storage whose size disagrees with the shape and dtype, a file shorter than the
mapped range (truncated), and a mapping that reads other bytes than HDF5 does.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from pipeline.errors import DataError

VERIFIED_ROWS = 8  # rows compared between the mapping and HDF5 (first, last and spread between)
REBUILD = "rerun `pipeline extract-teacher --overwrite`"


def convert_hint(path: Path) -> str:
    return f"run `pipeline convert-cache {path}` once to share one copy per machine"


@dataclass(frozen=True)
class Layout:
    """Where the embeddings' bytes are: `offset` in the file when they can be mapped, else None and why."""

    offset: int | None
    reason: str = ""

    @property
    def mappable(self) -> bool:
        return self.offset is not None


def inspect_layout(path: Path, dataset: h5py.Dataset) -> Layout:
    """The layout of `embeddings`; DataError when part of its storage was never written or has the wrong size."""
    plist = dataset.id.get_create_plist()
    kind = plist.get_layout()
    if kind == h5py.h5d.CHUNKED:
        _check_chunks_written(path, dataset)
        filters = f", {dataset.compression} compressed" if dataset.compression else ""
        return Layout(None, f"stored in chunks of {dataset.chunks}{filters}")
    if kind == h5py.h5d.COMPACT:
        return Layout(None, "stored compact (inside the file's metadata)")
    if plist.get_external_count():
        return Layout(None, "stored in external files")
    needed = math.prod(dataset.shape) * dataset.dtype.itemsize
    offset, stored = dataset.id.get_offset(), dataset.id.get_storage_size()
    if needed and (offset is None or stored == 0):
        raise DataError(f"{path}: dataset 'embeddings' was never written (HDF5 would read it as zeros); {REBUILD}")
    if stored != needed:
        raise DataError(f"{path}: dataset 'embeddings' has {stored} bytes of storage but its shape {dataset.shape} "
                        f"and dtype {dataset.dtype} need {needed}; {REBUILD}")
    if not dataset.dtype.isnative:
        return Layout(None, f"stored in non-native byte order ({dataset.dtype.str})")
    if not needed:
        return Layout(None, "empty")
    return Layout(int(offset))


def _check_chunks_written(path: Path, dataset: h5py.Dataset) -> None:
    """Chunks that were never written read as the fill value (zeros): refuse a cache missing any."""
    expected = math.prod(math.ceil(n / c) for n, c in zip(dataset.shape, dataset.chunks))
    written = dataset.id.get_num_chunks()
    if written < expected:
        raise DataError(f"{path}: dataset 'embeddings' has {written} of its {expected} chunks written (the rest "
                        f"would read as zeros); {REBUILD}")


def map_embeddings(path: Path, offset: int, shape: tuple[int, ...], dtype: str,
                   read_rows: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The stored array, memory-mapped read-only at `offset` of `path`.

    `read_rows(rows)` reads sorted rows through HDF5: the mapping must return the same bytes for a sample of
    rows (DataError otherwise). DataError when the file is shorter than the mapped range.
    """
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if offset + nbytes > size:
            raise DataError(f"{path}: truncated: the embeddings occupy bytes {offset}..{offset + nbytes} but the "
                            f"file has {size} bytes; {REBUILD}")
        mapped = np.memmap(handle, mode="r", dtype=np.dtype(dtype), offset=offset, shape=tuple(shape))
    rows = np.unique(np.linspace(0, shape[0] - 1, num=min(VERIFIED_ROWS, shape[0])).astype(np.int64))
    expected = np.ascontiguousarray(read_rows(rows))
    got = np.ascontiguousarray(mapped[rows])
    if got.tobytes() != expected.tobytes():
        first = next(int(r) for r, a, b in zip(rows, got, expected) if a.tobytes() != b.tobytes())
        raise DataError(f"{path}: embeddings mapped at file offset {offset} differ from what HDF5 reads at row "
                        f"{first}: the file's layout metadata is inconsistent; {REBUILD}")
    return mapped
