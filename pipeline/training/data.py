"""Face datasets for training: any face source (RecordIO or image folder) as a torch Dataset, and the flip
augmentation as a batch-sampler wrapper.

Items are addressed as `(index, flip)` pairs so that the flip augmentation is decided by the sampler
(deterministic and resumable) and the student can look up the teacher view that matches the flip.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.models.preprocess import to_tensor
from pipeline.training.samplers import epoch_rng


class FaceDataset(Dataset):
    """Decodes images from a face source; `dataset[(i, flip)] -> (image, label, i, flip)`.

    With `preload=True` every image is decoded once into one uint8 array in RAM (the CPU demo path: the
    synthetic sets are small); otherwise images are decoded on demand in DataLoader worker processes.
    """

    def __init__(self, source, preload: bool = False):
        self.source = source
        self.labels = np.asarray(source.labels, dtype=np.int64)
        self.images: np.ndarray | None = None
        if preload:
            self.images = np.stack(
                [source.decode(i) for i in tqdm(range(len(source)), desc="decode", unit="img", disable=None)]
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, bool] | int):
        index, flip = item if isinstance(item, tuple) else (item, False)
        image = self.images[index] if self.images is not None else self.source.decode(index)
        if flip:
            image = image[:, ::-1]
        return to_tensor(image), int(self.labels[index]), int(index), bool(flip)


def collate(items: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack a batch into (images, labels, indices, flips) tensors."""
    images, labels, indices, flips = zip(*items)
    return (
        torch.stack(images),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(indices, dtype=torch.int64),
        torch.tensor(flips, dtype=torch.bool),
    )


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
