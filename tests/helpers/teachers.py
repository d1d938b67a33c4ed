"""Teachers for the tests: a tiny r18 saved as a pipeline checkpoint (random, or with the data's BatchNorm
statistics), a linear model whose embeddings a test
can recompute by hand, a teacher wrapper that fails on purpose, and a log function for the teacher-cache
extraction that prints nothing."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.models import get_model
from pipeline.models.model_file import save_model

TEACHER_KWARGS = {"input_size": 32, "width": 0.125, "num_features": 32}


def make_teacher(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny randomly initialised r18 teacher (TEACHER_KWARGS, then `overrides`) saved as a pipeline
    checkpoint."""
    kwargs = {**TEACHER_KWARGS, **overrides}
    torch.manual_seed(seed)
    model = get_model("r18", **kwargs).eval()
    save_model(path, model, "r18", kwargs)
    return path


def make_spread_teacher(path: Path, source, seed: int = 1, **overrides) -> Path:
    """A tiny random r18 (TEACHER_KWARGS, then `overrides`) whose BatchNorm statistics are those of the data,
    saved as a pipeline checkpoint.

    A freshly initialised net in eval mode maps every face close to one direction (cosines ~0.9), which would
    make EKD's rank targets the same for every pair and a test of them blind to the targets.
    """
    from pipeline.models.preprocess import to_tensor

    kwargs = {**TEACHER_KWARGS, **overrides}
    torch.manual_seed(seed)
    model = get_model("r18", **kwargs)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration pass
    images = torch.stack([to_tensor(source.decode(i)) for i in range(len(source))])
    with torch.no_grad():
        model.train()(images)
    return save_model(path, model.eval(), "r18", kwargs)


class Projection(nn.Module):
    """embedding = flattened NCHW (3, size, size) input @ p, p a fixed random (3 size^2, dim) matrix / size."""

    def __init__(self, size: int = 16, dim: int = 12, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("p", torch.randn(3 * size * size, dim, generator=g) / size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.p


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


def quiet(message: str) -> None:
    """A `log` for build_teacher_cache that drops every message."""


def teacher_and_cache(root: Path, rows: int, classes: int) -> dict:
    """A gradient-faces training folder, a tiny teacher and its teacher cache under `root` (CPU, one thread):
    {"root", "data", "teacher", "cache"}."""
    from helpers.data import write_gradient_faces

    from pipeline.cache.build import ExtractionConfig, build_teacher_cache

    data = write_gradient_faces(root / "data", n=rows, classes=classes)
    teacher = make_teacher(root / "teacher.pt")
    cache = root / "cache.h5"
    build_teacher_cache(ExtractionConfig(data=data, teacher=teacher, out=cache, device="cpu", threads=1), log=quiet)
    return {"root": root, "data": data, "teacher": teacher, "cache": cache}

