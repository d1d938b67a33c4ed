"""The shard worker: decode -> preprocess -> teacher forward (both views) -> write one shard file.

Decoding runs in a thread pool (Pillow releases the GIL; Dask workers are daemonic, so no child processes)
and the next batches are decoded while the current one runs through the teacher. Each batch is embedded in
one forward over [original; horizontally flipped] images. On CUDA the forward runs in fp16 autocast with
channels_last tensors. On CPU every forward runs with the job's fixed number of torch intra-op threads:
the float summation order of a convolution depends on it, so a fixed count makes the bytes the same in
this process and in any Dask worker.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.cache.shards import Shard, write_shard
from pipeline.errors import DataError, PipelineError
from pipeline.formats.source import open_face_source
from pipeline.models.preprocess import (  # noqa: F401  (re-exported: benchmarks, tests patch them here)
    forward_views,
    prepare_teacher,
    preprocess_views,
)

PREFETCH_BATCHES = 2  # batches being decoded while the current one is in the teacher
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to produce one shard (plain data: it travels to Dask workers)."""

    data: str
    teacher: str
    arch: str | None
    device: str  # "auto" | "cpu" | "cuda"; Dask workers map "cuda" to their own GPU
    batch_size: int
    decode_threads: int
    shard: Shard
    meta: dict  # teacher_fingerprint, dataset_fingerprint, dim, dtype: written into the shard
    threads: int = 1  # torch intra-op threads of every forward (the bytes depend on it)
    size_hint: int | None = None  # input size of a TorchScript/ONNX teacher that declares none

    @property
    def rows(self) -> int:
        return self.shard.rows


def default_decode_threads() -> int:
    return max(2, min(8, os.cpu_count() or 1))


def default_forward_threads() -> int:
    """min(4, this process's CPU cores): Dask's CPU default is one worker per 4 cores."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with `threads` torch intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- per process
_TEACHERS: dict = {}
_SOURCES: dict = {}
_POOLS: dict = {}


def cached_teacher(path: str, arch: str | None, device: str, fingerprint: str, size_hint: int | None = None):
    """The teacher, loaded once per process; PipelineError if the file no longer has `fingerprint`."""
    from pipeline.models.loading import load_embedder

    key = (path, arch, device, size_hint)
    teacher = _TEACHERS.get(key)
    if teacher is None or teacher.fingerprint != fingerprint:
        teacher = prepare_teacher(load_embedder(path, arch=arch, device=device, size_hint=size_hint))
        _TEACHERS[key] = teacher
    if teacher.fingerprint != fingerprint:
        raise PipelineError(
            f"{path}: teacher file changed during extraction (sha256 {teacher.fingerprint}, expected {fingerprint})"
        )
    return teacher


def cached_source(path: str, fingerprint: str):
    """The face source, opened once per process (reopened if its index changed since); checked against
    `fingerprint`."""
    source = _SOURCES.get(path)
    if source is None or source.fingerprint() != fingerprint:
        source = _SOURCES[path] = open_face_source(path)
    if source.fingerprint() != fingerprint:
        raise PipelineError(f"{path}: dataset changed during extraction (fingerprint {source.fingerprint()}, "
                            f"expected {fingerprint})")
    return source


def decode_pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="ekd-decode")
    return _POOLS[threads]


# ---------------------------------------------------------------------------------------------- decoding
class BatchDecoder:
    """Decodes rows of a face source in a thread pool (sources read with os.pread or per-file: thread-safe)."""

    def __init__(self, source, pool: ThreadPoolExecutor, expected_hw: tuple[int, int], where: str):
        self.source, self.pool, self.expected_hw, self.where = source, pool, expected_hw, where
        if len(source):
            source.read(0)  # open the lazily opened file handle here rather than racing in the pool

    def _one(self, row: int) -> np.ndarray:
        image = self.source.decode(row)
        if image.shape != (*self.expected_hw, 3):
            raise DataError(f"{self.where} record key {int(self.source.keys[row])}: image is "
                            f"{image.shape[1]}x{image.shape[0]}, the teacher expects {self.expected_hw[1]}x"
                            f"{self.expected_hw[0]} (resize the dataset first)")
        return image

    def submit(self, rows: range) -> list[Future]:
        return [self.pool.submit(self._one, row) for row in rows]

    @staticmethod
    def collect(futures: list[Future]) -> np.ndarray:
        return np.stack([future.result() for future in futures])


# ---------------------------------------------------------------------------------------------- forward
def check_finite(embeddings: np.ndarray, keys: np.ndarray, where: str) -> None:
    """PipelineError naming the record keys whose teacher output holds NaN or inf."""
    bad = ~np.isfinite(embeddings).reshape(len(embeddings), -1).all(axis=1)
    if bad.any():
        named = ", ".join(str(int(k)) for k in keys[bad][:10])
        more = f" and {int(bad.sum()) - 10} more" if bad.sum() > 10 else ""
        raise PipelineError(f"{where}: teacher output is NaN/inf for record keys {named}{more}")


def to_storage(embeddings: np.ndarray, dtype: str, keys: np.ndarray, where: str) -> np.ndarray:
    """Cast to the cache dtype; values beyond float16 range are an error (they would silently become inf)."""
    if dtype == "float16":
        big = (np.abs(embeddings) > FLOAT16_MAX).reshape(len(embeddings), -1).any(axis=1)
        if big.any():
            named = ", ".join(str(int(k)) for k in keys[big][:10])
            raise PipelineError(f"{where}: teacher output exceeds the float16 range for record keys {named}; "
                                "rerun with --dtype float32")
    return embeddings.astype(dtype)


def embed_rows(
    source,
    teacher,
    start: int,
    stop: int,
    batch_size: int,
    decoder: BatchDecoder,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """float32 (stop - start, 2, D) teacher embeddings of rows [start, stop).

    Decoding of the next batches overlaps the forward pass, and batch k is read back only after batch k+1
    has been queued (keeps a GPU busy while the host copies and checks).
    """
    batches = [range(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size)]
    out = np.empty((stop - start, 2, teacher.dim), np.float32)
    pending = deque(decoder.submit(rows) for rows in batches[:PREFETCH_BATCHES])

    def store(rows: range, embedded: torch.Tensor) -> None:
        values = embedded.cpu().numpy()
        check_finite(values, source.keys[rows.start : rows.stop], decoder.where)
        out[rows.start - start : rows.stop - start] = values
        if on_batch is not None:
            on_batch(len(rows))

    previous = None
    for k, rows in enumerate(batches):
        images = decoder.collect(pending.popleft())
        if k + PREFETCH_BATCHES < len(batches):
            pending.append(decoder.submit(batches[k + PREFETCH_BATCHES]))
        current = (rows, forward_views(teacher, images))
        if previous is not None:
            store(*previous)
        previous = current
    if previous is not None:
        store(*previous)
    return out


def run_shard(job: ShardJob, teacher=None, source=None, on_batch: Callable[[int], None] | None = None) -> dict:
    """Embed the job's rows and write its shard file atomically. Returns {"index", "rows", "seconds"}.

    `teacher`/`source` default to per-process cached ones (what Dask workers use).
    """
    started = time.perf_counter()
    source = source if source is not None else cached_source(job.data, job.meta["dataset_fingerprint"])
    if teacher is None:
        from pipeline.cache.dask_cluster import (
            pick_device,  # Dask is only imported where jobs run on it
        )

        teacher = cached_teacher(job.teacher, job.arch, pick_device(job.device), job.meta["teacher_fingerprint"],
                                 job.size_hint)
    size = teacher.input_size
    decoder = BatchDecoder(source, decode_pool(job.decode_threads), (size, size), job.data)
    shard = job.shard
    with torch_threads(job.threads):
        embeddings = embed_rows(source, teacher, shard.start, shard.stop, job.batch_size, decoder, on_batch)
    keys = source.keys[shard.start : shard.stop]
    stored = to_storage(embeddings, job.meta["dtype"], keys, job.data)
    write_shard(shard, stored, source.labels[shard.start : shard.stop], keys, job.meta)
    return {"index": shard.index, "rows": shard.rows, "seconds": time.perf_counter() - started}
