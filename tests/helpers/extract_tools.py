"""Test data and fault injection for the teacher-cache extraction tests.

Also runnable as a script (`python tests/helpers/extract_tools.py DATA TEACHER OUT ...`): an in-process
extraction slowed down by a sleep per teacher batch and per assembled shard, so that a test can SIGKILL it
at a chosen point. The sleeps only stretch time; the code that runs is the real extraction and assembly.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.formats.jpeg import encode_jpeg
from pipeline.formats.recordio import write_face_recordio
from pipeline.models import get_model
from pipeline.models.model_file import save_model

TEACHER_KWARGS = {"input_size": 32, "width": 0.125, "num_features": 32}


def make_face_rec(folder: Path, n: int = 120, size: int = 32, classes: int = 10, seed: int = 0) -> Path:
    """A RecordIO training set of `n` random-noise-plus-gradient JPEGs, sorted labels over `classes`."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    items = []
    for i in range(n):
        base = (ramp[None, :, None] * rng.uniform(0.2, 1.0, size=3)).astype(np.float32)  # left-right asymmetric
        image = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
        items.append((encode_jpeg(image, quality=90), i * classes // n))
    write_face_recordio(folder, items, num_classes=classes, image_size=(size, size))
    return folder


def make_teacher(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny randomly initialised r18 teacher saved as a pipeline checkpoint."""
    kwargs = {**TEACHER_KWARGS, **overrides}
    torch.manual_seed(seed)
    model = get_model("r18", **kwargs).eval()
    save_model(path, model, "r18", kwargs)
    return path


class FailingTeacher:
    """Wraps a Teacher; returns NaN rows for `nan_rows` (positions in the 2B batch) or raises on call `raise_on`."""

    def __init__(self, teacher, raise_on: int | None = None, nan_batch: int | None = None, nan_rows=()):
        self._teacher, self.raise_on, self.nan_batch, self.nan_rows = teacher, raise_on, nan_batch, list(nan_rows)
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._teacher, name)

    def __call__(self, x):
        self.calls += 1
        if self.raise_on is not None and self.calls == self.raise_on:
            raise OSError("simulated failure in the middle of the extraction")
        out = self._teacher(x)
        if self.nan_batch is not None and self.calls == self.nan_batch:
            out[self.nan_rows] = float("nan")
        return out


def exit_once_then_run(marker: str, job):
    """Dask shard task that kills its worker process (os._exit) the first time it runs shard 1."""
    from pipeline.cache.worker import run_shard

    if job.shard.index == 1 and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        # leave a half-written shard behind, as a worker dying in the middle of the write would
        job.shard.path.with_name(job.shard.path.name + ".tmp-deadbeef").write_bytes(b"\x89HDF\r\n")
        os._exit(17)
    return run_shard(job)


def _slow_main(data: str, teacher: str, out: str, shard_size: int, batch_size: int, delay: float) -> None:
    import pipeline.cache.build as build
    import pipeline.cache.shards as shards
    import pipeline.cache.worker as extraction

    forward, assemble, real_file = extraction.forward_views, build.assemble, shards.h5py.File
    assembling = []

    def slow_forward(*args, **kwargs):
        time.sleep(delay)
        return forward(*args, **kwargs)

    def flagged_assemble(*args, **kwargs):
        assembling.append(True)
        return assemble(*args, **kwargs)

    def slow_file(path, mode="r", *args, **kwargs):
        if assembling and mode == "r":  # the merge opening a shard
            Path(out + ".assembling").touch()  # tells the test that the merge is under way
            time.sleep(delay)
        return real_file(path, mode, *args, **kwargs)

    extraction.forward_views, build.assemble = slow_forward, flagged_assemble
    shards.h5py = type("SlowH5py", (), {"File": staticmethod(slow_file)})
    cfg = build.ExtractionConfig(data=Path(data), teacher=Path(teacher), out=Path(out), shard_size=shard_size,
                                 batch_size=batch_size, device="cpu")
    build.build_teacher_cache(cfg, log=lambda message: None)


if __name__ == "__main__":
    _slow_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
