"""HardPairBatchSampler: the teacher's hard negative pairs really appear in the batches, with positives of
both identities; determinism per (seed, epoch, rank); completion and refusals."""
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.training.sampling.hard_pairs import HardPairBatchSampler
from pipeline.training.sampling.config import SamplerConfig

# 20 identities x 6 images, shuffled order
LABELS = np.random.default_rng(3).permutation(np.repeat(np.arange(20), 6))


def pool_pairs(count: int, seed: int = 0) -> np.ndarray:
    """`count` image pairs of different identities (the first one listed twice, one same-identity pair)."""
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < count:
        i, j = rng.choice(LABELS.size, 2, replace=False)
        if LABELS[i] != LABELS[j]:
            pairs.append((i, j))
    same = np.flatnonzero(LABELS == LABELS[0])[:2]
    return np.array(pairs + [pairs[0], tuple(same)], dtype=np.int64)


def blocks(batch, general, per_identity):
    part = batch[general:]
    return [part[k:k + per_identity] for k in range(0, len(part), per_identity)]


def test_every_batch_carries_whole_pool_pairs_with_positives():
    pairs = pool_pairs(15)
    pool = {tuple(p) for p in pairs.tolist()} | {tuple(p[::-1]) for p in pairs.tolist()}
    sampler = HardPairBatchSampler(LABELS, general=6, balanced=16, pairs=pairs, per_identity=4, seed=2)
    batches = list(sampler)
    assert len(batches) == LABELS.size // 6
    carried = 0
    for batch in batches:
        assert len(batch) == 6 + 16
        parts = blocks(batch, 6, 4)
        identities = [int(LABELS[b[0]]) for b in parts]
        assert len(set(identities)) == 4  # distinct identities, one block each
        for block, identity in zip(parts, identities):
            assert all(LABELS[i] == identity for i in block) and len(set(block)) == 4
        for first, second in zip(parts[0::2], parts[1::2]):  # consecutive blocks: a pool pair, its images first
            assert (first[0], second[0]) in pool
            carried += 1
    assert carried == 2 * len(batches)
    drawn = {(b[0], c[0]) for batch in batches for b, c in zip(blocks(batch, 6, 4)[0::2], blocks(batch, 6, 4)[1::2])}
    assert len(drawn) > 5  # pairs are drawn across the pool, not one pair again and again


def test_batches_depend_only_on_seed_epoch_and_rank():
    pairs = pool_pairs(15)

    def epoch(seed=2, epoch=0, rank=0):
        sampler = HardPairBatchSampler(LABELS, 6, 16, pairs, seed=seed, world_size=2, rank=rank)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch() == epoch()
    assert epoch() != epoch(rank=1) and epoch() != epoch(epoch=1) and epoch() != epoch(seed=3)


def test_odd_identity_count_and_a_small_pool_are_completed_with_random_identities():
    pairs = pool_pairs(1)  # one usable pair: every batch holds it plus random identities
    sampler = HardPairBatchSampler(LABELS, general=4, balanced=12, pairs=pairs, per_identity=4, seed=0)
    for batch in sampler:
        parts = blocks(batch, 4, 4)
        identities = [int(LABELS[b[0]]) for b in parts]
        assert (parts[0][0], parts[1][0]) == tuple(pairs[0]) and len(set(identities)) == 3


def test_identity_with_few_images_cycles_them():
    labels = np.array([0, 1, 1, 1, 1, 2, 2, 2, 2])
    sampler = HardPairBatchSampler(labels, general=1, balanced=8, pairs=np.array([[0, 1]]), per_identity=4)
    batch = next(iter(sampler))
    assert batch[1:5] == [0, 0, 0, 0]  # identity 0 has one image: the pair's image, repeated


@pytest.mark.parametrize("pairs, message", [
    (np.array([[0, 500]]), "must lie in"),
    (np.array([[0, 1, 2]]), "expected an .M, 2."),
    (np.array([[0, int(np.flatnonzero(LABELS == LABELS[0])[1])]]), "no pair of different identities"),
])
def test_bad_pools_are_refused(pairs, message):
    with pytest.raises(PipelineError, match=message):
        HardPairBatchSampler(LABELS, 4, 8, pairs)


def test_sampler_config_builds_the_pair_sampler_from_pools_tables():
    pairs = pool_pairs(15)
    factory = SamplerConfig(sampler="hard-pairs", balanced_batch_size=8, per_identity=4).factory(
        LABELS, general=4, seed=1, pools={"neg_pairs": pairs, "neighbours": None})
    sampler = factory(1, 0)
    assert isinstance(sampler, HardPairBatchSampler) and list(sampler) == list(
        HardPairBatchSampler(LABELS, 4, 8, pairs, per_identity=4, seed=1, pair_share=0.5))
    with pytest.raises(PipelineError, match="--sampler hard-pairs needs --pools"):
        SamplerConfig(sampler="hard-pairs").factory(LABELS, 4, 0, None)


def test_pair_share_fills_the_rest_with_random_identities():
    pairs = pool_pairs(15)
    pool = {tuple(p) for p in pairs.tolist()}
    sampler = HardPairBatchSampler(LABELS, 4, 32, pairs, per_identity=4, seed=5, pair_share=0.5)  # 8 identities
    for batch in sampler:
        parts = blocks(batch, 4, 4)
        assert len({int(LABELS[b[0]]) for b in parts}) == 8
        assert all((first[0], second[0]) in pool for first, second in zip(parts[0:4:2], parts[1:4:2]))
    with pytest.raises(PipelineError, match="pair share 1.5"):
        HardPairBatchSampler(LABELS, 4, 8, pairs, pair_share=1.5)


class SetdiffSampler(HardPairBatchSampler):
    """The former balanced part: random identities drawn from np.setdiff1d(identities, taken) each batch."""

    def _free_identities(self, picks, taken):
        return np.setdiff1d(self._identities, np.fromiter(taken, dtype=np.int64, count=len(taken)))[picks]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_free_identities_give_the_setdiff_batches(seed):
    """The O(taken) free-identity lookup draws exactly the batches of the O(identities) setdiff it replaced,
    with gaps in the identity numbers and pairs that take many identities."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.choice(400, 120, replace=False), rng.integers(2, 7, 120))
    pairs = rng.integers(0, labels.size, (300, 2))
    new = HardPairBatchSampler(labels, 8, 40, pairs, per_identity=4, seed=seed, pair_share=0.8)
    old = SetdiffSampler(labels, 8, 40, pairs, per_identity=4, seed=seed, pair_share=0.8)
    for epoch in range(3):
        new.set_epoch(epoch)
        old.set_epoch(epoch)
        assert list(new) == list(old)
