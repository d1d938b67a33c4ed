"""Plain shuffled epochs (the teacher's and the `random` sampler's batches), and the one source of every
sampler's randomness: a generator that is a pure function of (seed, epoch, rank, stream), so that a resumed
epoch and every DDP rank draw exactly what an uninterrupted run draws."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def epoch_rng(seed: int, epoch: int, rank: int = 0, stream: int = 0) -> np.random.Generator:
    """An independent generator for one (seed, epoch, rank, stream)."""
    return np.random.default_rng([seed, epoch, rank, stream])


class ShuffledBatchSampler:
    """Each epoch a fresh permutation of all indices, cut into full batches; ranks take disjoint slices."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, world_size: int = 1, rank: int = 0):
        if batch_size * world_size > n:
            raise ValueError(f"batch size {batch_size} x {world_size} ranks exceeds the {n} training images")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.world_size, self.rank, self.epoch = world_size, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_rng(self.seed, self.epoch).permutation(self.n)
        step = self.batch_size * self.world_size
        for b in range(len(self)):
            start = b * step + self.rank * self.batch_size
            yield order[start : start + self.batch_size].tolist()
