"""ShuffledBatchSampler and FlipAugment: epoch coverage, rank slices, determinism, flip statistics."""

import numpy as np
import pytest

from pipeline.training.data import FlipAugment
from pipeline.training.sampling.shuffled import ShuffledBatchSampler


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("n,batch,world", [(50, 7, 1), (50, 4, 3), (48, 6, 2)])
def test_each_index_at_most_once_per_epoch_and_ranks_disjoint(n, batch, world):
    per_rank = [_epoch(ShuffledBatchSampler(n, batch, seed=3, world_size=world, rank=r), epoch=2)
                for r in range(world)]
    steps = n // (batch * world)
    seen = []
    for batches in per_rank:
        assert len(batches) == steps
        assert all(len(b) == batch and all(0 <= i < n for i in b) for b in batches)
        seen.extend(i for b in batches for i in b)
    assert len(seen) == len(set(seen)) == steps * batch * world  # no index twice, on any rank
    # ranks share nothing
    rank_sets = [{i for b in batches for i in b} for batches in per_rank]
    for r in range(world):
        for q in range(r + 1, world):
            assert not rank_sets[r] & rank_sets[q]


def test_rank_slices_concatenate_to_the_single_process_global_batches():
    """Step b on W ranks x B/W images covers exactly step b of one process with B images, in rank order."""
    single = _epoch(ShuffledBatchSampler(40, 8, seed=5), epoch=1)
    ranks = [_epoch(ShuffledBatchSampler(40, 4, seed=5, world_size=2, rank=r), epoch=1) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single


def test_every_index_covered_when_batches_divide_the_set():
    batches = _epoch(ShuffledBatchSampler(30, 5, seed=0), epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(30))


def test_shuffle_is_deterministic_per_seed_and_epoch():
    def order(seed, epoch):
        return _epoch(ShuffledBatchSampler(60, 6, seed=seed), epoch)

    assert order(1, 4) == order(1, 4)  # a fresh sampler (e.g. after resume) replays the same epoch
    assert order(1, 4) != order(1, 5)
    assert order(1, 4) != order(2, 4)
    assert order(1, 0) != list(np.arange(60).reshape(10, 6).tolist())  # actually shuffled


def test_too_large_batch_is_refused():
    with pytest.raises(ValueError, match="exceeds the 10 training images"):
        ShuffledBatchSampler(10, 6, world_size=2)


def test_flip_augment_keeps_batches_and_is_deterministic():
    def pairs(seed, epoch, rank=0):
        flips = FlipAugment(ShuffledBatchSampler(40, 8, seed=seed), seed=seed, rank=rank)
        return _epoch(flips, epoch)

    inner = _epoch(ShuffledBatchSampler(40, 8, seed=2), epoch=3)
    wrapped = pairs(2, 3)
    assert len(wrapped) == len(inner) == len(FlipAugment(ShuffledBatchSampler(40, 8, seed=2)))
    assert [[i for i, _ in b] for b in wrapped] == inner  # set_epoch reached the inner sampler
    assert all(isinstance(i, int) and isinstance(f, bool) for b in wrapped for i, f in b)
    assert wrapped == pairs(2, 3)
    flips = [[f for _, f in b] for b in wrapped]
    assert flips != [[f for _, f in b] for b in pairs(2, 4)]  # new flips each epoch
    assert flips != [[f for _, f in b] for b in pairs(2, 3, rank=1)]  # and per rank


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 1.0])
def test_flip_fraction_is_p(p):
    n = 20000
    batches = FlipAugment(ShuffledBatchSampler(n, 100, seed=0), seed=0, p=p)
    flipped = sum(f for b in batches for _, f in b)
    sigma = np.sqrt(n * p * (1 - p))
    assert abs(flipped - p * n) <= 4 * sigma  # exact at p = 0 and p = 1
