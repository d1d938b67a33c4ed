"""The official EKD "general + balanced" batch (`balanced`) and its neighbour-aware variant (`neighbours`).

Each batch = `general` indices drawn from all images, followed by `balanced // per_identity` distinct
identities with `per_identity` images each. An identity with fewer images repeats them cyclically (its list
repeated, then truncated, like the official sampler); one with more gets a random subset. The balanced part
is what gives the rank loss positive pairs in every batch.

Neighbour-aware (`neighbours` from pools.h5, shape (C, k)): the balanced identities come in groups: a random seed
identity, then up to `neighbours_per_seed` identities drawn at random from its listed nearest neighbours
(skipping itself, -1 padding, identities without images and ones already in the batch), so every batch
carries critical negative pairs between look-alike identities.

Randomness is a pure function of (seed, epoch, rank) (shuffled.py): every rank yields its own batches, and `set_epoch`
moves to the next epoch.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from pipeline.errors import PipelineError


_BATCHES = 1  # stream tag in the seed of the balanced samplers' generator


class BalancedBatchSampler:
    """Yields lists of dataset indices: the general part first, then the balanced part.

    Args:
        labels: identity of every image (0..C-1), in dataset order.
        general: number of randomly drawn images per batch.
        balanced: images in the balanced part (a multiple of `per_identity`).
        per_identity: images per identity in the balanced part.
        seed: base seed; batches depend only on (seed, epoch, rank).
        neighbours: optional (C, k) identity-neighbour table (pools.h5) for the pool-aware balanced part.
        world_size, rank: this process's place among DDP ranks.
        neighbours_per_seed: pool-aware only: neighbours added after each seed identity.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, general: int, balanced: int, per_identity: int = 4,
                 seed: int = 0, neighbours: np.ndarray | None = None, world_size: int = 1, rank: int = 0,
                 neighbours_per_seed: int = 3):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise PipelineError("sampler labels must be a non-empty 1-D array of identities >= 0")
        if general < 1 or balanced < 0 or per_identity < 1 or balanced % per_identity:
            raise PipelineError(f"sampler: need general >= 1 and balanced a multiple of per_identity "
                                f"(got general={general}, balanced={balanced}, per_identity={per_identity})")
        if world_size < 1 or not 0 <= rank < world_size or seed < 0 or neighbours_per_seed < 0:
            raise PipelineError(f"sampler: bad world_size={world_size}, rank={rank}, seed={seed} "
                                f"or neighbours_per_seed={neighbours_per_seed}")
        counts = np.bincount(labels)
        self._by_identity = np.argsort(labels, kind="stable")  # image indices grouped by identity
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._identities = np.flatnonzero(counts)
        self._has_images = counts > 0
        self.num_images, self.general, self.per_identity = labels.size, int(general), int(per_identity)
        self.identities_per_batch = balanced // per_identity
        if self.identities_per_batch > self._identities.size:
            raise PipelineError(f"sampler: {self.identities_per_batch} identities per batch but the data has "
                                f"only {self._identities.size}")
        self.seed, self.world_size, self.rank, self.epoch = int(seed), int(world_size), int(rank), 0
        self.neighbours_per_seed = int(neighbours_per_seed)
        self.neighbours = None if neighbours is None else _check_neighbours(neighbours, counts.size)
        self._len = self.num_images // general // world_size  # the official epoch: every image once on average
        if self._len < 1:
            raise PipelineError(f"sampler: {self.num_images} images cannot fill one batch of {general} general "
                                f"samples on {world_size} rank(s)")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, _BATCHES, self.rank])
        for _ in range(self._len):
            general = rng.choice(self.num_images, self.general, replace=False)
            yield np.concatenate([general, *self._balanced_part(rng)]).astype(np.int64).tolist()

    def _balanced_part(self, rng: np.random.Generator) -> list[np.ndarray]:
        """The balanced part: `per_identity` images of each of its identities, one array per identity."""
        return [self._images_of(c, rng) for c in self._balanced_identities(rng)]

    def _balanced_identities(self, rng: np.random.Generator) -> list[int]:
        """Distinct identities of the balanced part (grouped around seeds when pool-aware)."""
        m = self.identities_per_batch
        if self.neighbours is None:
            return rng.choice(self._identities, m, replace=False).tolist()
        chosen: list[int] = []
        taken: set[int] = set()
        while len(chosen) < m:
            seed_identity = int(self._identities[rng.integers(self._identities.size)])
            if seed_identity in taken:
                continue
            candidates = [int(c) for c in self.neighbours[seed_identity]
                          if c >= 0 and c != seed_identity and self._has_images[c] and int(c) not in taken]
            candidates = list(dict.fromkeys(candidates))  # a table may list an identity twice
            room = min(self.neighbours_per_seed, m - len(chosen) - 1, len(candidates))
            picked = [candidates[i] for i in rng.choice(len(candidates), room, replace=False)] if room > 0 else []
            for identity in [seed_identity, *picked]:
                chosen.append(identity)
                taken.add(identity)
        return chosen

    def _images_of(self, identity: int, rng: np.random.Generator) -> np.ndarray:
        """`per_identity` images of one identity: a random subset, all of them, or cycled repeats."""
        images = self._by_identity[self._starts[identity]:self._starts[identity + 1]]
        if images.size > self.per_identity:
            return rng.choice(images, self.per_identity, replace=False)
        return np.resize(images, self.per_identity)  # cycles the list: repeated, then truncated


def _check_neighbours(neighbours: np.ndarray, num_identities: int) -> np.ndarray:
    """(C, k) integer table covering every identity, entries in [-1, C); raises PipelineError otherwise."""
    table = np.asarray(neighbours)
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.integer):
        raise PipelineError(f"pools neighbours: expected a (C, k) integer table, got {table.dtype} {table.shape}")
    if table.shape[0] < num_identities:
        raise PipelineError(f"pools neighbours: {table.shape[0]} rows but labels go up to {num_identities - 1}")
    if table.size and (table.min() < -1 or table.max() >= table.shape[0]):
        raise PipelineError(f"pools neighbours: entries must lie in [-1, {table.shape[0]}), "
                            f"found {table.min()}..{table.max()}")
    if table.shape[0] > num_identities:  # identities beyond the labels have no images: drop them as neighbours
        table = np.where(table < num_identities, table, -1)
    return table[:num_identities]
