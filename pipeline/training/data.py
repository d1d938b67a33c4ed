"""Face datasets for training: any face source (RecordIO or image folder) as a torch Dataset, and the flip
augmentation as a batch-sampler wrapper.

Items are addressed as `(index, flip)` pairs so that the flip augmentation is decided by the sampler
(deterministic and resumable) and the student can look up the teacher view that matches the flip.

A sample that cannot be loaded (a broken record, an image of another size) does not raise inside a
DataLoader worker, where torch would wrap it into a many-line message: it becomes an `ItemFailure` with the
one-line message naming the record, which `collate` passes on as the batch and the loop raises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.errors import DataError, PipelineError
from pipeline.models.preprocess import to_tensor
from pipeline.progress import progress_bar
from pipeline.training.sampling.shuffled import epoch_rng


@dataclass(frozen=True)
class ItemFailure:
    """Why a sample could not be loaded: one line naming the record (picklable, crosses worker processes)."""

    message: str


def record_name(source, index: int) -> str:
    """How an error names sample `index`: the source's own `where(i)` (file and record key), else its index."""
    return source.where(index) if hasattr(source, "where") else f"image {index}"


class FaceDataset(Dataset):
    """Decodes images from a face source; `dataset[(i, flip)] -> (image, label, i, flip)`, or an ItemFailure.

    With `preload=True` every image is decoded once into one uint8 array in RAM (the CPU demo path: the
    synthetic sets are small); otherwise images are decoded on demand in DataLoader worker processes.
    `image_size` (H, W): every image must have it (the model's input); a record of another size is named.
    """

    def __init__(self, source, preload: bool = False, image_size: tuple[int, int] | None = None):
        image_size = image_size or getattr(source, "image_size", None)  # the model's input, else the data's
        self.source, self.image_size = source, None if image_size is None else tuple(image_size)
        self.labels = np.asarray(source.labels, dtype=np.int64)
        self.images: np.ndarray | None = None
        if preload:
            self.images = np.stack(
                [self._decode(i) for i in progress_bar(range(len(source)), desc="decode", unit="img")]
            )

    def __len__(self) -> int:
        return len(self.labels)

    def _decode(self, index: int) -> np.ndarray:
        image = self.source.decode(index)
        if self.image_size is None:
            self.image_size = image.shape[:2]  # the first image sets the size the others must have
        if image.shape != (*self.image_size, 3):
            where = record_name(self.source, index)
            raise DataError(f"{where}: image is {image.shape[1]}x{image.shape[0]}, but this run's images are "
                            f"{self.image_size[1]}x{self.image_size[0]} (the data's property, or --input-size)")
        return image

    def __getitem__(self, item: tuple[int, bool] | int):
        index, flip = item if isinstance(item, tuple) else (item, False)
        try:
            image = self.images[index] if self.images is not None else self._decode(index)
        except PipelineError as error:
            return ItemFailure(str(error))
        except Exception as error:  # anything else a decoder raises: still one line naming the record
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            return ItemFailure(f"{record_name(self.source, index)}: {type(error).__name__}: {first}")
        if flip:
            image = image[:, ::-1]
        return to_tensor(image), int(self.labels[index]), int(index), bool(flip)


def collate(items: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | ItemFailure:
    """Stack a batch into (images, labels, indices, flips) tensors; the first ItemFailure instead, if any."""
    failure = next((item for item in items if isinstance(item, ItemFailure)), None)
    if failure is not None:
        return failure
    images, labels, indices, flips = zip(*items)
    return (
        torch.stack(images),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(indices, dtype=torch.int64),
        torch.tensor(flips, dtype=torch.bool),
    )


class FlipAugment:
    """Wraps a batch sampler: each index becomes `(index, flip)` with flip ~ Bernoulli(p).

    `set_epoch(epoch, start)` selects the epoch and the first batch to yield: a run resumed from the middle of
    an epoch draws the `start` batches already done (and their flips) and drops them, so every later batch
    is the one the whole epoch yields (batches and flips are pure functions of (seed, epoch, rank)).
    `len()` counts the batches still to come; `len(batch_sampler)` is the epoch's length.
    """

    def __init__(self, batch_sampler, seed: int = 0, p: float = 0.5, rank: int = 0):
        self.batch_sampler, self.seed, self.p, self.rank, self.epoch = batch_sampler, seed, p, rank, 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= len(self.batch_sampler):
            raise ValueError(f"epoch {epoch} has {len(self.batch_sampler)} batches; cannot start at batch {start}")
        self.epoch, self.start = epoch, start
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler) - self.start

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        rng = epoch_rng(self.seed, self.epoch, self.rank, stream=1)
        for number, batch in enumerate(self.batch_sampler):
            flips = rng.random(len(batch)) < self.p
            if number >= self.start:
                yield [(int(i), bool(f)) for i, f in zip(batch, flips)]
