"""Where torch work runs: one resolver for every `--device` option."""
from __future__ import annotations

import re

import torch

from pipeline.errors import PipelineError
from pipeline.settings import EnvironmentVariable, setting

# torchrun's: which of this machine's GPUs the process drives
LOCAL_RANK = EnvironmentVariable("LOCAL_RANK", 0, "this process's GPU on its machine, set by torchrun", max=1023,
                                 integer=True)

DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N."
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(option: str, text) -> None:
    """PipelineError unless `text` is auto / cpu / cuda / cuda:N (whether that device exists is checked
    where it is used, by `resolve_device`)."""
    if not isinstance(text, torch.device) and not _DEVICE_NAME.fullmatch(str(text)):
        raise PipelineError(f"{option} {str(text)!r}: use {DEVICE_HELP}")


def device_setting(identity: bool = True):
    """The `--device` field of every config (`identity`: whether the device is part of the run's identity)."""
    return setting("auto", DEVICE_HELP, validate=check_device_name, identity=identity)


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> this process's CUDA device (LOCAL_RANK under torchrun) when CUDA is available, else CPU.

    PipelineError for anything but auto / cpu / cuda / cuda:N, or a CUDA device torch cannot see.
    """
    if isinstance(device, torch.device):
        return device
    text = str(device)
    if text == "auto":
        local_rank = LOCAL_RANK.value()
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    check_device_name("--device", text)
    if not torch.cuda.is_available():
        raise PipelineError(f"--device {text}: torch sees no CUDA device")
    index = torch.device(text).index
    if index is not None and index >= torch.cuda.device_count():
        raise PipelineError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(text)
