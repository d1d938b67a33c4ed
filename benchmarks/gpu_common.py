"""What every part of benchmarks/gpu_check.py shares: a failed check, the measured block, a strict fp32 reference."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class CheckFailed(RuntimeError):
    """A CUDA path is broken or is not the one asked for."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@contextmanager
def measured(device: torch.device, into: dict):
    """Seconds and peak GPU memory (GiB, torch allocator) of the block, stored in `into`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    into["seconds"] = round(time.perf_counter() - started, 1)
    into["peak_gpu_memory_gib"] = (round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                                   if device.type == "cuda" else None)


@contextmanager
def strict_fp32():
    """No TF32 in matmuls or convolutions: a real float32 reference."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
