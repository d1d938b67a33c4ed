"""Face-recognition backbones compatible with insightface arcface_torch checkpoints.

`get_model(name, **kw)` builds `r18 r34 r50 r100 r200` (iresnet) or `mbf` (MobileFaceNet). With default
keyword arguments the state_dict keys, order and shapes are arcface_torch's, so its checkpoints load with
strict=True. Keywords: `num_features=512`, `input_size=112` (multiple of 16), `width=1.0` (channel
multiplier), `fp16=False` (autocast the body on CUDA), `dropout=0.0`; `mbf` also takes `blocks` and `scale`.
"""

from __future__ import annotations

from torch import nn

from pipeline.models.iresnet import IRESNET_LAYERS, IResNet, iresnet
from pipeline.models.mobilefacenet import MobileFaceNet, mobilefacenet

MODEL_NAMES: tuple[str, ...] = (*IRESNET_LAYERS, "mbf")


def get_model(name: str, **kwargs) -> nn.Module:
    """Build backbone `name` (one of MODEL_NAMES); see the module docstring for keyword arguments."""
    if name in IRESNET_LAYERS:
        return iresnet(name, **kwargs)
    if name == "mbf":
        return mobilefacenet(name, **kwargs)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (optionally only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["MODEL_NAMES", "IResNet", "MobileFaceNet", "count_parameters", "get_model"]
