"""Face datasets for training: any face source (RecordIO or image folder) as a torch Dataset.

Items are addressed as `(index, flip)` pairs so that the flip augmentation is decided by the sampler
(deterministic and resumable) and the student can look up the teacher view that matches the flip.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

MEAN = 0.5
STD = 0.5


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or (B, H, W, 3) RGB -> float32 CHW / BCHW normalised as (x/255 - 0.5) / 0.5."""
    tensor = torch.from_numpy(np.array(images, dtype=np.float32))  # one copy: also handles flipped views
    tensor = tensor.div_(255.0).sub_(MEAN).div_(STD)
    return tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)


def preprocessing_attrs(size: int) -> dict:
    """The preprocessing every model in this project expects, as recorded in caches and checkpoints."""
    return {"size": int(size), "mean": MEAN, "std": STD, "color": "RGB", "layout": "NCHW"}


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
