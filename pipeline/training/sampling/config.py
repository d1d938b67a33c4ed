"""A student's batch structure as settings: which sampler draws the batches and which part of each batch the
margin loss sees."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.errors import PipelineError
from pipeline.settings import Choice, check, setting
from pipeline.training.sampling.hard_pairs import HardPairBatchSampler
from pipeline.training.sampling.balanced import BalancedBatchSampler


class SamplerKind(Choice):
    """How a student's batches are drawn."""

    random = "random"
    balanced = "balanced"
    neighbours = "neighbours"
    hard_pairs = "hard-pairs"


class MarginOn(Choice):
    """Which samples of a balanced batch the margin loss sees."""

    all = "all"
    general = "general"


@dataclass
class SamplerConfig:
    """A student's batch structure: the sampler and the margin loss's share of the batch."""

    sampler: str = setting("hard-pairs", "random (plain batches), balanced (official general+balanced batch), "
                                         "neighbours (balanced part from groups of look-alike identities) or "
                                         "hard-pairs (part of the balanced part from the teacher's hardest "
                                         "negative pairs, --pair-share).", choices=SamplerKind)
    balanced_batch_size: int = setting(64, "Balanced part of each batch (identities x --per-identity); "
                                           "--batch-size is the general part.", min=0)
    per_identity: int = setting(4, "Images per identity in the balanced part.", min=1)
    pair_share: float = setting(0.5, "--sampler hard-pairs: the share of the balanced part filled with the "
                                     "teacher's hard negative pairs (the rest: random identities).", min=0.0,
                                max=1.0)
    margin_on: str = setting("all", "Margin loss on 'all' samples or only the 'general' part (official EKD).",
                             choices=MarginOn)

    def __post_init__(self):
        check(self)
        if self.sampler == SamplerKind.random and self.margin_on == MarginOn.general:
            raise PipelineError("--margin-on general needs a balanced, neighbours or hard-pairs sampler (random "
                                "batches have no general part)")

    @property
    def needs_pools(self) -> bool:
        return self.sampler in (SamplerKind.neighbours, SamplerKind.hard_pairs)

    def margin_samples(self, general: int) -> int | None:
        """How many leading samples of each batch the margin loss sees (None = all)."""
        return general if self.margin_on == MarginOn.general else None

    def factory(self, labels: np.ndarray, general: int, seed: int,
                pools: dict | None = None) -> Callable[[int, int], BalancedBatchSampler] | None:
        """`factory(world_size, rank)` for `train`, or None for plain shuffled batches; `pools` is
        `load_pools`' tables (neighbours, neg_pairs), needed by the neighbours and hard-pairs samplers."""
        if self.sampler == SamplerKind.random:
            return None
        if self.needs_pools and pools is None:
            raise PipelineError(f"--sampler {self.sampler} needs --pools (the folder written by build-pools)")
        common = {"per_identity": self.per_identity, "seed": seed}

        def make(world_size: int, rank: int) -> BalancedBatchSampler:
            if self.sampler == SamplerKind.hard_pairs:
                return HardPairBatchSampler(labels, general, self.balanced_batch_size, pools["neg_pairs"],
                                            world_size=world_size, rank=rank, pair_share=self.pair_share, **common)
            neighbours = pools["neighbours"] if self.sampler == SamplerKind.neighbours else None
            return BalancedBatchSampler(labels, general, self.balanced_batch_size, neighbours=neighbours,
                                        world_size=world_size, rank=rank, **common)
        return make
