"""Does an exported model compute the torch model's embeddings? Checked before the export is kept.

Trained face models give raw embeddings whose norms reach 1e4-1e7 on random inputs, and only their direction
is used (cosine scores), so the comparison is relative to each embedding's norm; float32 export rounding
is about 1e-7 of it. An output with NaN/inf is refused: NaN compares as "no difference" (weights: finite.py).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.errors import DataError, PipelineError


def check_tolerance(option: str, tolerance: float) -> None:
    """A finite, non-negative tolerance (NaN would pass every comparison)."""
    if not math.isfinite(tolerance) or tolerance < 0:
        raise PipelineError(f"{option} {tolerance}: must be a finite number >= 0")


def relative_difference(net: nn.Module, embed: Callable[[torch.Tensor], torch.Tensor], size: int,
                        source: str | Path, batch: int = 4, seed: int = 0) -> float:
    """max over random inputs of |torch - other| / |torch| per embedding (L2 norms): `embed` against `net`.

    Raises DataError naming `source` when either output is not finite or an embedding is zero."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    with torch.no_grad():
        expected = net.eval()(images).double()
    got = torch.as_tensor(embed(images)).double()
    for what, output in (("torch", expected), ("the export", got)):
        if not bool(torch.isfinite(output).all()):
            raise DataError(f"{source}: {what} gives NaN/inf embeddings; not written")
    if got.shape != expected.shape:
        raise DataError(f"{source}: the export gives embeddings of shape {tuple(got.shape)}, torch "
                        f"{tuple(expected.shape)}; not written")
    norms = expected.norm(dim=1)
    if not bool((norms > 0).all()):
        raise DataError(f"{source}: torch gives a zero embedding, so the export cannot be compared; not written")
    return float(((expected - got).norm(dim=1) / norms).max())
