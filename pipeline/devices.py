"""Where torch work runs: one resolver for every `--device` option."""
from __future__ import annotations

import os
import re

import torch

from pipeline.errors import PipelineError

DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N."


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> this process's CUDA device (LOCAL_RANK under torchrun) when CUDA is available, else CPU.

    PipelineError for anything but auto / cpu / cuda / cuda:N, or a CUDA device torch cannot see.
    """
    if isinstance(device, torch.device):
        return device
    text = str(device)
    if text == "auto":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", text):
        raise PipelineError(f"--device {text!r}: use {DEVICE_HELP}")
    if not torch.cuda.is_available():
        raise PipelineError(f"--device {text}: torch sees no CUDA device")
    index = torch.device(text).index
    if index is not None and index >= torch.cuda.device_count():
        raise PipelineError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(text)
