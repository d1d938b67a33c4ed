"""How big a backbone is: parameters and multiply-accumulates (MACs) of one forward pass of one image.

MACs count the convolutions and linear layers, which dominate a face backbone's cost (BatchNorm, PReLU and
additions are a few percent and are not counted, as in the usual FLOPs tables of the field, which report MACs
as "FLOPs"). They are counted from a real forward pass with hooks, so every layer that runs is seen exactly
once per call, whatever the architecture.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.models import count_parameters


def count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates of the convolutions and linear layers for one `input_size` x `input_size` image."""
    total = 0

    def conv(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1]
        total += output[0].numel() * (module.in_channels // module.groups) * kernel

    def linear(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += output[0].numel() * module.in_features

    hooks = [m.register_forward_hook(conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear) for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return total


def complexity(model: nn.Module, input_size: int) -> dict:
    """{"parameters": backbone parameters, "macs": MACs per image at `input_size`}."""
    return {"parameters": count_parameters(model), "macs": count_macs(model, input_size)}
