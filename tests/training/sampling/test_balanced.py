"""BalancedBatchSampler: batch structure, repeats, determinism, ranks, pool-aware groups, epoch coverage."""

from collections import Counter

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.training.sampling.balanced import BalancedBatchSampler

# 12 identities with 1..12 images each (identity c has c + 1 images), shuffled dataset order
_RNG = np.random.default_rng(0)
LABELS = _RNG.permutation(np.repeat(np.arange(12), np.arange(1, 13)))


def _blocks(part, per_identity):
    return [part[i:i + per_identity] for i in range(0, len(part), per_identity)]


def test_batch_structure_and_small_identity_repeats():
    sampler = BalancedBatchSampler(LABELS, general=5, balanced=12, per_identity=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(LABELS) // 5
    by_identity = {c: np.flatnonzero(LABELS == c).tolist() for c in range(12)}
    for batch in batches:
        assert len(batch) == 5 + 12 and all(isinstance(i, int) for i in batch)
        assert len(set(batch[:5])) == 5  # general part first: 5 distinct random images
        blocks = _blocks(batch[5:], 3)
        identities = [LABELS[block[0]] for block in blocks]
        assert len(set(identities)) == 4  # 4 distinct identities, each a whole block of 3
        for block, c in zip(blocks, identities):
            assert all(LABELS[i] == c for i in block)
            images = by_identity[c]
            if len(images) >= 3:
                assert len(set(block)) == 3
            else:  # the identity's list cycled: repeated, then truncated
                assert block == (images * 3)[:3]


def test_determinism_epochs_and_ranks():
    make = lambda **kw: BalancedBatchSampler(LABELS, 4, 8, per_identity=2, seed=7, world_size=2, **kw)
    first, again = make(rank=0), make(rank=0)
    assert list(first) == list(again)
    other_rank = make(rank=1)
    assert list(first) != list(other_rank)
    epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch0
    first.set_epoch(0)
    assert list(first) == epoch0
    assert len(first) == len(LABELS) // 4 // 2
    assert list(BalancedBatchSampler(LABELS, 4, 8, per_identity=2, seed=8, world_size=2)) != epoch0


def test_pool_aware_batches_are_made_of_neighbour_groups():
    # 16 identities in 4 clusters of 4; each identity's neighbours are its cluster (itself listed first)
    labels = np.repeat(np.arange(16), 3)
    clusters = np.arange(16) // 4
    neighbours = np.array([[c] + [d for d in range(16) if clusters[d] == clusters[c] and d != c] for c in range(16)])
    pool = BalancedBatchSampler(labels, 2, 16, per_identity=2, seed=0, neighbours=neighbours, neighbours_per_seed=3)
    plain = BalancedBatchSampler(labels, 2, 16, per_identity=2, seed=0)
    def whole_clusters(batch):
        identities = [labels[block[0]] for block in _blocks(batch[2:], 2)]
        return all(count == 4 for count in Counter(clusters[identities]).values())
    pool_batches = list(pool)
    assert all(whole_clusters(b) for b in pool_batches)
    for batch in pool_batches:  # groups: a seed identity followed by 3 of its listed neighbours
        identities = [labels[block[0]] for block in _blocks(batch[2:], 2)]
        for start in range(0, 8, 4):
            assert set(identities[start + 1:start + 4]) <= set(neighbours[identities[start]])
    assert not all(whole_clusters(b) for b in plain)  # the plain sampler does not group clusters


def test_bad_inputs_raise():
    with pytest.raises(PipelineError, match="multiple of per_identity"):
        BalancedBatchSampler(LABELS, 4, 10, per_identity=4)
    with pytest.raises(PipelineError, match="identities per batch"):
        BalancedBatchSampler(LABELS, 4, 52, per_identity=4)
    with pytest.raises(PipelineError, match="neighbours"):
        BalancedBatchSampler(LABELS, 4, 8, neighbours=np.zeros((5, 3), dtype=np.int64))
    with pytest.raises(PipelineError, match="neighbours"):
        BalancedBatchSampler(LABELS, 4, 8, neighbours=np.full((12, 3), 40, dtype=np.int64))
    with pytest.raises(PipelineError, match="labels"):
        BalancedBatchSampler(np.array([0.5, 1.0]), 1, 0)
