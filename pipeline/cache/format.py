"""The validating reader of the teacher-embedding cache (HDF5); the on-disk contract is `contract.py`.

Opening checks the labels and keys against their checksums (an edited or shifted label column is refused),
and the embeddings against theirs once per version of the file (`verify.py`); the checksums are part of the
cache's `fingerprint`. The writer lives in `shards.py` / `build.py`.

`embeddings` is written contiguous and uncompressed, so training processes map it at its file offset and
share one copy per machine (`mapped.py`, `TeacherCache.to_torch`); chunked caches are read into RAM.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np

from pipeline.cache.contract import (
    CONTRACT_ATTRS,
    DATASETS,
    FORMAT_VERSION,
    READ_ROWS,
    is_marked_complete,
)
from pipeline.cache.mapped import Layout, convert_hint, inspect_layout, map_embeddings
from pipeline.cache.verify import verify_embeddings
from pipeline.errors import DataError, PipelineError
from pipeline.machine.resources import available_memory
from pipeline.storage.hdf5 import open_artifact
from pipeline.storage.io import array_sha256, refuse_mismatch


def _plain(value):
    """h5py attribute values as plain Python values."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


class TeacherCache:
    """A validated, read-only teacher cache. Safe to pass to DataLoader workers (reopens per process).

    Use `TeacherCache.open(path)`; `to_torch()` gives the training targets (memory-mapped: one copy per
    machine), `load_all()` keeps the whole array in this process's RAM when it fits.
    """

    def __init__(self, path: Path, attrs: dict):
        self.path = Path(path)
        self.attrs = attrs
        self.labels: np.ndarray = np.empty(0, np.int64)
        self.keys: np.ndarray = np.empty(0, np.int64)
        self._handle: h5py.File | None = None
        self._pid: int | None = None
        self._memory: np.ndarray | None = None
        self._finite = False  # the training targets were checked for NaN/inf
        self._mapped: np.ndarray | None = None
        self.layout = Layout(None, "not inspected")

    # ------------------------------------------------------------------ opening and validation
    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True, recheck: bool = False) -> "TeacherCache":
        """Open and validate `path`; PipelineError/DataError naming the file if it breaks the contract.

        `verify`: the embeddings checksum too (`verify.py`: read once per version of the file, remembered;
        `recheck` reads it even when remembered)."""
        path = Path(path)
        with open_artifact(path, "teacher cache", "extract-teacher") as handle:
            missing = [name for name in DATASETS if name not in handle]
            missing += [f"attribute {name!r}" for name in CONTRACT_ATTRS if name not in handle.attrs]
            if missing:
                raise DataError(f"{path}: not a teacher cache, missing {', '.join(missing)}")
            if not is_marked_complete(handle):
                raise PipelineError(
                    f"{path}: teacher cache is incomplete (interrupted write?); rerun `pipeline extract-teacher`"
                )
            attrs = {name: _plain(handle.attrs[name]) for name in CONTRACT_ATTRS}
            cache = cls(path, attrs)
            cache._validate_shapes(handle)
            cache.layout = inspect_layout(path, handle["embeddings"])
            cache.labels = handle["labels"][()].astype(np.int64, copy=False)
            cache.keys = handle["keys"][()].astype(np.int64, copy=False)
        for name in ("labels", "keys"):
            if array_sha256(getattr(cache, name)) != attrs[f"{name}_sha256"]:
                raise cache.checksum_error(name)
        if verify:
            try:
                verify_embeddings(cache, recheck=recheck)
            finally:
                cache.close()  # the handle the streaming read opened: reopened per process when needed
        return cache

    def checksum_error(self, name: str) -> DataError:
        return DataError(f"{self.path}: dataset {name!r} does not match its checksum (edited or corrupted); "
                         "rebuild it with `pipeline extract-teacher --overwrite`")

    def _validate_shapes(self, handle: h5py.File) -> None:
        if self.attrs["format_version"] != FORMAT_VERSION:
            raise DataError(
                f"{self.path}: teacher cache format version {self.attrs['format_version']}, "
                f"this code reads version {FORMAT_VERSION}; rebuild it with --overwrite"
            )
        rows, views, dim = self.attrs["rows"], self.attrs["views"], self.attrs["dim"]
        expected = {"embeddings": (rows, views, dim), "labels": (rows,), "keys": (rows,)}
        for name, shape in expected.items():
            if handle[name].shape != shape:
                raise DataError(f"{self.path}: dataset {name!r} has shape {handle[name].shape}, expected {shape}")
        stored = handle["embeddings"].dtype.name
        if stored != self.attrs["dtype"]:
            raise DataError(f"{self.path}: embeddings stored as {stored} but the attributes say {self.attrs['dtype']}")

    # ------------------------------------------------------------------ metadata
    def __len__(self) -> int:
        return int(self.attrs["rows"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def views(self) -> int:
        """Number of views per row (2: original, flipped)."""
        return int(self.attrs["views"])

    @property
    def view_names(self) -> tuple[str, ...]:
        return tuple(json.loads(self.attrs["view_names"]))

    @property
    def dtype(self) -> str:
        return str(self.attrs["dtype"])

    @property
    def teacher_fingerprint(self) -> str:
        return str(self.attrs["teacher_fingerprint"])

    @property
    def dataset_fingerprint(self) -> str:
        return str(self.attrs["dataset_fingerprint"])

    @property
    def preprocessing(self) -> dict:
        return json.loads(self.attrs["preprocessing"])

    @property
    def fingerprint(self) -> str:
        """sha256 over every contract attribute, the content checksums included: equal fingerprints, equal
        caches (what a student run and the pools built from the cache record)."""
        return hashlib.sha256(json.dumps(self.attrs, sort_keys=True).encode()).hexdigest()

    def check_rows(self, labels: np.ndarray, keys: np.ndarray, data: object) -> None:
        """DataError naming the first row whose label or record key differs from the training data's."""
        for name, mine, theirs in (("keys", self.keys, keys), ("labels", self.labels, labels)):
            theirs = np.asarray(theirs, dtype=np.int64)
            if mine.shape != theirs.shape:
                raise DataError(f"{self.path}: {mine.size} rows but {data} has {theirs.size} images")
            differ = np.flatnonzero(mine != theirs)
            if differ.size:
                row = int(differ[0])
                raise DataError(f"{self.path}: row {row} has {name[:-1]} {int(mine[row])} but {data} has "
                                f"{int(theirs[row])} ({differ.size} rows differ); rebuild it with "
                                "`pipeline extract-teacher --overwrite`")

    def check_compatible(self, teacher_fp: str, dataset_fp: str) -> None:
        """PipelineError printing both fingerprints unless the cache came from this teacher and dataset."""
        refuse_mismatch(self.path, self.attrs, {"teacher_fingerprint": teacher_fp, "dataset_fingerprint": dataset_fp},
                        "teacher cache does not match", "rerun `pipeline extract-teacher --overwrite` to rebuild it")

    # ------------------------------------------------------------------ reading
    def _embeddings_dataset(self) -> h5py.Dataset:
        """The HDF5 dataset, opened once per process (h5py handles must not cross a fork)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle = open_artifact(self.path, "teacher cache", "extract-teacher")
            self._pid = os.getpid()
        return self._handle["embeddings"]

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle, self._pid = None, None

    def __getstate__(self) -> dict:
        # Workers reopen the file themselves; the RAM copy is not shipped to them either.
        state = self.__dict__.copy()
        state.update(_handle=None, _pid=None, _memory=None, _mapped=None)
        return state

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        """Stored rows for sorted unique indices: one slab when they are dense, batched point reads otherwise."""
        if self._memory is not None or self._mapped is not None:
            return (self._memory if self._memory is not None else self._mapped)[rows]
        dataset = self._embeddings_dataset()
        if rows.size == 0:
            return np.empty((0,) + dataset.shape[1:], dataset.dtype)
        first, last = int(rows[0]), int(rows[-1])
        if last - first + 1 <= 2 * rows.size + 1024:
            return dataset[first : last + 1][rows - first]
        parts = [dataset[rows[i : i + 4096]] for i in range(0, rows.size, 4096)]
        return np.concatenate(parts)

    def stored_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of every view in the stored dtype (a streaming read; a copy)."""
        if self._memory is not None or self._mapped is not None:
            return np.array((self._memory if self._memory is not None else self._mapped)[start:stop])
        return self._embeddings_dataset()[start:stop]

    def embeddings(
        self,
        indices: Sequence[int] | np.ndarray | None = None,
        views: Sequence[int] = (0, 1),
    ) -> np.ndarray:
        """Raw float32 (n, len(views), D) for `indices` (any order, repeats allowed; None = all rows)."""
        views = list(views)
        if any(not 0 <= v < self.views for v in views):
            raise PipelineError(f"{self.path}: views {views} out of range (the cache has {self.views})")
        if indices is None:
            rows = np.arange(len(self), dtype=np.int64)
            gathered = self._read_sorted(rows) if self._memory is None else self._memory
        else:
            requested = np.asarray(indices, dtype=np.int64).reshape(-1)
            if requested.size and (requested.min() < 0 or requested.max() >= len(self)):
                raise PipelineError(f"{self.path}: row index out of range [0, {len(self)})")
            rows, inverse = np.unique(requested, return_inverse=True)
            gathered = self._read_sorted(rows)[inverse]
        return gathered[:, views, :].astype(np.float32)

    def nbytes(self) -> int:
        return len(self) * self.views * self.dim * np.dtype(self.dtype).itemsize

    def load_all(self, max_bytes: int | None = None) -> bool:
        """Keep the stored array in RAM if it fits in `max_bytes` (default: half the available memory).

        Returns True when the cache is now memory-resident; otherwise reads keep going to disk in chunks.
        """
        if self._memory is not None:
            return True
        if max_bytes is None:
            max_bytes = available_memory() // 2
        if self.nbytes() > max_bytes:
            return False
        dataset = self._embeddings_dataset()
        memory = np.empty(dataset.shape, dataset.dtype)
        for start in range(0, len(self), READ_ROWS):
            stop = min(start + READ_ROWS, len(self))
            dataset.read_direct(memory, np.s_[start:stop], np.s_[start:stop])
        self._memory = memory
        return True

    @property
    def shareable(self) -> bool:
        """True when the embeddings can be memory-mapped (contiguous, uncompressed: what extract-teacher writes)."""
        return self.layout.mappable

    def mapped(self) -> np.ndarray:
        """The stored (N, views, D) array memory-mapped read-only at its file offset: every process mapping it
        reads the same page-cache pages (one copy per machine). PipelineError when it cannot be mapped."""
        if self._mapped is None:
            if not self.shareable:
                raise PipelineError(f"{self.path}: embeddings are {self.layout.reason} and cannot be memory-mapped; "
                                    f"{convert_hint(self.path)}")
            shape = (len(self), self.views, self.dim)
            self._mapped = map_embeddings(self.path, self.layout.offset, shape, self.dtype, self._read_hdf5_rows)
        return self._mapped

    def _read_hdf5_rows(self, rows: np.ndarray) -> np.ndarray:
        return self._embeddings_dataset()[rows]

    def to_torch(self, views: Sequence[int] = (0, 1), max_bytes: int | None = None, shared: bool = True,
                 log: Callable[[str], None] | None = None):
        """The whole cache as a torch tensor (N, len(views), D) in the stored dtype (training targets).

        `shared` with every view of a contiguous cache: the memory-mapped array (`mapped()`), read-only, one
        copy per machine whatever the number of processes. Otherwise (a subset of views, `shared=False`, or a
        chunked cache, which `log` reports with the way to convert it) the array is read into this process's
        RAM, refused when larger than `max_bytes` (default: half the available memory). Either way a NaN/inf
        is a DataError naming its row and key (it would only surface later as a non-finite loss).
        """
        import torch

        every_view = list(views) == list(range(self.views))
        if shared and every_view and self.shareable:
            if not self._finite:
                self._check_finite(self.mapped())
                self._finite = True
            with warnings.catch_warnings():  # read-only on purpose: the targets are looked up, never written
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                return torch.from_numpy(self.mapped())
        if shared and every_view:
            (log or _to_stderr)(f"{self.path}: embeddings are {self.layout.reason}, so each process reads its own "
                                f"copy into RAM; {convert_hint(self.path)}")
        if not self.load_all(max_bytes=max_bytes):
            raise PipelineError(
                f"{self.path}: the teacher cache ({self.nbytes() / 2**30:.1f} GiB) does not fit in memory"
            )
        if not self._finite:
            self._check_finite(self._memory)
            self._finite = True
        views = list(views)
        if views == list(range(self._memory.shape[1])):
            return torch.from_numpy(self._memory)  # shares the RAM copy: no second 12 GB array at MS1M scale
        return torch.from_numpy(np.ascontiguousarray(self._memory[:, views, :]))

    def _check_finite(self, array: np.ndarray) -> None:
        for start in range(0, len(self), READ_ROWS):
            chunk = array[start : start + READ_ROWS]
            bad = ~np.isfinite(chunk).reshape(chunk.shape[0], -1).all(axis=1)
            if bad.any():
                row = start + int(np.flatnonzero(bad)[0])
                raise DataError(f"{self.path}: embedding row {row} (key {int(self.keys[row])}) contains NaN or "
                                "inf; rebuild it with `pipeline extract-teacher --overwrite`")

    def summary(self, sample: int = 4096) -> dict:
        """What `pipeline cache-info` prints: shape, provenance and L2-norm statistics on a row sample."""
        rows = np.unique(np.linspace(0, len(self) - 1, num=min(sample, len(self))).astype(np.int64))
        norms = np.linalg.norm(self.embeddings(rows), axis=-1) if rows.size else np.empty((0, self.views))
        stats = {
            name: {"min": float(norms[:, v].min()), "mean": float(norms[:, v].mean()), "max": float(norms[:, v].max())}
            for v, name in enumerate(self.view_names)
            if rows.size
        }
        return {
            "path": str(self.path),
            "complete": True,
            "rows": len(self),
            "views": list(self.view_names),
            "dim": self.dim,
            "dtype": self.dtype,
            "bytes": self.nbytes(),
            "classes": int(np.unique(self.labels).size),
            "teacher": {"name": self.attrs["teacher_name"], "fingerprint": self.teacher_fingerprint},
            "dataset": {"fingerprint": self.dataset_fingerprint},
            "preprocessing": self.preprocessing,
            "format_version": self.attrs["format_version"],
            "layout": ({"memory_mapped": True, "offset": self.layout.offset} if self.shareable else
                       {"memory_mapped": False, "reason": self.layout.reason, "convert": convert_hint(self.path)}),
            "norms": {"sampled_rows": int(rows.size), **stats},
        }


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
