"""The input preprocessing every model in this project expects (arcface_torch's): RGB, (x/255 - 0.5) / 0.5."""
from __future__ import annotations

import numpy as np
import torch

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
