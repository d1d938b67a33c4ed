"""Face-recognition backbones compatible with insightface arcface_torch checkpoints.

`get_model(name, **kw)` builds `r18 r34 r50 r100 r200` (iresnet) or `mbf` (MobileFaceNet). With default
keyword arguments the state_dict keys, order and shapes are arcface_torch's, so its checkpoints load with
strict=True. Keywords: `num_features=512`, `input_size=112` (multiple of 16), `width=1.0` (channel
multiplier), `fp16=False` (autocast the body on CUDA), `dropout=0.0`; `mbf` also takes `blocks` and `scale`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.iresnet import IRESNET_LAYERS, IResNet, iresnet
from pipeline.models.mobilefacenet import MobileFaceNet, mobilefacenet
from pipeline.settings import Choice, check, setting


class Arch(Choice):
    """Backbone names: iresnet r18 .. r200 and MobileFaceNet (mbf)."""

    r18 = "r18"
    r34 = "r34"
    r50 = "r50"
    r100 = "r100"
    r200 = "r200"
    mbf = "mbf"


MODEL_NAMES: tuple[str, ...] = Arch.values()
assert set(MODEL_NAMES) == {*IRESNET_LAYERS, "mbf"}


@dataclass
class BackboneShape:
    """The size knobs of a backbone (arcface_torch's model at the defaults), as build options."""

    input_size: Optional[int] = setting(None, "Input size (multiple of 16); default: the data's image size.", min=16)
    width: float = setting(1.0, "Channel multiplier (1.0 = arcface_torch's model).", above=0.0)
    embedding_size: int = setting(512, "Embedding dimension.", min=1, max=65536)

    def __post_init__(self):
        check(self)

    def arch_kwargs(self, image_size: tuple[int, int] | None = None, where: object = "the data") -> dict:
        """get_model keywords; the input size defaults to the data's square `image_size` (else 112) and must
        match it."""
        size = self.input_size or (image_size[0] if image_size else 112)
        if size % 16:
            raise PipelineError(f"--input-size {size}: must be a multiple of 16 (the backbones downsample 16x)")
        if image_size and tuple(image_size) != (size, size):
            raise PipelineError(f"{where}: images are {tuple(image_size)}, but --input-size is {size}")
        return {"input_size": size, "width": self.width, "num_features": self.embedding_size}


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


__all__ = ["MODEL_NAMES", "Arch", "BackboneShape", "IResNet", "MobileFaceNet", "count_parameters", "get_model"]
