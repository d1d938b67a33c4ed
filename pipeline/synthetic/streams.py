"""Seeded random streams and the ordered process pool shared by every part of the synthetic benchmark.

Every identity and image has its own generator, seeded by ``np.random.SeedSequence(seed, spawn_key=key)``
with a key (role, index, image): the output is the same whatever the number of workers.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from pipeline.synthetic.identity import FAMILY_SIZE, Identity, make_identity

FAMILY_ROLE = 10  # family latents: (FAMILY_ROLE + role, family, 0)


def generator(seed: int, key: tuple[int, int, int]) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def split_identity(seed: int, role: int, index: int, difficulty: float) -> Identity:
    """Identity ``index`` of a split (``role`` ROLE_TRAIN/ROLE_VAL/ROLE_TEST), exactly as `synthesize` draws it."""
    family = generator(seed, (FAMILY_ROLE + role, index // FAMILY_SIZE, 0))
    return make_identity(generator(seed, (role, index, 0)), family, difficulty)


def chunks(items: Sequence, size: int) -> Iterator[tuple]:
    for start in range(0, len(items), size):
        yield tuple(items[start:start + size])


def ordered_map(fn: Callable, tasks: Iterable, workers: int) -> Iterator:
    """``map(fn, tasks)`` in order, over a spawn-based process pool when workers > 1 (bounded look-ahead)."""
    if workers <= 1:
        yield from map(fn, tasks)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        pending = []
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= 4 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
