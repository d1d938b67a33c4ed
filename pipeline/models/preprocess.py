"""The input every model in this project expects (arcface_torch's): RGB, (x/255 - 0.5) / 0.5, faces aligned
on the ArcFace five-point template, and the two-view forward (each image and its horizontal flip) that extraction and IJB evaluation run: fp16
autocast and channels_last on CUDA."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

MEAN = 0.5
STD = 0.5
ARCFACE_SIZE = 112
# where an aligned face's five landmarks sit in a 112 x 112 input (left eye, right eye, nose tip, left and right
# mouth corner, as seen): the standard points of the 96 x 112 crop moved 8 px right; float32 as published
ARCFACE_TEMPLATE = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655],
                             [62.7299, 92.2041]], dtype=np.float32) + np.array([8.0, 0.0], dtype=np.float32)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or (B, H, W, 3) RGB -> float32 CHW / BCHW normalised as (x/255 - 0.5) / 0.5."""
    tensor = torch.from_numpy(np.array(images, dtype=np.float32))  # one copy: also handles flipped views
    tensor = tensor.div_(255.0).sub_(MEAN).div_(STD)
    return tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)


def reference_points(size: int) -> np.ndarray:
    """(5, 2) float64 landmark positions of an aligned face in a `size` x `size` input: the template scaled by
    size / 112."""
    return ARCFACE_TEMPLATE.astype(np.float64) * (size / ARCFACE_SIZE)


def preprocessing_attrs(size: int) -> dict:
    """The preprocessing every model in this project expects, as recorded in caches and checkpoints."""
    return {"size": int(size), "mean": MEAN, "std": STD, "color": "RGB", "layout": "NCHW"}


def prepare_teacher(teacher):
    """channels_last weights on CUDA (tensor cores like NHWC); a no-op elsewhere."""
    if teacher.module is not None and torch.device(teacher.device).type == "cuda":
        teacher.module.to(memory_format=torch.channels_last)
    return teacher


def preprocess_views(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (2B, 3, H, W) on `device`: originals then horizontal flips, (x/255-.5)/.5."""
    x = torch.from_numpy(images)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2)
    both = torch.cat([x, x.flip(3)]).float().div_(255.0).sub_(MEAN).div_(STD)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return both.contiguous(memory_format=fmt)


def forward_views(teacher, images: np.ndarray) -> torch.Tensor:
    """(B, 2, D) on the teacher's device: the teacher on each image (view 0) and on its flip (view 1).

    On CUDA the result is not waited for, so the caller can queue the next batch before reading it back.
    """
    device = torch.device(teacher.device)
    batch = preprocess_views(images, device)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()
    with autocast:
        out = teacher(batch)
    b = len(images)
    return torch.stack([out[:b], out[b:]], dim=1).float()
