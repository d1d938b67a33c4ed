"""Plain epoch batching and the flip augmentation, as batch samplers.

Randomness depends only on (seed, epoch, rank), so an interrupted run resumed at an epoch boundary sees
exactly the batches and flips of the uninterrupted run.
"""
from __future__ import annotations

from typing import Iterator

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


class FlipAugment:
    """Wraps a batch sampler: each index becomes `(index, flip)` with flip ~ Bernoulli(p)."""

    def __init__(self, batch_sampler, seed: int = 0, p: float = 0.5, rank: int = 0):
        self.batch_sampler, self.seed, self.p, self.rank, self.epoch = batch_sampler, seed, p, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        rng = epoch_rng(self.seed, self.epoch, self.rank, stream=1)
        for batch in self.batch_sampler:
            flips = rng.random(len(batch)) < self.p
            yield [(int(i), bool(f)) for i, f in zip(batch, flips)]
