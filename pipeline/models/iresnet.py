"""Improved ResNet (iresnet) face backbones with arcface_torch's exact parameter layout.

With default arguments the module tree (hence every state_dict key, its order and shape) matches
insightface arcface_torch's `backbones/iresnet.py`, so its released checkpoints load with strict=True and
give the same embeddings. `width` and `input_size` shrink the network for CPU demos.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

# Blocks per stage of each depth (stage strides are all 2, so the feature map is input_size / 16).
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
BN_EPS = 1e-5


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN (+ skip)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        # Attribute order fixes the state_dict order; keep it as in arcface_torch.
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        skip = x if self.downsample is None else self.downsample(x)
        return out + skip


def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or cin != cout:
        downsample = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS),
        )
    first = IBasicBlock(cin, cout, stride, downsample)
    return nn.Sequential(first, *(IBasicBlock(cout, cout) for _ in range(blocks - 1)))


def check_input_size(input_size: int) -> int:
    """Both backbones downsample by 16; any other size would break the flatten/GDC shapes."""
    if input_size < 16 or input_size % 16:
        raise ValueError(f"input_size must be a positive multiple of 16, got {input_size}")
    return input_size


def scaled_channels(channels: int, width: float) -> int:
    """`channels * width`, rounded, at least 1 (width is the demo channel multiplier)."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return max(1, int(round(channels * width)))


class IResNet(nn.Module):
    """iresnet body + BN -> dropout -> FC -> BN1d embedding head (arcface_torch layout)."""

    def __init__(
        self,
        layers: Sequence[int],
        num_features: int = 512,
        input_size: int = 112,
        width: float = 1.0,
        dropout: float = 0.0,
        fp16: bool = False,
    ):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"iresnet needs four stages of >= 1 block, got {list(layers)}")
        self.fp16 = fp16
        self.num_features, self.input_size = num_features, input_size
        base = scaled_channels(64, width)
        channels = [base, 2 * base, 4 * base, 8 * base]
        side = check_input_size(input_size) // 16

        self.conv1 = _conv3x3(3, base)
        self.bn1 = nn.BatchNorm2d(base, eps=BN_EPS)
        self.prelu = nn.PReLU(base)
        self.layer1 = _stage(base, channels[0], layers[0], stride=2)
        self.layer2 = _stage(channels[0], channels[1], layers[1], stride=2)
        self.layer3 = _stage(channels[1], channels[2], layers[2], stride=2)
        self.layer4 = _stage(channels[2], channels[3], layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(channels[3], eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels[3] * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # arcface_torch keeps the embedding BN's scale fixed at 1 (only its shift learns).
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.dropout(torch.flatten(self.bn2(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Like arcface_torch: the convolutional body may run in fp16, the head always in fp32.
        use_amp = self.fp16 and x.is_cuda
        with torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext():
            x = self._body(x)
        return self.features(self.fc(x.float()))


def iresnet(name: str, **kwargs) -> IResNet:
    """Build `r18`/`r34`/`r50`/`r100`/`r200` (see IResNet for keyword arguments)."""
    return IResNet(IRESNET_LAYERS[name], **kwargs)
